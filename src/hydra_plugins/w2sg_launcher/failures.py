"""What the launcher says about a sweep's jobs that failed or were cancelled/preempted: the line of each job
(its Slurm id, exception line or where it stopped, its log) and the first line of the sweep's failure report."""

from typing import Any, Optional, Sequence, Tuple

from hydra.core.utils import JobReturn

from w2sg.app import hydra_compat
from w2sg.app.hydra_compat import filter_overrides


def error_line(error: str) -> str:
    """The line that says what went wrong: the exception line of a traceback (submitit's FailedJobError), else the
    first line (a Hydra job's own exception)."""
    lines = [ln.strip() for ln in error.splitlines() if ln.strip()]
    if "Traceback (most recent call last):" in lines:
        end = next((i for i, ln in enumerate(lines) if ln.startswith("You can check full logs")), len(lines))
        return next(ln for ln in reversed(lines[:end]) if ln.strip("-"))  # the trace ends above a line of dashes
    return lines[0] if lines else "failed"


def stopped_line(e: Any) -> str:
    """What a job's Preempted says: where it stopped, where its checkpoint is, how to resume."""
    saved = f"its checkpoint is saved ({e.checkpoint})" if e.checkpoint else "its checkpoint is saved"
    return (f"cancelled or preempted ({e.signal_name}) at step {e.step} of {e.stage or 'a training stage'}; "
            f"{saved}: rerun the sweep to resume it from there")


def summary(failed: int, stopped: int, total: int, shared_failed: int, shared_total: int) -> str:
    """The first line of a sweep's failure report."""
    parts = [f"{failed} of {total} jobs failed"] if failed or not stopped else []
    if stopped:
        parts.append(f"{stopped} of {total} jobs were cancelled or preempted")
    head = " and ".join(parts)
    if shared_failed:
        head += f" ({shared_failed} of {shared_total} shared-stage jobs failed)"
    return (f"{head}; the others finished and their stages are stored (rerun the same command to resume or retry "
            "only what is missing):")


def job_failure(job: Any) -> Tuple[Optional[JobReturn], Optional[str], bool]:
    """Wait for a job (or one experiment of a pack, PackMember): (its JobReturn or None, None if it succeeded
    else the line saying what went wrong, whether it was stopped by a signal after saving a checkpoint:
    cancelled or preempted, not failed)."""
    from w2sg.core.errors import Preempted

    try:
        ret = job.results()[0]
    except Exception as e:  # submitit raises for a job that crashed, was killed or cancelled
        return None, error_line(str(e)), False
    error = hydra_compat.job_error(ret)  # the job's own exception, caught by Hydra (None: it succeeded)
    if error is not None:
        if isinstance(error, Preempted):
            return ret, stopped_line(error), True
        return ret, error_line(str(error)), False
    return ret, None, False


def job_title(idx: int, overrides: Sequence[str], job: Any) -> str:
    """How a failure line names an experiment's job: its number, overrides, Slurm id (and pack)."""
    what = f"  job #{idx} ({' '.join(filter_overrides(overrides))}), Slurm id {job.job_id}"
    if hasattr(job, "idxs"):  # a PackMember (by duck type: Hydra's plugin scan may import its module anew)
        what += f" ({job.describe()})"
    return what


def shared_failure(labels: str, job: Any, error: str) -> str:
    """The failure line of a shared-stage job."""
    return f"  shared stages {labels}, Slurm id {job.job_id}: {error}\n    log: {job.paths.stderr}"


def not_run(what: str, whose: str, job_id: str, labels: str, log: Any) -> str:
    """The line of a job Slurm cancels because the shared-stage job ``job_id`` it waits for failed."""
    return f"{what}: not run: {whose} shared-stage job {job_id} ({labels}) failed\n    log: {log}"


def job_failed(what: str, error: str, job: Any) -> str:
    """The failure line of an experiment's job: what went wrong, and its log."""
    return f"{what}: {error}\n    log: {job.paths.stderr}"
