"""Weights & Biases tracking: one W&B run per stage, its id derived from the stage key, and one small run per
experiment (job_type ``experiment``: the weak / ceiling / w2s accuracies and PGR, no history).

``resume="allow"`` with that id makes reruns and Slurm requeues continue the same run instead of creating
duplicates. A stage's run is opened only while that stage computes, and an experiment's run only when this
process computed one of its stages or the W&B folder holds no run for it yet: a rerun that reuses every stage
writes no run folder. The PGR never goes into a stage's run, so syncing an experiment's run (which replaces a
run with the same id, see docs/wandb.md) cannot touch any training history.

Mode: ``logger.mode`` if set, else ``WANDB_MODE``, else ``online`` when credentials exist and ``offline``
otherwise. An online mode without credentials is reported once and logs offline instead (``wandb sync`` uploads it
later): W&B itself would ask for an API key at a terminal, reading stdin (a run without input then aborts), and fail
elsewhere; which credentials exist is W&B's own answer (has_credentials), asked before the first run opens. Any
W&B failure is reported once and tracking switches off: science goes on, and the local metrics.json files are
written whatever happens here.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, Optional, Tuple

log = logging.getLogger(__name__)


ONLINE_MODES = ("online", "run", "shared")  # W&B's modes that talk to its server, and so need credentials


def configured_mode(configured: Optional[str]) -> Tuple[Optional[str], str]:
    """(mode, where it was set): ``logger.mode`` if set, else ``WANDB_MODE``; (None, "") when neither is (the
    credentials decide, see Tracker._run_mode)."""
    if configured:
        return configured, "logger.mode"
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"], "WANDB_MODE"
    return None, ""


def has_credentials() -> bool:
    """Whether W&B finds credentials for its server (WANDB_BASE_URL's) without asking for them: WANDB_API_KEY,
    ~/.netrc (which `wandb login` writes), its settings file, an identity token (wandb >= 0.30). W&B's own lookup:
    ``wandb.login(prompt=False)`` from wandb 0.30 on (its advice for checking without a prompt), ``wandb.api.api_key``
    before (the same lookup, deprecated since 0.30). Neither prompts nor reads stdin."""
    import inspect

    import wandb

    if "prompt" in inspect.signature(wandb.login).parameters:
        # silent: found credentials are neither announced nor sent to the server to name their account; online:
        # login() answers False, unasked, while W&B's process-wide mode (WANDB_MODE) is offline
        wandb.setup(wandb.Settings(silent=True, mode="online"))
        return bool(wandb.login(prompt=False, verify=False))
    return bool(wandb.api.api_key)


def _teardown_quietly() -> None:
    """Close the connection to W&B's service process after a failure (e.g. a cancelled Slurm job: the service got
    the same SIGTERM and is gone), so that W&B's exit hook does not print a traceback of the same failure."""
    try:
        import wandb

        wandb.teardown()
    except Exception:
        pass


class StageRun:
    """What a stage writes to its W&B run; every call is a no-op once tracking has failed."""

    def __init__(self, tracker: "Tracker", run: Any):
        self._tracker, self._run = tracker, run

    def log(self, data: Dict[str, Any], step: Optional[int] = None) -> None:
        self._tracker._call(lambda: self._run.log(data, step=step) if self._run else None)

    def summary(self, data: Dict[str, Any]) -> None:
        self._tracker._call(lambda: self._run.summary.update(data) if self._run else None)


def _reinit() -> Any:
    """Finish any run still open before starting the next: ``"finish_previous"`` from wandb 0.19.10 on (where
    ``True`` is deprecated), ``True`` before (where the string is refused)."""
    from importlib.metadata import version

    from packaging.version import Version

    return "finish_previous" if Version(version("wandb")) >= Version("0.19.10") else True


