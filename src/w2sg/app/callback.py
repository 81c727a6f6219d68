"""The Hydra callback of every multirun (``hydra.callbacks.report`` in conf/config.yaml): when the sweep starts,
set a tuning sweeper's direction to maximize unless the user set one (w2sg.app.cli.maximize_by_default: every
w2sg objective is higher-is-better, and Optuna minimises by default); when the sweep ends, write its report into
the sweep folder (w2sg.results.report) and log it to one W&B run for the sweep (w2sg.results.wandb_summary,
through a tracker of w2sg.run.tracking made from the sweep's logger config).

Here, in app/, because only app/ knows Hydra: the results package reads folders and stores, not configs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

log = logging.getLogger(__name__)


class ReportCallback(Callback):
    """Hydra callback: when a multirun starts, maximise the objective unless told otherwise; when it ends, write the
    local report into the sweep folder and log it to W&B."""

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        from w2sg.app.cli import maximize_by_default

        if maximize_by_default(config.hydra):  # before Hydra builds the sweeper from this config
            log.info("hydra.sweeper.direction: maximize (objective=%s is higher-is-better; the sweeper's default "
                     "would minimise it)", OmegaConf.select(config, "objective", default="pgr"))

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        from w2sg.results import anchors
        from w2sg.results.report import write_report

        sweep_dir = Path(config.hydra.sweep.dir)
        if not OmegaConf.select(config, "hydra.launcher.wait", default=True) and \
                next(sweep_dir.glob("**/metrics.json"), None) is None:  # submitted, nothing finished yet
            log.info("no report yet: the jobs were submitted without waiting (hydra.launcher.wait=false); "
                     "`w2sg report %s` once they finish, or rerun the same command to collect them", sweep_dir)
            return
        try:
            report = write_report(sweep_dir)
        except Exception as e:  # a report must never hide the sweep's own results
            log.warning("report for %s failed: %s", sweep_dir, e)
            return
        log.info("report: %s", ", ".join(str(p) for p in report["files"]))
        for line in anchors.lines(report["anchors"]):
            log.info(line)
        choices = config.hydra.runtime.choices
        group = str(choices.get("sweep") or "/".join(sweep_dir.parts[-2:]))
        try:
            log_to_wandb(config.logger, group, report, sweep_dir)
        except Exception as e:
            log.warning("W&B sweep summary failed (%s); the local report is complete", e)


def log_to_wandb(logger_cfg: Any, group: str, report: Any, sweep_dir: Path) -> None:
    """The sweep's W&B summary (w2sg.results.wandb_summary) through a tracker made from the logger config."""
    from w2sg.results.wandb_summary import log_sweep
    from w2sg.run.tracking import Tracker

    log_sweep(Tracker(logger_cfg, group), group, report, sweep_dir)
