"""The W&B summary of a sweep: one W&B run per sweep invocation (job_type ``sweep_summary``, grouped by the
sweep's name) with the report's results and summary tables, median PGR / accuracy vs strong size as W&B line
plots, and the report's PNGs.

It logs through a tracker the caller makes (w2sg.run.tracking.Tracker: the Hydra callback in w2sg.app.callback
builds it from the run's logger config), so the results package does not reach into the run machinery.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Dict

from w2sg.results.collect import result_columns


def sweep_run_id(sweep_dir: Path) -> str:
    """The sweep summary's W&B run id, from the sweep folder's absolute path: the same folder logs to the same run."""
    return "sweep-" + hashlib.sha256(str(Path(sweep_dir).resolve()).encode()).hexdigest()[:16]


def log_sweep(tracker: Any, group: str, report: Dict[str, Any], sweep_dir: Path) -> None:
    """Log a report (w2sg.results.report.write_report's result) of ``sweep_dir`` to its W&B run, through ``tracker``
    (a w2sg.run.tracking.Tracker); nothing when tracking is off or the report has no rows."""
    import wandb

    if not tracker.enabled or not report["rows"]:
        return
    where = str(Path(sweep_dir).resolve())
    config = {"sweep": group, "sweep_dir": where}
    with tracker.stage_run(sweep_run_id(sweep_dir), f"sweep {group} ({Path(sweep_dir).name})", "sweep_summary",
                           config) as run:
        def log_all() -> None:
            columns = result_columns(report["rows"])
            table = wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in report["rows"]])
            summary_cols = list(report["summary"][0].keys())
            summ = wandb.Table(columns=summary_cols, data=[[s[c] for c in summary_cols] for s in report["summary"]])
            run._run.log({
                "results": table, "summary": summ,
                "pgr_vs_strong_size": wandb.plot.line(summ, "strong_params", "pgr_median", stroke="weak",
                                                      title="median PGR vs strong size (per weak model)"),
                "pgr_vs_strong_size_by_loss": wandb.plot.line(summ, "strong_params", "pgr_median", stroke="loss",
                                                              title="median PGR vs strong size (per loss)"),
                "w2s_acc_vs_strong_size": wandb.plot.line(summ, "strong_params", "acc_w2s_median", stroke="weak",
                                                          title="w2s accuracy vs strong size"),
                **{f"png/{p.stem}": wandb.Image(str(p)) for p in report["files"] if p.suffix == ".png"},
            })

        if run._run is not None:
            tracker._call(log_all)
