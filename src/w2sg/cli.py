"""The ``w2sg`` entrypoint: compose the config (Hydra), validate it, run the stage graph, write metrics.json.

Kept thin and light: torch and transformers are imported only when a stage runs, so ``w2sg --help`` and
config errors answer at once.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Dict, Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from w2sg import hydra_compat
from w2sg.errors import W2SGError
from w2sg.schema import register

log = logging.getLogger("w2sg")
CONF_DIR = Path(__file__).resolve().parent / "conf"

register()
# Hydra 1.3 deep-copies the whole ConfigStore once per config group it lists (~120 times for --help, ~2.4 s);
# backport of the upstream fix (see w2sg.hydra_compat).
hydra_compat.install()


def validate(cfg: DictConfig) -> None:
    """Cheap checks before any stage runs; each error names the bad value and the valid ones."""
    from w2sg.losses import validate_loss
    from w2sg.models import POOLINGS, check_model_path
    from w2sg.tasks import validate_task
    from w2sg.train import check_train_settings

    validate_loss(cfg.loss)
    validate_task(cfg.task)
    t = cfg.train
    check_train_settings(t.mode, t.optimizer, t.schedule, t.keep_best, float(t.val_frac), t.val_labels,
                         int(t.batch_size), t.minibatch_size)
    from w2sg.device import check_settings

    check_settings(t.device, t.precision, t.device_map, t.mode)
    g = cfg.generative
    if g.enabled:
        from w2sg.generative import OBJECTIVES

        if g.objective not in OBJECTIVES:
            raise W2SGError(f"unknown generative.objective {g.objective!r}; valid: {', '.join(OBJECTIVES)}")
        bad = sorted(set(g.sides) - {"weak", "strong"})
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
        if (chain[0].name, chain[-1].name) != (cfg.weak.name, cfg.strong.name):
            raise W2SGError(
                f"chain {cfg.chain.name!r} runs {chain[0].name} -> {chain[-1].name} but weak={cfg.weak.name} "
                f"strong={cfg.strong.name}; drop the weak=/strong= overrides or pick a matching chain"
            )


def run(cfg: DictConfig) -> Dict[str, Any]:
    """Validate, run every stage of this experiment through the store, write metrics.json, print the table."""
    from w2sg import experiment
    from w2sg.stages import Runner
    from w2sg.store import Store

    from w2sg.tracking import Tracker

    validate(cfg)
    out_dir = Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else Path.cwd()
    runner = Runner(cfg, Store(cfg.store_dir), Tracker(cfg.logger, sweep_name()))
    metrics = experiment.run(cfg, runner)
    metrics["output_dir"] = str(out_dir)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
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
def _hydra_entry(cfg: DictConfig) -> Optional[float]:
    from w2sg.train import Preempted

    try:
        metrics = run(cfg)
    except Preempted as e:
        print(f"w2sg: {e}; rerun the same command to resume from it", file=sys.stderr, flush=True)
        if _is_multirun():
            raise
        sys.exit(128 + e.signum)
    except W2SGError as e:
        print(f"w2sg: error: {e}", file=sys.stderr, flush=True)  # also into the job's log under a launcher
        if _is_multirun():
            raise  # Hydra records the failed job; the other jobs of the sweep still run
        sys.exit(2)
    return metrics["pgr"]


SUBCOMMANDS = {"status": "w2sg.status", "report": "w2sg.report"}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in SUBCOMMANDS:
        import importlib

        sys.exit(importlib.import_module(SUBCOMMANDS[sys.argv[1]]).main(sys.argv[2:]))
    # Offline by default: no hub look-ups unless the user allows them (HF_HUB_OFFLINE=0).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _hydra_entry()


if __name__ == "__main__":
    main()
