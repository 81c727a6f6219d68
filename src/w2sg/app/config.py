"""The config at the entry: the schemas (w2sg.core.config) registered in Hydra's ConfigStore, friendly errors for
misspelt keys, and ``resolve``, which turns Hydra's composed config into the typed ``Config`` every layer receives.

Every group option starts its defaults list with the schema of its group (``- /schema/<group>@_here_``),
so a misspelt key in a YAML file or on the command line fails at compose time; ``register`` also makes Hydra's
error for a misspelt ``key=value`` override name the valid keys (see ``_unknown_key_message``).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
from pathlib import Path
from typing import Any, Callable, List

from hydra.core.config_store import ConfigStore

from w2sg.core.config import (BudgetConfig, ChainConfig, Config, GenerativeConfig, LoggerConfig, LoraConfig,
                              ModelConfig, TaskConfig, TrainConfig)
from w2sg.core.errors import W2SGError

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def resolve(cfg: Any) -> Config:
    """The typed config of one experiment, from Hydra's composed config (a DictConfig; its ``hydra`` node, if any,
    is left out): interpolations resolved, every group a dataclass, and what depends on the machine or on other
    config files decided here, once: ``train.precision`` (auto -> the precision this node computes in, which
    enters stage keys; w2sg.run.device) and the models an ensemble names (``labels.models``: names of conf/model ->
    ModelConfig). A Config given is returned as it is."""
    if isinstance(cfg, Config):
        return cfg
    from omegaconf import OmegaConf

    # group by group, leaving out ``hydra``: copying a launcher's config without it would cost more than the rest
    values = {f.name: cfg[f.name] for f in dataclasses.fields(Config)}
    typed = Config(**{k: OmegaConf.to_object(v) if OmegaConf.is_config(v) else v for k, v in values.items()})
    from w2sg.run.device import resolve_device, resolve_precision

    typed.train.precision = resolve_precision(typed.train.precision, resolve_device(typed.train.device))
    models = typed.labels.get("models") if isinstance(typed.labels, dict) else None
    if models is not None:
        typed.labels = {**typed.labels, "models": [m if isinstance(m, ModelConfig) else model_config(str(m))
                                                   for m in models]}
    return typed


def model_config(name: str) -> ModelConfig:
    """A model of conf/model by name, merged into its schema as Hydra would (for ``labels.models``)."""
    from omegaconf import OmegaConf

    path = CONF_DIR / "model" / f"{name}.yaml"
    if not path.is_file():
        valid = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
        raise W2SGError(f"labels.models: unknown model {name!r}; valid: {', '.join(valid)}")
    values = OmegaConf.load(path)
    values.pop("defaults", None)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), values))


# config groups that only other configs use (schemas; the models chains pick; the sizes conf/config.yaml picks by
# task and train mode): left out of `w2sg --help` (w2sg.app.cli) and of the reference's groups (tools/reference.py)
HIDDEN_GROUPS = ("schema", "model", "task_size")


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="w2sg_schema", node=Config)
    cs.store(group="schema", name="model", node=ModelConfig)
    cs.store(group="schema", name="task", node=TaskConfig)
    cs.store(group="schema", name="train", node=TrainConfig)
    cs.store(group="schema", name="lora", node=LoraConfig)
    cs.store(group="schema", name="chain", node=ChainConfig)
    cs.store(group="schema", name="logger", node=LoggerConfig)
    cs.store(group="schema", name="generative", node=GenerativeConfig)
    cs.store(group="schema", name="budget", node=BudgetConfig)
    _name_valid_keys_on_unknown_overrides()


def _loss_hint(cfg: Any, key: str) -> str:
    """For ``loss.<param>``: the parameters of the chosen loss (its function's signature) and the losses taking it."""
    from w2sg.ml.losses import LOSSES, loss_params

    name = cfg.loss.get("name")
    param = key.split(".", 1)[1]
    if name not in LOSSES:  # extensions are imported after compose: their losses' parameters are new keys here
        return (f"loss {name!r} is not built in (built in: {', '.join(sorted(LOSSES))}); for a loss registered by "
                f"a module in extensions:, add its parameters with a leading +: +{key}=<value>")
    valid = list(loss_params(LOSSES[name]))
    hint = f"loss {name!r} has no parameter {param!r}; valid: {', '.join(valid) or '(none)'}"
    others = [f"loss={n}" for n in sorted(LOSSES) if param in loss_params(LOSSES[n])]
    if others:
        hint += f" ({' / '.join(others)} take{'s' if len(others) == 1 else ''} {param!r})"
    return hint


def _group_names() -> List[str]:
    """The config groups of the app being composed (for a misspelt top-level key such as ``pari=tiny``)."""
    from w2sg.app import hydra_compat

    return sorted(g for g in hydra_compat.config_groups("") if g not in ("hydra", "schema", "model"))


def _unknown_key_message(cfg: Any, key: str, input_line: str) -> str:
    """``Could not override 'train.epoch'``, with what the parent node does have and the closest key."""
    from omegaconf import DictConfig, OmegaConf

    parts = key.split(".")
    depth = len(parts) - 1
    while depth > 0 and not isinstance(OmegaConf.select(cfg, ".".join(parts[:depth]), default=None), DictConfig):
        depth -= 1  # the deepest existing config node on the key's path
    parent = ".".join(parts[:depth])
    node = OmegaConf.select(cfg, parent) if parent else cfg
    bad = parts[depth]
    if parts[0] == "loss" and len(parts) == 2:
        return f"Could not override {key!r}: {_loss_hint(cfg, key)}"
    valid = [str(k) for k in node.keys() if str(k) != "hydra"]
    where = f"in {parent!r}" if parent else "at the top level"
    msg = f"Could not override {key!r}: no key {bad!r} {where}; valid keys: {', '.join(valid)}"
    groups = _group_names() if not parent else []
    if groups:
        msg += f"\nConfig groups (group=option, listed with their options by w2sg --help): {', '.join(groups)}"
    close = difflib.get_close_matches(bad, valid + groups, n=1)
    if close:
        msg += f"\nDid you mean {'.'.join(parts[:depth] + close)}?"
    if OmegaConf.get_type(node) is dict:  # a free-form mapping (task.splits, task.load_kwargs), not a schema
        msg += f"\nTo add a new key use +{input_line}"
    return msg


def _adds_to_a_schema(cfg: Any, key: str) -> bool:
    """Whether ``+key=...`` would add a key the config does not have under a node with a schema (a dataclass of
    w2sg.core.config, or the root): such a key is read by nothing, so the run would silently be the one without it.
    Free-form mappings (loss and labels parameters, task.splits, task.load_kwargs, ...) take new keys."""
    from omegaconf import DictConfig, OmegaConf

    if key.split(".")[0] == "hydra":
        return False
    parts = key.split(".")
    depth = len(parts) - 1
    while depth > 0 and not isinstance(OmegaConf.select(cfg, ".".join(parts[:depth]), default=None), DictConfig):
        depth -= 1  # the deepest existing config node on the key's path
    node = OmegaConf.select(cfg, ".".join(parts[:depth])) if depth else cfg
    if parts[depth] in node:
        return False  # Hydra reports adding an existing key itself
    return OmegaConf.get_type(node) not in (dict, None)


def _mapping_into_typed_dict(cfg: Any, override: Any) -> Any:
    """The mapping a plain ``key={...}`` override sets into a typed mapping of the schema (such as
    ``task.label_map``, ``Dict[str, int]``), its keys as the schema's str keys; None for any other override.

    OmegaConf 2.3 cannot merge a mapping into such a node while it is null (``'NoneType' object has no attribute
    'get'``), and refuses the int keys Hydra's grammar makes of ``{1: 0, 2: 1}``; ``_merge_mapping`` does both."""
    from omegaconf import DictConfig, OmegaConf

    if override.is_add() or override.is_force_add() or override.is_delete() or override.is_sweep_override():
        return None
    key = override.key_or_group
    parent_key, _, name = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key, default=None) if parent_key else cfg
    if not isinstance(parent, DictConfig) or name not in parent:
        return None  # Hydra's own step reports a missing key
    node = parent._get_node(name)
    if not isinstance(node, DictConfig) or node._metadata.key_type is not str:
        return None
    try:
        value = override.value()
    except Exception:  # noqa: BLE001 - whatever the grammar refuses, Hydra's own step reports
        return None
    if not isinstance(value, dict):
        return None
    return {str(k) if isinstance(k, (int, float, bool)) else k: v for k, v in value.items()}


