"""Every job's composed config of a sweep, fast (``SweepConfigs``), and the ``w2sg_basic`` sweeper that checks a
sweep's configs compose with it before any job is launched (``W2sgBasicSweeper``, its conf ``W2sgBasicSweeperConf``)."""

from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

from omegaconf import open_dict

from w2sg.app import hydra_compat
from w2sg.app.hydra_compat import BasicSweeper


class SweepConfigs:
    """Every job's config exactly as Hydra's ``load_sweep_config`` composes it, at a fraction of the cost: the
    config is composed once per set of config-group choices (what shapes the defaults list), and each job's other
    overrides (seed=3, train.lr=...) are applied to a copy, with Hydra's own override code, in Hydra's order.
    ``shared=True`` (reading a job's config, not keeping it) applies them to one working copy per group choices
    while consecutive jobs set the same keys with plain ``key=value`` overrides (each job then overwrites every
    value the previous one set), which spares copying the config per job. Composing each job from scratch took
    over 1 s per job; tests/test_submit.py checks the configs equal Hydra's."""

    def __init__(self, loader: Any, master: Any) -> None:
        self.loader, self.master = loader, master
        self.hydra_overrides = hydra_compat.parse_overrides(master.hydra.overrides.hydra)
        self.bases: Dict[Tuple[str, ...], Any] = {}
        self.scratch: Dict[Tuple[str, ...], Tuple[Tuple[str, ...], Any]] = {}  # group choices -> (keys set, cfg)

    def _shapes_defaults(self, override: Any) -> bool:
        """As Hydra's defaults list classifies overrides (hydra._internal.defaults_list.Overrides): a config group
        choice, unless its value is a dict; hydra.searchpath changes where groups are found."""
        key = override.key_or_group
        if key == "hydra.searchpath":
            return True
        return hydra_compat.group_exists(self.loader, key) and not isinstance(override.value(), dict)

    @staticmethod
    def _plain(override: Any) -> bool:
        """``key=value`` that replaces the value (no +, ++, ~, and no dict value, which Hydra merges)."""
        return not (override.is_add() or override.is_force_add() or override.is_delete()
                    or isinstance(override.value(), dict))

    def __call__(self, sweep_overrides: Sequence[str], shared: bool = False) -> Any:
        import copy

        parsed = hydra_compat.parse_overrides(sweep_overrides)
        groups = tuple(o.input_line for o in parsed if self._shapes_defaults(o))
        values = [o for o in parsed if not self._shapes_defaults(o)]
        if groups not in self.bases:
            self.bases[groups] = self.loader.load_sweep_config(self.master, list(groups))
        keys = tuple(o.key_or_group for o in values)
        if shared and all(self._plain(o) for o in values):
            entry = self.scratch.get(groups)
            if entry is None or entry[0] != keys:
                entry = self.scratch[groups] = (keys, copy.deepcopy(self.bases[groups]))
            cfg = entry[1]
        else:
            cfg = copy.deepcopy(self.bases[groups])
        try:
            hydra_compat.apply_overrides(values, cfg)
        except Exception:
            self.scratch.pop(groups, None)  # half applied: start the next job from a clean copy
            raise
        everything = self.hydra_overrides + parsed
        app = [o for o in everything if not o.is_hydra_override()]
        with open_dict(cfg.hydra):
            cfg.hydra.overrides.hydra = [o.input_line for o in everything if o.is_hydra_override()]
            cfg.hydra.overrides.task = [o.input_line for o in app]
            job = cfg.hydra.job.config.override_dirname
            cfg.hydra.job.override_dirname = hydra_compat.overrides_dirname(
                app, kv_sep=job.kv_sep, item_sep=job.item_sep, exclude_keys=job.exclude_keys)
        return cfg


@dataclass
class W2sgBasicSweeperConf:
    _target_: str = "hydra_plugins.w2sg_launcher.sweep_configs.W2sgBasicSweeper"
    max_batch_size: Optional[int] = None
    params: Optional[Dict[str, str]] = None


class W2sgBasicSweeper(BasicSweeper):
    """Hydra's basic sweeper, checking that every job's config composes (before any job is launched) with
    SweepConfigs instead of composing each from scratch."""

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        configs = SweepConfigs(self.hydra_context.config_loader, self.config)
        for overrides in batch:
            configs(overrides, shared=True)