class Tracker:
    def __init__(self, logger_cfg: Any, group: Optional[str]):
        self.cfg = logger_cfg  # a LoggerConfig (w2sg.core.config)
        self.enabled = bool(logger_cfg is not None and self._opt("enabled", True))
        # None: credentials decide, at the first run (_run_mode)
        self.mode, self._mode_source = configured_mode(self._opt("mode")) if self.enabled else ("disabled", "")
        if self.mode == "disabled":
            self.enabled = False
        self.group = self._opt("group") or group if self.enabled else None
        self._failed = False
        self._mode_checked = False

    def _opt(self, name: str, default: Any = None) -> Any:
        """A logger setting (``default`` when it is not set)."""
        value = getattr(self.cfg, name, None)
        return default if value is None else value

    def _run_mode(self) -> str:
        """The mode of this tracker's runs, settled before its first run opens (and so only when one does): an unset
        mode is online with credentials and offline without; an online one without credentials is warned about,
        once, and offline too, so that W&B never asks for an API key."""
        if not self._mode_checked:
            self._mode_checked = True
            if self.mode is None or self.mode in ONLINE_MODES:
                if has_credentials():
                    self.mode = self.mode or "online"
                else:
                    if self.mode is not None:
                        log.warning("W&B: %s=%s needs an API key and none was found (WANDB_API_KEY, ~/.netrc from "
                                    "`wandb login`, W&B's settings file); logging offline instead (`wandb sync` "
                                    "uploads it later). To log online set WANDB_API_KEY or run `wandb login`; "
                                    "logger.mode=offline logs offline without this warning",
                                    self._mode_source, self.mode)
                    self.mode = "offline"
        return self.mode

    def _call(self, fn) -> Any:
        if not self.enabled or self._failed:
            return None
        try:
            return fn()
        except Exception as e:  # W&B must never fail an experiment
            self._failed = True
            log.warning("W&B tracking failed (%s: %s); the experiment goes on without it, metrics.json is kept",
                        type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            _teardown_quietly()
            return None

    def _init(self, key: str, name: str, job_type: str, config: Dict[str, Any]):
        import wandb

        folder = self._opt("dir")
        if folder:  # wandb before 0.18 writes into the system's temp folder when logger.dir does not exist yet
            Path(folder).expanduser().mkdir(parents=True, exist_ok=True)
        return wandb.init(
            project=self.cfg.project, entity=self._opt("entity"), id=key, name=name, resume="allow",
            group=self.group, job_type=job_type, config=config, tags=list(self._opt("tags") or []),
            mode=self._run_mode(), dir=folder, reinit=_reinit(),
            settings=wandb.Settings(silent=True, init_timeout=float(self._opt("init_timeout", 60))),
        )

    @contextmanager
    def stage_run(self, key: str, name: str, job_type: str, config: Dict[str, Any]) -> Iterator[StageRun]:
        run = self._call(lambda: self._init(key, name, job_type, config))
        try:
            yield StageRun(self, run)
        finally:
            if run is not None:
                self._call(run.finish)

    def has_local_run(self, run_id: str) -> bool:
        """Whether W&B's folder (``<logger.dir or $WANDB_DIR or .>/wandb``, or ``.wandb``) holds a run folder
        (offline or online) with this id."""
        root = Path(self._opt("dir") or os.environ.get("WANDB_DIR") or ".").expanduser()
        return any(p.is_dir() for sub in ("wandb", ".wandb") for p in (root / sub).glob(f"*run-*-{run_id}"))

    def experiment_run(self, run_id: str, name: str, config: Dict[str, Any], summary: Dict[str, Any],
                       computed: bool) -> bool:
        """The experiment's own run (config and summary only), written when ``computed`` (this process computed
        one of its stages: the numbers may be new) or when none exists yet; True when written."""
        if not self.enabled or (not computed and self.has_local_run(run_id)):
            return False
        with self.stage_run(run_id, name, "experiment", config) as run:
            run.summary(summary)
        return run._run is not None


def experiment_run_id(stage_keys: Iterable[str]) -> str:
    """An experiment's W&B run id: a hash of its stages' keys (which hold every setting and the seed), the id of
    its record in the store too (w2sg.core.store.experiment_id)."""
    from w2sg.core.store import experiment_id

    return experiment_id(stage_keys)