def _merge_mapping(cfg: Any, override: Any, mapping: Any) -> None:
    """Merge ``mapping`` into the typed mapping ``override`` names, a null one starting empty."""
    from hydra.errors import ConfigCompositionException
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import OmegaConfBaseException

    key = override.key_or_group
    try:
        if OmegaConf.select(cfg, key, default=None) is None:
            OmegaConf.update(cfg, key, {}, merge=False)
        with open_dict(OmegaConf.select(cfg, key)):  # a mapping takes new keys (its key and value types still hold)
            OmegaConf.update(cfg, key, mapping, merge=True)
    except OmegaConfBaseException as e:
        raise ConfigCompositionException(f"Error merging override {override.input_line}: "
                                         f"{str(e).splitlines()[0]}") from e


def _name_valid_keys_on_unknown_overrides() -> None:
    """Wrap Hydra's override step so that an unknown key names the valid ones (idempotent).

    Hydra 1.3's message for ``train.epoch=1`` is "Could not override 'train.epoch'" plus OmegaConf's
    "Key 'epoch' not in 'TrainConfig'", without the keys that do exist.
    """
    from w2sg.app import hydra_compat

    hydra_compat.wrap_override_application(_naming_valid_keys)


def _naming_valid_keys(original: Callable[..., None]) -> Callable[..., None]:
    """Hydra's override step ``original(overrides, cfg)``, with w2sg's checks and messages (see above)."""
    from hydra.errors import ConfigCompositionException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    @functools.wraps(original)
    def apply(overrides: List[Any], cfg: Any) -> None:
        for o in overrides:  # +key / ++key: Hydra adds any key; under a schema a new key is a typo, never a setting
            if (o.is_add() or o.is_force_add()) and _adds_to_a_schema(cfg, o.key_or_group):
                raise ConfigCompositionException(
                    _unknown_key_message(cfg, o.key_or_group, o.input_line).replace("Could not override",
                                                                                     "Could not add", 1)
                    + "\n(a + override adds a key; the schema of this node has a fixed set of keys)") from None
        for o in overrides:  # one at a time: a mapping into a typed mapping goes through _merge_mapping
            mapping = _mapping_into_typed_dict(cfg, o)
            if mapping is not None:
                _merge_mapping(cfg, o, mapping)
            else:
                _apply_one(o, cfg)

    def _apply_one(o: Any, cfg: Any) -> None:
        overrides = [o]
        try:
            original(overrides, cfg)
        except ConfigCompositionException as e:
            cause = e.__cause__
            if not isinstance(cause, (ConfigAttributeError, ConfigKeyError)) or not cause.full_key:
                raise
            key = str(cause.full_key)
            override = next((o for o in overrides if o.key_or_group == key or o.key_or_group.startswith(key + ".")),
                            None)
            if override is None or override.is_add() or override.is_force_add() or override.is_delete():
                raise
            # from None: OmegaConf's own message (full_key, object_type) adds nothing to ours
            raise ConfigCompositionException(_unknown_key_message(cfg, override.key_or_group,
                                                                         override.input_line)) from None

    return apply
