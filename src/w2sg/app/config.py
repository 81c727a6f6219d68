"""The config, in one home: where it lives (``CONF_DIR``), the config a run gets (``compose``; ``expand_sweep``:
the jobs of a sweep), the store a run uses (``default_store_dir``), the schemas (w2sg.core.config) registered in
Hydra's ConfigStore with friendly errors for misspelt keys, ``resolve``, which turns Hydra's composed config into the
typed ``Config`` every layer receives, and ``validate``, the cheap checks of that config before any stage runs (the
extensions it lists imported first, once per process: w2sg.core.registry.load).

Every group option starts its defaults list with the schema of its group (``- /schema/<group>@_here_``),
so a misspelt key in a YAML file or on the command line fails at compose time; ``register`` also makes Hydra's
error for a misspelt ``key=value`` override name the valid keys (see ``_unknown_key_message``).

Importing this module imports neither Hydra nor OmegaConf (each function imports what it uses): ``w2sg status``
reads the store's location from here in well under a second.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
import os
import re
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Optional, Sequence

from w2sg.app import hydra_compat
from w2sg.core.errors import W2SGError

if TYPE_CHECKING:  # pragma: no cover
    from w2sg.core.config import Config, ModelConfig

log = logging.getLogger("w2sg")
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


# --- composing ------------------------------------------------------------------------------------------------

def compose(overrides: Iterable[str] = (), with_hydra: bool = False, conf_dir: Path = CONF_DIR):
    """The config a run with these overrides gets (Hydra's compose API), without running anything."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from w2sg.app import run_id

    register()
    run_id.register()
    with initialize_config_dir(str(conf_dir), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides), return_hydra_config=with_hydra)


def expand_sweep(overrides: List[str]) -> List[List[str]]:
    """The override list of every job of ``w2sg -m <overrides>``, as Hydra's basic sweeper expands them."""
    from omegaconf import OmegaConf

    cfg = compose([o for o in overrides if _is_group_choice(o)], with_hydra=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params) if cfg.hydra.sweeper.params else {}
    return sweep_jobs(params, overrides)


def sweep_jobs(params: Dict[str, Any], overrides: Sequence[str]) -> List[List[str]]:
    """The override list of every job of a basic sweep: the sweep config's ``hydra.sweeper.params`` (those the
    command line does not set) and the command-line ``overrides``, expanded as Hydra's basic sweeper does."""
    given = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    combined = [f"{k}={v}" for k, v in params.items() if k not in given] + list(overrides)
    return hydra_compat.split_sweep(combined)


def _is_group_choice(override: str) -> bool:
    key = override.split("=", 1)[0]
    return key in ("sweep", "experiment") or "," not in override


# --- the store's location, without composing --------------------------------------------------------------------

_ENV = re.compile(r"\$\{oc\.env:(\w+)(?:,(.*))?\}")  # ${oc.env:NAME} or ${oc.env:NAME,DEFAULT}


def _env_value(text: str) -> Optional[str]:
    """``text`` with OmegaConf's ``${oc.env:NAME,DEFAULT}`` (whole) and ``${oc.env:NAME}`` (within) resolved
    from the environment; None for anything else (another resolver, a missing variable without default)."""
    whole = _ENV.fullmatch(text)
    if whole and _nested(whole.group(2) or ""):
        name, default = whole.groups()
        if name in os.environ:
            return os.environ[name]
        return None if default is None or default.strip() == "null" else _env_value(default.strip())
    missing = False

    def env(m: "re.Match[str]") -> str:
        nonlocal missing
        missing = missing or m.group(2) is not None or m.group(1) not in os.environ
        return os.environ.get(m.group(1), "")

    value = _ENV.sub(env, text)
    return None if missing or "${" in value else value


def _nested(text: str) -> bool:
    """Whether every ``}`` in ``text`` closes a ``${`` opened before it (a default that is one whole value)."""
    depth = 0
    for i, char in enumerate(text):
        depth += text.startswith("${", i)
        depth -= char == "}"
        if depth < 0:
            return False
    return depth == 0


