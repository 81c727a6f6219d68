import os

import pytest

pytest.register_assert_rewrite("helpers")  # failed asserts in the shared checks show their values too

# No hub look-ups in tests (they hang for tens of seconds before failing without a network).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["TOKENIZERS_PARALLELISM"] = "false"


@pytest.fixture
def store(tmp_path, monkeypatch):
    path = tmp_path / "store"
    monkeypatch.setenv("W2SG_STORE", str(path))
    return path
