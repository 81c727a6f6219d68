"""The ``w2sg`` entrypoint: compose the config (Hydra), validate it, run the stage graph, write metrics.json.

Kept thin and light: torch and transformers are imported only when a stage runs, so ``w2sg --help`` and
config errors answer at once.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig

from w2sg.app import hydra_compat
from w2sg.app.config import HIDDEN_GROUPS, register, resolve
from w2sg.core.config import Config
from w2sg.core.errors import W2SGError

log = logging.getLogger("w2sg")
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

register()
# Hydra 1.3 deep-copies the whole ConfigStore once per config group it lists (~120 times for --help, ~2.4 s);
# backport of the upstream fix (see w2sg.app.hydra_compat).
hydra_compat.install()


# ``w2sg --help`` lists the groups a user picks from, not ``schema`` / ``model`` (idempotent).
hydra_compat.hide_config_groups(HIDDEN_GROUPS)


def _command_line_keys(overrides: Optional[Sequence[str]]) -> List[str]:
    """Keys and groups set on the command line (or by a sweep's grid): Hydra's task overrides of this job."""
    if overrides is None:
        overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    return [o.split("=", 1)[0].lstrip("+~") for o in overrides if not o.endswith("=null")]


def validate(cfg: Config, overrides: Optional[Sequence[str]] = None) -> None:
    """Cheap checks of the typed config before any stage runs (no torch); each error names the bad value and the
    valid ones. ``overrides``: the job's command-line overrides (default: Hydra's, when it runs the job)."""
    from w2sg.core.methods import validate_labels
    from w2sg.core.options import GENERATIVE_OBJECTIVES, GENERATIVE_SIDES, check_device_settings, check_train_settings
    from w2sg.core.paths import check_model_path
    from w2sg.core.registry import load as load_extensions

    load_extensions(cfg.extensions)  # first: the names they register are valid below
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
        import difflib

        close = difflib.get_close_matches(str(name), OBJECTIVES, n=1)
        raise W2SGError(f"unknown objective {name!r}; valid: {', '.join(OBJECTIVES)}"
                        + (f"; did you mean {close[0]}?" if close else ""))
    if name.startswith("chain.") and cfg.chain is None:
        raise W2SGError(f"objective {name!r} needs a bootstrap chain (chain=<name>); without one pick one of "
                        f"{', '.join(o for o in OBJECTIVES if not o.startswith('chain.'))}")
    if _sweeper_reads_return_value():
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


def objective_value(metrics: Dict[str, Any], name: str) -> Optional[float]:
    """The objective's value in a run's metrics (None when it has none, e.g. PGR with ceiling <= weak)."""
    node: Any = metrics
    for part in name.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return None if node is None else float(node)


def _sweeper_reads_return_value() -> bool:
    """A tuning sweeper (Optuna, Nevergrad, ...) uses the return value; Hydra's basic sweeper ignores it."""
    return _is_multirun() and _is_tuning_sweeper(HydraConfig.get().sweeper)


def returned_objective(cfg: Config, metrics: Dict[str, Any]) -> float:
    """``cfg.objective`` as a float for Hydra; a null one is NaN, or an error under a tuning sweeper.

    hydra-optuna-sweeper (1.3, optuna 2.10) cannot record a NaN: optuna's ``tell`` refuses it, and the sweeper's
    second ``tell`` (the trial as failed, still with the NaN) raises too, aborting the whole sweep with an optuna
    message whatever ``max_failure_rate`` says. An exception from the job instead becomes a failed trial, which
    ``hydra.sweeper.max_failure_rate`` tolerates (its default 0 stops the sweep with this message).
    """
    value = objective_value(metrics, cfg.objective)
    if value is not None:
        return value  # which way the sweeper optimises it was checked before the run (check_direction)
    if not _sweeper_reads_return_value():
        return float("nan")  # a single run or Hydra's basic sweeper: nobody reads it (the table says why)
    reason = metrics.get("pgr_reason") if "pgr" in cfg.objective else None
    raise W2SGError(f"objective {cfg.objective} is null for this run" + (f" ({reason})" if reason else "")
                    + "; the sweeper records the trial as failed (hydra.sweeper.max_failure_rate sets how many failed "
                    "trials it tolerates)" + ("; objective=acc.w2s has a value whenever the w2s stage runs"
                                              if cfg.objective == "pgr" else "")
                    + ("; val.* objectives need train.val_frac > 0" if cfg.objective in VAL_OBJECTIVES else ""))


def run(composed: DictConfig) -> Dict[str, Any]:
    """The entry: resolve Hydra's config into the typed one, validate it, run every stage of the experiment
    through the store, write metrics.json (and the store's record of the experiment), print the table."""
    from w2sg.core.store import Store
    from w2sg.run import experiment
    from w2sg.run.runner import Runner
    from w2sg.run.tracking import Tracker

    cfg = resolve(composed)
    validate(cfg)
    out_dir = Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else Path.cwd()
    tracker = Tracker(cfg.logger, sweep_name())
    store = Store(cfg.store_dir)
    metrics = experiment.run(cfg, Runner(cfg, store, tracker), tracker)
    metrics["output_dir"] = str(out_dir)
    if cfg.extensions:  # the users' code this run loaded, with the versions in its stage keys
        from w2sg.core.registry import load as load_extensions

        metrics["extensions"] = load_extensions(cfg.extensions)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    store.record_experiment(metrics)  # the store's report pairs stages by these records
    print(experiment.table(metrics), flush=True)
    log.info("metrics: %s", out_dir / "metrics.json")
    return metrics