def default_store_dir(conf_dir: Path = CONF_DIR) -> str:
    """The store a run without overrides uses (``store_dir`` of the primary config: env W2SG_STORE or the
    default), read from config.yaml alone: composing the whole config would take longer than listing the store.
    A plain ``store_dir: <value>`` line whose interpolations are environment variables (``oc.env``) is resolved
    here, without importing OmegaConf (~0.3 s); anything else is left to OmegaConf."""
    text = (conf_dir / "config.yaml").read_text()
    line = re.search(r"^store_dir:[ \t]*([^'\"#\s][^#\n]*?)[ \t]*$", text, re.MULTILINE)
    value = _env_value(line.group(1)) if line else None
    if value is not None:
        return value
    from omegaconf import OmegaConf

    return str(OmegaConf.load(conf_dir / "config.yaml").store_dir)


# --- the typed config -------------------------------------------------------------------------------------------

def resolve(cfg: Any) -> Config:
    """The typed config of one experiment, from Hydra's composed config (a DictConfig; its ``hydra`` node, if any,
    is left out): interpolations resolved, every group a dataclass, and what depends on the machine or on other
    config files decided here, once: ``train.precision`` (auto -> the precision this node computes in, which
    enters stage keys; w2sg.run.device) and the models an ensemble names (``labels.models``: names of conf/model ->
    ModelConfig). A Config given is returned as it is."""
    from omegaconf import OmegaConf

    from w2sg.core.config import Config, ModelConfig

    if isinstance(cfg, Config):
        return cfg

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

    from w2sg.core.config import ModelConfig

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
    from hydra.core.config_store import ConfigStore

    from w2sg.core.config import (BudgetConfig, ChainConfig, Config, GenerativeConfig, LoggerConfig, LoraConfig,
                                  ModelConfig, TaskConfig, TrainConfig)

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


# --- validation ---------------------------------------------------------------------------------------------

def _command_line_keys(overrides: Optional[Sequence[str]]) -> List[str]:
    """Keys and groups set on the command line (or by a sweep's grid): Hydra's task overrides of this job."""
    if overrides is None:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    return [o.split("=", 1)[0].lstrip("+~") for o in overrides if not o.endswith("=null")]


def validate(cfg: Config, overrides: Optional[Sequence[str]] = None) -> None:
    """Cheap checks of the typed config before any stage runs (no torch); each error names the bad value and the
    valid ones. ``overrides``: the job's command-line overrides (default: Hydra's, when it runs the job)."""
    from w2sg.core.methods import validate_labels
    from w2sg.core.options import GENERATIVE_OBJECTIVES, GENERATIVE_SIDES, check_device_settings, check_train_settings
    from w2sg.core.paths import check_model_path
    from w2sg.core.registry import load as load_extensions

    load_extensions(cfg.extensions)  # first: the names they register are valid below (planning and the run reuse it)
    from w2sg.data.tasks import validate_task
    from w2sg.ml.losses import validate_loss
    from w2sg.ml.poolings import POOLINGS

    validate_objective(cfg)
    validate_loss(cfg.loss)
    validate_labels(cfg.labels)
    validate_task(cfg.task)
    t = cfg.train
    check_train_settings(t.mode, t.optimizer, t.schedule, t.keep_best, t.val_frac, t.val_labels, t.batch_size,
                         t.minibatch_size, t.batch_order, t.truncation, t.head_init)
    check_device_settings(t.device, t.precision, t.device_map, t.mode)
    from w2sg.core.options import OPTIMIZERS, SCHEDULES, one_of

    for key, valid in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES)):
        if getattr(cfg.student, key) is not None:
            one_of(f"student.{key}", getattr(cfg.student, key), valid)
    if cfg.student.batch_size is not None and t.minibatch_size and cfg.student.batch_size % t.minibatch_size:
        raise W2SGError(f"train.minibatch_size={t.minibatch_size} must divide student.batch_size="
                        f"{cfg.student.batch_size}")
    g = cfg.generative
    if g.enabled:
        if g.objective not in GENERATIVE_OBJECTIVES:
            raise W2SGError(f"unknown generative.objective {g.objective!r}; valid: {', '.join(GENERATIVE_OBJECTIVES)}")
        bad = sorted(set(g.sides) - set(GENERATIVE_SIDES))
        if bad:
            raise W2SGError(f"generative.sides: unknown side {', '.join(map(repr, bad))}; valid: weak, strong")
    models = [cfg.weak, cfg.strong] + (list(cfg.chain.models.values()) if cfg.chain is not None else [])
    for m in models:
        if m.pooling not in POOLINGS:
            raise W2SGError(f"model {m.name!r}: unknown pooling {m.pooling!r}; valid: {', '.join(POOLINGS)}")
        check_model_path(m)
    if cfg.chain is not None:
        chain = list(cfg.chain.models.values())
        if len(chain) < 2:
            raise W2SGError(f"chain {cfg.chain.name!r} needs at least 2 models, got {len(chain)}")
        if "pair" in _command_line_keys(overrides):
            raise W2SGError(
                f"chain {cfg.chain.name!r} sets weak and strong itself ({chain[0].name} -> {chain[-1].name}); "
                f"pair= cannot be combined with chain=: drop pair= (or chain= to run just the pair)"
            )
        if (chain[0].name, chain[-1].name) != (cfg.weak.name, cfg.strong.name):
            raise W2SGError(
                f"chain {cfg.chain.name!r} runs {chain[0].name} -> {chain[-1].name} but weak={cfg.weak.name} "
                f"strong={cfg.strong.name}; drop the weak=/strong= overrides or pick a matching chain"
            )


