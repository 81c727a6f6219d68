"""The store's weights: LoRA adapters only, full finetunes in the compute dtype, store.keep_weights, w2sg gc."""

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import walked_sizes
from safetensors.torch import load_file

from w2sg.app.config import compose, resolve
from w2sg.core.errors import W2SGError
from w2sg.core.store import FREED, Store
from w2sg.run import experiment
from w2sg.run.runner import Runner

CONF = Path(__file__).resolve().parents[1] / "conf"
TINY = ["pair=tiny", "train=full", "train.epochs=1", "task.n_train=64", "task.n_test=32", "progress=false", "logger=none"]


def run(store_dir, *overrides):
    cfg = resolve(compose(TINY + [f"store_dir={store_dir}", *overrides], conf_dir=CONF))
    runner = Runner(cfg, Store(cfg.store_dir))
    return experiment.run(cfg, runner), runner


def stage_dir(store_dir, metrics, name) -> Path:
    return Path(store_dir) / "stages" / metrics["stages"][name]["key"]


def labels(store_dir, metrics):
    return np.load(stage_dir(store_dir, metrics, "weak_labels") / "probs.npy")


def test_lora_stores_adapters_only_and_labels_from_them_equal_the_merged_models(tmp_path):
    lora = ["train=lora", "train.lora.rank=2", "store.keep_weights=all"]
    first, _ = run(tmp_path / "s", *lora)
    weak = stage_dir(tmp_path / "s", first, "weak")
    assert not (weak / "model.safetensors").exists()
    adapter = load_file(str(weak / "adapter.safetensors"))
    assert adapter and all("lora_" in k or k.startswith("head.") for k in adapter), "adapters and head only"
    params = (weak / "metrics.json").read_text().split('"params": ')[1].split(",")[0]
    assert (weak / "adapter.safetensors").stat().st_size < int(params) * 4 / 5, "a fraction of the merged model"
    merged = labels(tmp_path / "s", first)  # computed from the merged model in memory, as before
    again, _ = run(tmp_path / "s", *lora, "recompute=[weak_labels]")  # a new process: rebuilt from the adapters
    assert np.array_equal(labels(tmp_path / "s", again), merged)


def test_keep_weights_needed_frees_the_weak_weights_once_labels_are_stored_and_retrains_them_when_needed(
        tmp_path, caplog):
    store_dir = tmp_path / "s"
    first, _ = run(store_dir)
    weak = stage_dir(store_dir, first, "weak")
    assert not (weak / "model.safetensors").exists() and (weak / FREED).exists()
    assert (weak / "test_probs.npy").exists() and Store(store_dir).status(first["stages"]["weak"]["key"]) == "done"
    for kept in ("ceiling", "w2s"):  # nothing has read them yet: a later run may use them as teachers
        assert (stage_dir(store_dir, first, kept) / "model.safetensors").exists()
    before = labels(store_dir, first)
    with caplog.at_level(logging.WARNING, logger="w2sg.run.runner"):
        again, _ = run(store_dir, "recompute=[weak_labels]")
    assert "weights were freed" in caplog.text
    assert np.array_equal(labels(store_dir, again), before), "labels of the retrained model are the stored ones"
    assert again["acc"] == first["acc"]
    assert (weak / FREED).exists(), "freed again after the run (needed)"


def test_retrained_weights_that_predict_differently_are_an_error(tmp_path):
    store_dir = tmp_path / "s"
    first, _ = run(store_dir)
    probs = stage_dir(store_dir, first, "weak") / "test_probs.npy"
    np.save(probs, np.load(probs)[:, ::-1])  # as if training were not reproducible
    Store(store_dir)._update_sizes(first["stages"]["weak"]["key"])  # recorded so: the stage is not damaged
    with pytest.raises(W2SGError, match="predicts differently.*recompute="):
        run(store_dir, "recompute=[weak_labels]")
    assert (stage_dir(store_dir, first, "weak") / FREED).exists(), "nothing put back"


def test_keep_weights_all_and_none_and_a_bad_value(tmp_path):
    kept, _ = run(tmp_path / "a", "store.keep_weights=all")
    assert all((stage_dir(tmp_path / "a", kept, n) / "model.safetensors").exists() for n in ("weak", "ceiling", "w2s"))
    none, _ = run(tmp_path / "n", "store.keep_weights=none")
    assert not any((stage_dir(tmp_path / "n", none, n) / "model.safetensors").exists()
                   for n in ("weak", "ceiling", "w2s"))
    assert kept["stages"]["weak"]["key"] == none["stages"]["weak"]["key"], "the policy is not part of any key"
    with pytest.raises(W2SGError, match="store.keep_weights: unknown value 'some'; valid: needed, all, none"):
        run(tmp_path / "x", "store.keep_weights=some")


def test_gc_frees_weights_no_stage_needs_and_reports_the_bytes(tmp_path, capsys):
    from w2sg.app.gc import main as gc
    from w2sg.app.status import store_size_line

    store_dir = tmp_path / "s"
    metrics, _ = run(store_dir, "store.keep_weights=all")
    weak = stage_dir(store_dir, metrics, "weak") / "model.safetensors"
    size = weak.stat().st_size
    assert gc(["--dry-run", "--store", str(store_dir)]) == 0
    out = capsys.readouterr().out
    assert f"would free {size} bytes" in out.replace("(", "").replace(")", "") or f"({size} bytes)" in out
    assert weak.exists(), "a dry run frees nothing"
    line = store_size_line(Store(store_dir))
    assert line.startswith("store size: ") and "of which weights" in line and "freed" not in line.split("(")[0]
    assert Store(store_dir).sizes() == walked_sizes(store_dir)  # read from the DONE markers, equal to measuring
    assert gc(["--store", str(store_dir)]) == 0
    assert f"({size} bytes) of weights of 1 stages" in capsys.readouterr().out
    assert not weak.exists() and (weak.parent / "test_probs.npy").exists()
    for kept in ("ceiling", "w2s"):
        assert (stage_dir(store_dir, metrics, kept) / "model.safetensors").exists()
    assert "weights of 1 stages freed" in store_size_line(Store(store_dir))
    assert Store(store_dir).sizes() == walked_sizes(store_dir)
    assert gc(["--store", str(store_dir)]) == 0 and "freed 0 B (0 bytes)" in capsys.readouterr().out
    again, _ = run(store_dir, "store.keep_weights=all")
    assert again["acc"] == metrics["acc"] and all(s["reused"] for s in again["stages"].values())


def test_full_finetune_in_bf16_stores_bf16_and_labels_do_not_depend_on_where_they_are_computed(tmp_path):
    bf16 = ["train.precision=bf16", "store.keep_weights=all"]
    first, _ = run(tmp_path / "s", *bf16)
    state = load_file(str(stage_dir(tmp_path / "s", first, "weak") / "model.safetensors"))
    backbone = {v.dtype for k, v in state.items() if k.startswith("backbone.") and v.is_floating_point()}
    assert backbone == {torch.bfloat16}
    in_memory = labels(tmp_path / "s", first)
    again, _ = run(tmp_path / "s", *bf16, "recompute=[weak_labels]")
    assert np.array_equal(labels(tmp_path / "s", again), in_memory)
