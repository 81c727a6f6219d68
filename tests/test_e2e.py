"""Tiny end-to-end runs through the real entrypoint, and one clear message for each kind of bad input."""

import json

import pytest
from helpers import (
    TINY,
    check_results,
    metrics_files,
    run_config,
    run_w2sg,
    task_test_labels,
)


def test_tiny_run_writes_metrics_and_config(tmp_path, store):
    proc = run_w2sg(TINY, tmp_path)
    [m] = metrics_files(tmp_path)
    assert (m["task"], m["loss"], m["seed"]) == ("tweet_sentiment", "xent", 0)
    assert m["weak"] == {"model": "tiny_random", "params": 1002882, "size": "tiny"}
    assert m["strong"]["model"] == "tiny_random_l2" and m["strong"]["params"] == 1530194
    check_results(m, store, task_test_labels(run_config(m)))
    assert set(m["stages"]) == {"weak", "weak_labels", "ceiling", "w2s"}
    assert all(not s["reused"] and len(s["key"]) == 24 for s in m["stages"].values())
    out = tmp_path / m["output_dir"]
    assert (out / ".hydra" / "config.yaml").exists(), "Hydra saves the resolved config beside metrics.json"
    assert "acc w2s" in proc.stdout and "PGR" in proc.stdout


def test_rerun_reuses_every_stage_and_gives_the_same_metrics(tmp_path, warm_store):
    first = warm_store  # the first run's metrics (its stages are in the test's store)
    [second] = run_w2sg(TINY, tmp_path).metrics
    assert all(s["reused"] for s in second["stages"].values())
    assert first["acc"] == second["acc"] and first["pgr"] == second["pgr"]


def test_changing_the_loss_retrains_only_w2s(tmp_path, warm_store):  # the store of a first run (TINY)
    [second] = run_w2sg(TINY + ["loss=logconf"], tmp_path).metrics
    assert {k for k, s in second["stages"].items() if not s["reused"]} == {"w2s"}
    assert second["loss"] == "logconf"


def test_bootstrap_chain_end_to_end(tmp_path, store):
    proc = run_w2sg(["chain=tiny", "train=full", "train.epochs=1", "task.n_train=64", "task.n_test=32", "progress=false"], tmp_path)
    [m] = metrics_files(tmp_path)
    ch = m["chain"]
    assert ch["models"] == ["tiny_random", "tiny_random_l2", "tiny_random_l3"]
    assert [(l["teacher"], l["student"]) for l in ch["links"]] == [
        ("tiny_random", "tiny_random_l2"), ("tiny_random_l2", "tiny_random_l3")]
    assert ch["links"][0]["teacher_acc"] == m["acc"]["weak"]
    assert ch["links"][1]["teacher_acc"] == ch["links"][0]["acc"]
    assert ch["end_to_end"]["acc"] == ch["links"][-1]["acc"]
    assert ch["direct"]["acc"] == m["acc"]["w2s"]
    assert ch["bootstrap_minus_direct"] == pytest.approx(ch["end_to_end"]["acc"] - ch["direct"]["acc"])
    # the direct run is the plain weak -> strong experiment: the same stage as w2s of pair (first, last)
    assert {"link1", "link2", "ceiling1", "link1_labels"} <= set(m["stages"])
    assert "chain end-to-end" in proc.stdout and "direct" in proc.stdout


# --- bad input: one clear message, non-zero exit, no traceback wall -----------------------------------------


def _no_traceback(proc):
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr


def test_unknown_task_lists_valid_tasks(tmp_path, store):
    proc = run_w2sg(["task=nope"], tmp_path, check=False)
    assert proc.returncode != 0
    assert "Could not find 'task/nope'" in proc.stderr
    for t in ("tweet_sentiment", "sciq", "boolq", "cosmos_qa", "amazon_polarity", "anthropic_hh"):
        assert t in proc.stderr
    _no_traceback(proc)


def test_misspelt_key(tmp_path, store):
    proc = run_w2sg(["train.epoch=1"], tmp_path, check=False)
    assert proc.returncode != 0 and "train.epoch" in proc.stderr
    _no_traceback(proc)


def test_missing_model_path(tmp_path, store):
    # in a subprocess: the exit status and stderr of a real process on a W2SGError
    proc = run_w2sg(TINY + ["weak.path=/no/such/model", "weak.random_init=null"], tmp_path, check=False,
                    subprocess=True)
    assert proc.returncode == 2
    assert "model 'tiny_random': path '/no/such/model' does not exist" in proc.stderr
    _no_traceback(proc)


def test_data_set_not_available_offline(tmp_path, store):
    proc = run_w2sg(TINY + ["task=sciq"], tmp_path, check=False)
    assert proc.returncode == 2
    assert "cannot load split 'train' of data set 'allenai/sciq'" in proc.stderr
    _no_traceback(proc)


def test_nan_loss_is_reported_and_finished_stages_are_kept(tmp_path, warm_store):  # weak, labels and ceiling finished
    proc = run_w2sg(TINY + ["loss=product", "loss.alpha=-1e30"], tmp_path, check=False)
    assert proc.returncode == 2
    assert "w2s:tiny_random->tiny_random_l2: loss became nan" in proc.stderr
    _no_traceback(proc)
    # nothing finished was lost: a corrected rerun reuses weak, labels and ceiling
    [last] = run_w2sg(TINY + ["loss=product"], tmp_path).metrics
    assert {k for k, s in last["stages"].items() if not s["reused"]} == {"w2s"}


def test_grid_sweep_trains_each_weak_and_ceiling_once(tmp_path, store):
    """w2sg -m over a 2x2 grid: 2 weak + 2 ceiling + 4 w2s trainings, not 3 per pair."""
    run_w2sg(["-m", "sweep=tiny_grid"], tmp_path)
    runs = [json.loads(p.read_text()) for p in (tmp_path / "multirun").glob("**/metrics.json")]
    assert len(runs) == 4
    pairs = {(m["weak"]["model"], m["strong"]["model"]) for m in runs}
    assert pairs == {(w, s) for w in ("tiny_random", "tiny_random_l2") for s in ("tiny_random_l3", "tiny_random_l4")}
    trained = [(k, s["key"]) for m in runs for k, s in m["stages"].items() if not s["reused"] and k != "weak_labels"]
    assert sorted(k for k, _ in trained) == ["ceiling"] * 2 + ["w2s"] * 4 + ["weak"] * 2
    assert len({key for _, key in trained}) == 8