# What the task function returns (for tuning sweepers): entries of metrics.json, higher is better for each.
# val.*: read on held-out rows of the training halves (train.val_frac > 0), so a tuned result is not selected on the
# test split; the w2s model's against its validation labels (the weak labels by default: all a real user has);
# val.pgr_oracle needs train.val_labels=ground_truth (ground truth selects the student: an oracle). The others are
# read on the test split, which a sweep should report once, not select on.
VAL_OBJECTIVES = ("val.acc.w2s", "val.auroc.w2s", "val.acc.weak", "val.auroc.weak", "val.acc.ceiling",
                  "val.auroc.ceiling", "val.pgr_oracle")
OBJECTIVES = VAL_OBJECTIVES + (
    "pgr", "acc.w2s", "acc.weak", "acc.ceiling", "auroc.w2s", "auroc.weak", "auroc.ceiling", "weak_label_acc",
    "chain.end_to_end.pgr", "chain.end_to_end.acc", "chain.bootstrap_minus_direct")


def validate_objective(cfg: Config) -> None:
    name = cfg.objective
    if name not in OBJECTIVES:
        close = difflib.get_close_matches(str(name), OBJECTIVES, n=1)
        raise W2SGError(f"unknown objective {name!r}; valid: {', '.join(OBJECTIVES)}"
                        + (f"; did you mean {close[0]}?" if close else ""))
    if name.startswith("chain.") and cfg.chain is None:
        raise W2SGError(f"objective {name!r} needs a bootstrap chain (chain=<name>); without one pick one of "
                        f"{', '.join(o for o in OBJECTIVES if not o.startswith('chain.'))}")
    if sweeper_reads_return_value():
        from hydra.core.hydra_config import HydraConfig

        check_direction(HydraConfig.get().sweeper, name)
        check_selection_split(cfg)


def check_selection_split(cfg: Config) -> None:
    """Under a tuning sweeper: a val.* objective needs held-out rows (and val.pgr_oracle ground truth for the
    student's); an objective read on the test split is allowed, with a warning that selecting on it is optimistic."""
    name, t = cfg.objective, cfg.train
    if name in VAL_OBJECTIVES and not t.val_frac:
        raise W2SGError(f"objective={name} is read on held-out rows of the training halves, and train.val_frac=0 "
                        "holds none out; set train.val_frac=0.1 (or another share)")
    if name == "val.pgr_oracle" and t.val_labels != "ground_truth":
        raise W2SGError("objective=val.pgr_oracle measures the student against ground truth: set "
                        "train.val_labels=ground_truth (an oracle), or tune on objective=val.acc.w2s (against the "
                        "weak labels, all a real user has)")
    if name not in VAL_OBJECTIVES:
        log.warning("objective=%s is read on the test split: a result selected on it is optimistic, and the test "
                    "split should be reported once; tune on a val.* objective (train.val_frac=0.1 "
                    "objective=val.acc.w2s) and report the test split of the chosen setting", name)


