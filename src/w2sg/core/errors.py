"""The exceptions users meet: ``W2SGError`` for a problem with their input (its message names the bad value and the
valid ones), ``Preempted`` for a run stopped by a signal after saving a checkpoint."""

from __future__ import annotations

from typing import Optional


class W2SGError(Exception):
    """A problem with the user's input (config, data, model path) or a run that cannot go on (NaN loss)."""


class Preempted(Exception):
    """Raised after a checkpoint was saved because SIGTERM/SIGUSR1 asked the process to stop (``scancel``, a
    preemption, a time limit) or SIGINT did (Ctrl-C). It survives pickling, so a Slurm job's result carries it back to the launcher."""

    def __init__(self, signum: int, step: int, stage: str = "", checkpoint: Optional[str] = None):
        self.signum, self.step, self.stage, self.checkpoint = signum, step, stage, checkpoint
        where = f"{stage} " if stage else ""
        super().__init__(f"{where}stopped by {self.signal_name} at step {step}; checkpoint saved")

    @property
    def signal_name(self) -> str:
        import signal

        try:
            return signal.Signals(self.signum).name
        except ValueError:
            return f"signal {self.signum}"

    def __reduce__(self):
        return type(self), (self.signum, self.step, self.stage, self.checkpoint)
