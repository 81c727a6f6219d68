import json
import os
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

# No hub look-ups in tests (they hang for tens of seconds before failing without a network).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
FIXTURES = ROOT / "tests" / "fixtures"
# tiny, fast settings for end-to-end runs
TINY = ["pair=tiny", "train.epochs=1", "task.n_train=64", "task.n_test=32", "progress=false"]


def compose(overrides: List[str] = ()):
    from w2sg.status import compose as w2sg_compose

    return w2sg_compose(overrides, conf_dir=CONF)


def fixture_task(task: str) -> List[str]:
    """Overrides that point a hub task at the local fixture files of the same format."""
    d = FIXTURES / task
    test_split = compose([f"task={task}"]).task.splits["test"]  # files are keyed by the data set's split names
    return [f"task={task}", "task.dataset=json",
            f"task.data_files={{train: {d / 'train.jsonl'}, {test_split}: {d / 'test.jsonl'}}}"]


@pytest.fixture
def store(tmp_path, monkeypatch):
    path = tmp_path / "store"
    monkeypatch.setenv("W2SG_STORE", str(path))
    return path


def run_w2sg(args: List[str], cwd: Path, env_extra=None, check=True) -> subprocess.CompletedProcess:
    """Run the real entrypoint in a subprocess (as a user would), Hydra output under cwd."""
    env = dict(os.environ, **(env_extra or {}))
    proc = subprocess.run([sys.executable, "-m", "w2sg", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"w2sg {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def metrics_files(cwd: Path) -> List[dict]:
    return [json.loads(p.read_text()) for p in sorted((cwd / "outputs").glob("**/metrics.json"), key=os.path.getmtime)]
