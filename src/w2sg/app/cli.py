"""A ``w2sg`` run or sweep (w2sg.app.entry starts the subcommands and hands everything else to ``main`` here):
Hydra composes the config, w2sg.app.config resolves and validates it, ``run`` runs the stage graph and writes
metrics.json; printing, exit statuses and what a tuning sweeper gets back.

Kept thin and light: torch and transformers are imported only when a stage runs, so ``w2sg --help`` and
config errors answer at once.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from w2sg.app import hydra_compat
from w2sg.app.config import (CONF_DIR, HIDDEN_GROUPS, VAL_OBJECTIVES, compose, expand_sweep, is_multirun, register,
                             resolve, sweeper_reads_return_value, validate)
from w2sg.core.config import Config
from w2sg.core.errors import W2SGError

log = logging.getLogger("w2sg")

register()
# Hydra 1.3 deep-copies the whole ConfigStore once per config group it lists (~120 times for --help, ~2.4 s);
# backport of the upstream fix (see w2sg.app.hydra_compat).
hydra_compat.install()


# ``w2sg --help`` lists the groups a user picks from, not ``schema`` / ``model`` (idempotent).
hydra_compat.hide_config_groups(HIDDEN_GROUPS)


def objective_value(metrics: Dict[str, Any], name: str) -> Optional[float]:
    """The objective's value in a run's metrics (None when it has none, e.g. PGR with ceiling <= weak)."""
    node: Any = metrics
    for part in name.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return None if node is None else float(node)


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
    if not sweeper_reads_return_value():
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
    if is_multirun():
        return "/".join(Path(hc.sweep.dir).parts[-2:])
    return None


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _hydra_entry(cfg: DictConfig) -> float:
    """Run one experiment; returns ``cfg.objective`` (what a tuning sweeper such as Optuna optimises)."""
    from w2sg.core.errors import Preempted

    try:
        metrics = run(cfg)
        return returned_objective(cfg, metrics)
    except Preempted as e:
        print(f"w2sg: {e}; rerun the same command to resume from it", file=sys.stderr, flush=True)
        if is_multirun():
            raise
        sys.exit(128 + e.signum)
    except KeyboardInterrupt as e:
        _report_interrupt(e)
        if is_multirun():
            raise  # not an Exception: Hydra does not record it as a failed job, the whole sweep stops (main exits)
        sys.exit(INTERRUPTED_STATUS)
    except W2SGError as e:
        print(f"w2sg: error: {e}", file=sys.stderr, flush=True)  # also into the job's log under a launcher
        if is_multirun():
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


def print_multirun_configs(argv: List[str]) -> int:
    """``w2sg -m <overrides> --cfg job``: each job's composed config (Hydra refuses --cfg with -m)."""
    from omegaconf import OmegaConf

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
    """A run or a sweep: ``w2sg <overrides>`` (w2sg.app.entry.main, the ``w2sg`` command, starts the subcommands
    itself and calls this for anything else)."""
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