def sweep_name() -> Optional[str]:
    """W&B group: the sweep file's name, else the multirun folder's name; None for a single run."""
    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if hc.runtime.choices.get("sweep"):
        return str(hc.runtime.choices["sweep"])
    if _is_multirun():
        return "/".join(Path(hc.sweep.dir).parts[-2:])
    return None


def _is_multirun() -> bool:
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _hydra_entry(cfg: DictConfig) -> float:
    """Run one experiment; returns ``cfg.objective`` (what a tuning sweeper such as Optuna optimises)."""
    from w2sg.core.errors import Preempted

    try:
        metrics = run(cfg)
        return returned_objective(cfg, metrics)
    except Preempted as e:
        print(f"w2sg: {e}; rerun the same command to resume from it", file=sys.stderr, flush=True)
        if _is_multirun():
            raise
        sys.exit(128 + e.signum)
    except KeyboardInterrupt as e:
        _report_interrupt(e)
        if _is_multirun():
            raise  # not an Exception: Hydra does not record it as a failed job, the whole sweep stops (main exits)
        sys.exit(INTERRUPTED_STATUS)
    except W2SGError as e:
        print(f"w2sg: error: {e}", file=sys.stderr, flush=True)  # also into the job's log under a launcher
        if _is_multirun():
            raise  # Hydra records the failed job; the other jobs of the sweep still run
        sys.exit(2)


# Ctrl-C (SIGINT's KeyboardInterrupt) outside a training loop, which turns it into Preempted itself after saving a
# checkpoint: one line instead of a traceback, and the shell's status for SIGINT. Nothing is lost: each stage is
# stored when it finishes, and a rerun reuses them.
INTERRUPTED = "w2sg: interrupted (Ctrl-C); finished stages are stored; rerun the same command to go on"
INTERRUPTED_STATUS = 128 + 2  # 128 + SIGINT, as a shell reports a process that SIGINT ended


def _report_interrupt(e: KeyboardInterrupt) -> None:
    """Print INTERRUPTED once for this interruption (the job's handler prints it, into the job's log under a
    launcher; main's catches what happened outside a job, or a sweep's job re-raising it)."""
    if not getattr(e, "_w2sg_reported", False):
        print(INTERRUPTED, file=sys.stderr, flush=True)
        e._w2sg_reported = True  # type: ignore[attr-defined]


from w2sg.app.entry import SUBCOMMANDS  # noqa: E402  (one list: the light entry starts them)


def print_multirun_configs(argv: List[str]) -> int:
    """``w2sg -m <overrides> --cfg job``: each job's composed config (Hydra refuses --cfg with -m)."""
    from omegaconf import OmegaConf

    from w2sg.app.status import compose, expand_sweep

    args = hydra_compat.args_parser().parse_args(argv)
    if args.cfg != "job":
        print(f"w2sg: error: -m with --cfg {args.cfg}: only --cfg job prints the config of each job of a sweep; "
              f"drop -m to see the {args.cfg} config of one run", file=sys.stderr)
        return 2
    try:
        jobs = expand_sweep(args.overrides)
        cfgs = [compose(job) for job in jobs]  # every job composes before anything is printed
        for i, (job, cfg) in enumerate(zip(jobs, cfgs)):
            node = OmegaConf.select(cfg, args.package) if args.package else cfg
            print(f"# job {i} of {len(jobs)}: {' '.join(job)}")
            print(OmegaConf.to_yaml(node, resolve=args.resolve) if OmegaConf.is_config(node) else node)
    except Exception as e:  # ours (W2SGError) and Hydra's compose errors (bad override or option): worded for users
        print(f"w2sg: error: {e}", file=sys.stderr)
        return 2
    return 0


def _is_multirun_cfg(argv: List[str]) -> bool:
    flags = {a.split("=", 1)[0] for a in argv if a.startswith("-")}
    return bool(flags & {"-m", "--multirun"}) and bool(flags & {"-c", "--cfg"})


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in SUBCOMMANDS:
        import importlib

        sys.exit(importlib.import_module(SUBCOMMANDS[sys.argv[1]]).main(sys.argv[2:]))
    if _is_multirun_cfg(sys.argv[1:]):
        sys.exit(print_multirun_configs(sys.argv[1:]))
    # Offline by default: no hub look-ups unless the user allows them (HF_HUB_OFFLINE=0).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        _hydra_entry()
    except KeyboardInterrupt as e:  # while Hydra composes the config, between a sweep's jobs, or re-raised by one
        _report_interrupt(e)
        sys.exit(INTERRUPTED_STATUS)


if __name__ == "__main__":
    main()
