"""Shared test helpers: paths, tiny settings, running the entrypoint, and checking a run's numbers.

Imported by the tests as ``from helpers import ...`` (tests/ is on sys.path: ``pythonpath`` in pyproject.toml).
Fixtures and hooks live in conftest.py.
"""

import json
import os
import subprocess
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
    from w2sg.app.status import compose as w2sg_compose

    return w2sg_compose(overrides, conf_dir=CONF)


def compose(overrides: List[str] = ()):
    """The typed config every layer below the entry receives (w2sg.app.config.resolve of Hydra's)."""
    from w2sg.app.config import resolve

    return resolve(compose_raw(overrides))


def fixture_task(task: str) -> List[str]:
    """Overrides that point a hub task at the local fixture files of the same format."""
    d = FIXTURES / task
    test_split = compose([f"task={task}"]).task.splits["test"]  # files are keyed by the data set's split names
    return [f"task={task}", "task.dataset=json",
            f"task.data_files={{train: {d / 'train.jsonl'}, {test_split}: {d / 'test.jsonl'}}}"]


class Run(subprocess.CompletedProcess):
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
        proc = subprocess.run(cmd, capture_output=True, text=True)
        parts.append(f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
    for log in sorted(cwd.glob("multirun/**/.submitit/*/*_log.*")):
        parts.append(f"--- {log} (last lines)\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:]))
    return "\n" + "\n".join(parts)


def run_w2sg(args: List[str], cwd: Path, env_extra=None, check=True) -> Run:
    """Run the real entrypoint in a subprocess (as a user would), Hydra output under cwd."""
    env = dict(os.environ, **(env_extra or {}))
    before = set(_metrics_paths(cwd))
    try:
        proc = subprocess.run([sys.executable, "-m", "w2sg", *args], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=900)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"w2sg {' '.join(args)} did not finish in {e.timeout:.0f} s:\n{_text(e.stdout)}\n"
                             f"{_text(e.stderr)}{_slurm_state(cwd)}") from None
    if check and proc.returncode != 0:
        raise AssertionError(f"w2sg {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    run = Run(proc.args, proc.returncode, proc.stdout, proc.stderr)
    run.metrics = [json.loads(p.read_text()) for p in _metrics_paths(cwd) if p not in before]
    return run


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

