"""The Hydra callback of every run and multirun (``hydra.callbacks.report`` in conf/config.yaml).

Before a run or a sweep writes anything, its folder (``hydra.run.dir`` / ``hydra.sweep.dir``) is checked: a folder
holding another finished run is refused, never overwritten (Hydra itself would replace its metrics.json and
.hydra/ records and append to its log), and an unwritable one is named in one line instead of an OSError traceback
from inside Hydra. When the sweep starts, a tuning sweeper's direction is set to maximize unless the user set one
(w2sg.app.config.maximize_by_default: every w2sg objective is higher-is-better, and Optuna minimises by default); when
the sweep ends, its report is written into the sweep folder (w2sg.results.report) and logged to one W&B run for the
sweep (w2sg.results.wandb_summary, through a tracker of w2sg.run.tracking made from the sweep's logger config).

Here, in app/, because only app/ knows Hydra: the results package reads folders and stores, not configs.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, List, Optional

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from w2sg.core.errors import W2SGError

log = logging.getLogger(__name__)


class ReportCallback(Callback):
    """Hydra callback: before a run or a multirun, check its folder (check_run_folder, check_sweep_folder); when a
    multirun starts, maximise the objective unless told otherwise; when it ends, write the local report into the
    sweep folder and log it to W&B."""

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        _or_exit(lambda: check_run_folder(config))  # before run_job saves .hydra/ and opens the log in the folder

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        from w2sg.app.config import maximize_by_default

        _or_exit(lambda: check_sweep_folder(config))  # before the sweeper saves multirun.yaml and any job runs
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


# --- run and sweep folders ----------------------------------------------------------------------------------
# Hydra's run_job saves .hydra/*.yaml and opens the job's log file in the folder before the task function (and a
# callback's on_job_start) runs, so the checks run at on_run_start / on_multirun_start. A finished run is one whose
# folder holds its metrics.json (w2sg.app.cli.run writes it once every stage is done). Checked here, before a run
# or a sweep, not in a sweep's jobs: a Slurm job that is requeued runs run_job again in its own folder (no
# metrics.json yet), without these callbacks.

def _or_exit(check: Callable[[], None]) -> None:
    """Run a folder check; a refusal ends the process with the usual one-line error and status 2. SystemExit, not
    an exception: Hydra turns a callback's exception into a warning and goes on to write into the folder."""
    try:
        check()
    except W2SGError as e:
        print(f"w2sg: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def _folder(config: Any, key: str) -> Optional[Path]:
    """The folder ``key`` names, resolved as Hydra resolves it next (the same config object: ${now:} and
    ${w2sg.run_id:} are cached in it, so both get the same folder); None when it does not resolve here (an
    interpolation of Hydra's runtime config, set only once the job runs): Hydra reports a bad one itself."""
    try:
        value = OmegaConf.select(config, key)
    except Exception:
        return None
    return None if value is None else Path(str(value))


def _check_writable(folder: Path, key: str) -> None:
    """Create the folder (Hydra would next) and check it can be written into."""
    import errno

    denied = os.strerror(errno.EACCES)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        reason = None if os.access(folder, os.W_OK | os.X_OK) else denied
    except OSError as e:
        reason = denied if e.errno in (errno.EACCES, errno.EPERM) else (e.strerror or str(e))
    if reason is None:
        return
    fix = ""
    if reason == denied:  # the folder, or the nearest one above it that exists, is not ours to write
        fix = f" (or make {next(p for p in (folder.absolute(), *folder.absolute().parents) if p.exists())} writable)"
    raise W2SGError(f"cannot write into the folder {folder} ({key}): {reason}; set {key} to a folder you can write "
                    f"to{fix}")


def check_run_folder(config: Any) -> None:
    """Refuse a run folder that holds a finished run (its metrics.json) or cannot be written. A folder without
    metrics.json is accepted: an interrupted or preempted run, resumed with the same command."""
    folder = _folder(config, "hydra.run.dir")
    if folder is None:
        return
    if (folder / "metrics.json").exists():
        raise W2SGError(f"the run folder {folder} (hydra.run.dir) holds a finished run ({folder / 'metrics.json'}); "
                        f"a run folder is never overwritten: set hydra.run.dir to a new folder, or move {folder} "
                        "away (the run's stages are in the store: a new run reuses them)")
    _check_writable(folder, "hydra.run.dir")


def check_sweep_folder(config: Any) -> None:
    """Refuse a sweep folder whose job folders hold finished runs, unless this multirun goes on with the unfinished
    sweep there: the same sweep (_same_sweep) with a job that started and did not finish (_unfinished_jobs), i.e. the
    same command after an interruption, a preemption or a failed job, or one with jobs not started yet (stopped
    between two jobs). Refuse an unwritable one."""
    folder = _folder(config, "hydra.sweep.dir")
    if folder is None:
        return
    finished = sorted(p.parent for p in folder.glob("**/metrics.json")) if folder.is_dir() else []
    if finished:
        same = _same_sweep(config, folder)
        if not (same and (_unfinished_jobs(config, folder, finished) or len(finished) < _sweep_jobs(config))):
            what = ("this sweep, finished (every job it started holds its metrics.json)" if same
                    else f"{len(finished)} finished run{'s' if len(finished) > 1 else ''} of another sweep")
            raise W2SGError(f"the sweep folder {folder} (hydra.sweep.dir) holds {what}, e.g. "
                            f"{finished[0] / 'metrics.json'}; a sweep folder is never overwritten: set "
                            f"hydra.sweep.dir to a new folder, or move {folder} away (finished stages are in the "
                            "store: a new sweep reuses them, and resumes interrupted ones from their checkpoints)")
    _check_writable(folder, "hydra.sweep.dir")


def _same_sweep(config: Any, folder: Path) -> bool:
    """Whether the sweep recorded in ``folder`` (its multirun.yaml, which Hydra's basic sweeper saves: w2sg's and the
    Slurm launcher's sweeps; not Optuna's, whose reruns start a new study) was started with the same command-line
    overrides as this one."""
    saved = folder / "multirun.yaml"
    if not saved.is_file():
        return False
    try:
        before = OmegaConf.to_container(OmegaConf.load(saved).hydra.overrides.task, resolve=False)
    except Exception:  # not a sweep's record we can read: not known to be this sweep
        return False
    return before == OmegaConf.to_container(config.hydra.overrides.task, resolve=False)


def _sweep_jobs(config: Any) -> int:
    """How many jobs this (basic) sweep has: its command-line overrides and its sweep config's ``hydra.sweeper.params``
    expanded as Hydra's basic sweeper does; 0 when that cannot be told."""
    from w2sg.app.config import sweep_jobs

    try:
        params = OmegaConf.select(config, "hydra.sweeper.params", default=None)
        params = OmegaConf.to_container(params, resolve=False) if params else {}
        return len(sweep_jobs(params, OmegaConf.to_container(config.hydra.overrides.task, resolve=False)))
    except Exception:  # a sweep this expansion does not know: only the started jobs tell
        return 0


def _unfinished_jobs(config: Any, folder: Path, finished: List[Path]) -> List[Path]:
    """Job folders in ``folder`` that a job started (Hydra saved its record, .hydra/, there) and did not finish."""
    subdir = OmegaConf.select(config, "hydra.output_subdir", default=None)
    if not subdir:
        return []  # no record of the started jobs
    started = {p.parent for p in folder.glob(f"**/{subdir}") if p.is_dir()}
    return sorted(started - set(finished))