# --- which way a tuning sweeper optimises -------------------------------------------------------------------
# hydra-optuna-sweeper's ``direction`` defaults to minimize, held as an enum (``Direction.minimize``: its str() is
# "Direction.minimize", not "minimize"); a direction the user sets, on the command line or in a config file, is a
# string, and a list (one per objective) for a multi-objective study. Every w2sg objective is higher-is-better, so
# at the start of a sweep w2sg sets a direction the user left at that default to maximize (``maximize_by_default``,
# from the report callback, w2sg.app.callback); each job checks what its sweeper does (``check_direction``).

def direction_names(direction: Any) -> List[str]:
    """A sweeper's ``direction`` as names: an enum member (Optuna's default) by its name, a string as it is, a list
    (multi-objective) entry by entry."""
    from omegaconf import ListConfig

    items = list(direction) if isinstance(direction, (list, tuple, ListConfig)) else [direction]
    return [d.name if isinstance(d, Enum) else str(d) for d in items]


def _is_tuning_sweeper(sweeper: Any) -> bool:
    return not hydra_compat.is_basic_sweeper(sweeper.get("_target_", ""))


def maximize_by_default(hydra_cfg: Any) -> bool:
    """At the start of a multirun: a tuning sweeper whose ``direction`` is still its plugin's default (an enum: no
    command line or config file set it) is set to maximize, in the sweeper's config (which Hydra builds the sweeper
    from next) and as a Hydra override (from which every job's config is composed, and which it records).
    ``hydra_cfg``: the multirun's ``hydra`` node. Returns whether it set the direction."""
    sweeper = hydra_cfg.sweeper
    if not _is_tuning_sweeper(sweeper) or "direction" not in sweeper:
        return False
    if not isinstance(sweeper.direction, Enum):
        return False  # the user's choice, which each job checks (check_direction; Hydra turns a callback's error
        # into a warning, so a refusal belongs to the jobs)
    sweeper.direction = "maximize"
    hydra_cfg.overrides.hydra.append("hydra.sweeper.direction=maximize")
    return True


def check_direction(sweeper: Any, objective: str) -> None:
    """Refuse a tuning sweeper that would minimise ``objective`` without being told to, or optimise several
    objectives; warn when the user set it to minimise. ``sweeper``: the job's ``hydra.sweeper`` node."""
    if "direction" not in sweeper:
        return  # a sweeper without a direction setting (e.g. Nevergrad's optim.maximize): its own business
    direction = sweeper.direction
    names = direction_names(direction)
    if len(names) != 1:
        raise W2SGError(f"hydra.sweeper.direction={names} asks for {len(names)} objectives, but w2sg returns one "
                        f"number (objective={objective}); set hydra.sweeper.direction=maximize")
    if names[0] != "minimize":
        return
    if isinstance(direction, Enum):  # the plugin's default: maximize_by_default did not run
        raise W2SGError(f"the sweeper would minimise objective={objective} (its default direction), but every w2sg "
                        "objective is higher-is-better; set hydra.sweeper.direction=maximize (w2sg sets it itself "
                        "at the start of a sweep through its report callback, hydra.callbacks.report, which this "
                        "sweep does not run)")
    log.warning("hydra.sweeper.direction=minimize: the sweeper minimises %s, for which higher is better (every w2sg "
                "objective is); drop the setting or set hydra.sweeper.direction=maximize to maximise it", objective)


def sweeper_reads_return_value() -> bool:
    """A tuning sweeper (Optuna, Nevergrad, ...) uses the return value; Hydra's basic sweeper ignores it."""
    from hydra.core.hydra_config import HydraConfig

    return is_multirun() and _is_tuning_sweeper(HydraConfig.get().sweeper)


def is_multirun() -> bool:
    """Whether Hydra runs this job as one of a multirun (``-m``)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
