"""Faults a store meets: damaged stage files and checkpoints (set aside, computed again), a full disk (a message
saying so, nothing left behind, ``gc`` that works), temporary files of killed processes (reported, removed), a run
waiting for another process's stage (says for whom)."""

import json
import logging
import os
import shutil
import subprocess
import threading
import time

import numpy as np
import pytest
from helpers import TINY, run_w2sg

from w2sg.core.errors import W2SGError
from w2sg.core.store import Store

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _keys(m):
    return {name: s["key"] for name, s in m["stages"].items()}


def _status(tmp_path):
    return run_w2sg(["status"], tmp_path).stdout


def test_damaged_stage_files_are_found_set_aside_and_recomputed(tmp_path, store, warm_store):
    m = warm_store
    keys = _keys(m)
    stages = store / "stages"
    (stages / keys["w2s"] / "test_probs.npy").write_bytes(b"")  # emptied
    (stages / keys["weak_labels"] / "probs.npy").unlink()  # deleted
    weights = stages / keys["ceiling"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    metrics = stages / keys["weak"] / "metrics.json"  # same size, other content: the CRC-32 sees it
    text = metrics.read_text()
    metrics.write_text(text.replace('"acc": 0.', '"acc": 1.', 1))
    assert metrics.read_text() != text and len(metrics.read_text()) == len(text)

    s = Store(store)
    assert s.status(keys["w2s"]).startswith("damaged: test_probs.npy has 0 bytes, ")
    assert s.status(keys["weak_labels"]) == "damaged: probs.npy is missing"
    assert s.status(keys["ceiling"]).startswith("damaged: model.safetensors has")
    assert s.status(keys["weak"]) == "damaged: metrics.json has changed since it was stored (CRC-32 differs)"
    listed = _status(tmp_path)  # sizes only: three of them are seen without reading any file
    assert "3 damaged" in listed and "probs.npy is missing" in listed

    proc = run_w2sg(TINY + ["logger=none"], tmp_path)
    [again] = proc.metrics
    for name in ("w2s", "weak_labels", "ceiling", "weak"):
        assert f"stage {keys[name]} (" in proc.stdout and "set aside in" in proc.stdout, name
        assert not again["stages"][name]["reused"], name
    assert again["acc"] == m["acc"] and again["pgr"] == m["pgr"]
    assert {k: s.status(k) for k in keys.values()} == {k: "done" for k in keys.values()}
    damaged = sorted(p.name.split(".")[0] for p in (store / "damaged").iterdir())
    assert damaged == sorted(keys.values())  # moved, not deleted
    assert "4 damaged stages, checkpoints or feature chunks set aside" in _status(tmp_path)


def test_a_stage_stored_without_file_records_that_cannot_be_read_is_named_and_set_aside(tmp_path, store, warm_store):
    m = warm_store
    key = _keys(m)["w2s"]
    done = store / "stages" / key / "DONE"
    marker = json.loads(done.read_text())
    marker.pop("files")  # as stages stored before file records were
    done.write_text(json.dumps(marker))
    (store / "stages" / key / "test_probs.npy").write_bytes(b"")
    proc = run_w2sg(TINY + ["logger=none"], tmp_path, check=False)
    assert proc.returncode == 2
    assert f"stored stage {key} is damaged: {store / 'stages' / key / 'test_probs.npy'} cannot be read" in proc.stderr
    assert "rerun of the same command" in proc.stderr and "Traceback" not in proc.stderr
    assert not (store / "stages" / key).exists() and len(list((store / "damaged").iterdir())) == 1
    [again] = run_w2sg(TINY + ["logger=none"], tmp_path).metrics
    assert again["acc"] == m["acc"] and not again["stages"]["w2s"]["reused"]


def test_a_corrupt_checkpoint_is_set_aside_and_training_starts_afresh(tmp_path, store, warm_store):
    m = warm_store
    key = _keys(m)["ceiling"]
    shutil.rmtree(store / "stages" / key)
    ckpt = Store(store).checkpoint_path(key)
    ckpt.write_bytes(b"PK\x03\x04 truncated zip")  # what a killed copy or a full disk leaves
    proc = run_w2sg(TINY + ["logger=none"], tmp_path)
    assert f"checkpoint {ckpt} cannot be read" in proc.stdout and "training starts from the beginning" in proc.stdout
    [again] = proc.metrics
    assert again["acc"] == m["acc"] and not again["stages"]["ceiling"]["reused"]
    [moved] = (store / "damaged").iterdir()
    assert moved.name.startswith(f"{key}-checkpoint.pt.") and moved.read_bytes() == b"PK\x03\x04 truncated zip"


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB filesystem (tmpfs), mounted for the test; skipped where mounting is not allowed (not root)."""
    path = tmp_path / "small"
    path.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(path)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small filesystem needs root")
    yield path
    subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(folder, leave=0):
    """Fill the filesystem of ``folder`` up to ``leave`` bytes free."""
    free = shutil.disk_usage(folder).free - leave
    with open(folder / "filler", "wb") as f:
        try:
            f.write(b"\0" * max(free, 0))
        except OSError:
            pass
    return folder / "filler"


def test_a_checkpoint_that_does_not_fit_says_so_and_leaves_nothing(small_disk):
    import torch

    from w2sg.ml.train import Checkpointer

    s = Store(small_disk / "store")
    path = s.checkpoint_path("k" * 24)
    with pytest.raises(W2SGError) as e:
        Checkpointer(str(path)).save({"weights": torch.zeros(1 << 20)})  # 4 MB on a 2 MB disk
    msg = str(e.value)
    assert msg.startswith(f"out of disk space writing into {path.parent} (") and "about 4.0 MB (4194304 bytes) needed" \
        in msg and "w2sg gc" in msg and "W2SG_STORE" in msg
    assert list(path.parent.iterdir()) == []  # the temporary file is gone at once


def test_a_stage_that_does_not_fit_says_so_and_leaves_nothing(small_disk):
    s = Store(small_disk / "store")
    with pytest.raises(W2SGError, match=r"^out of disk space writing into .*/store/tmp \("):
        s.compute("k" * 24, {"label": "weak:m"}, lambda out: out.write_array("probs", np.zeros(1 << 20)))
    assert list((small_disk / "store" / "tmp").iterdir()) == [] and s.status("k" * 24) == "missing"


def _collectable_store(root):
    """A store with a train stage whose weights its stored labels stage has read: w2sg gc frees them."""
    s = Store(root)

    def train(out):
        out.write_json("metrics.json", {"acc": 0.5})
        (out.path / "model.safetensors").write_bytes(b"w" * 300_000)

    s.compute("t" * 24, {"kind": "train", "label": "weak:m"}, train)
    s.compute("l" * 24, {"kind": "labels", "label": "weak_labels:m", "inputs": {"model": "t" * 24}},
              lambda out: out.write_json("metrics.json", {}))
    return s


def test_gc_on_a_full_disk_frees_before_it_writes_and_removes_leftovers(tmp_path, small_disk, monkeypatch):
    s = _collectable_store(small_disk / "store")
    leftover = s.partial_dir("x" * 24) / "checkpoint.pt.tmp4242"  # a checkpoint write killed half way
    leftover.write_bytes(b"c" * 200_000)
    (s.root / "tmp" / f"{'y' * 24}.4242.abcdef12").mkdir()  # a stage being written by a killed process
    filler = _fill(small_disk, leave=0)
    monkeypatch.setenv("W2SG_STORE", str(s.root))
    listed = _status(tmp_path)
    assert "2 temporary files of stopped runs" in listed and "w2sg gc removes them" in listed
    from w2sg.app import gc

    assert gc.main(["--store", str(s.root)]) == 0
    assert not leftover.exists() and list((s.root / "tmp").iterdir()) == []
    note = json.loads((s.stage_path("t" * 24) / "weights_freed.json").read_text())
    assert note["files"] == ["model.safetensors"] and note["bytes"] == 300_000
    assert s.status("t" * 24) == "done"  # its record now leaves the freed weights out
    filler.unlink()


def test_leftovers_of_a_running_process_are_not_touched(tmp_path):
    s = Store(tmp_path / "store")
    ours = s.partial_dir("z" * 24) / "checkpoint.pt.tmp1"
    ours.write_bytes(b"x")
    with s.lock("z" * 24):
        assert s.leftovers() == []
        assert s.remove_leftovers() == (0, 0) and ours.exists()
    assert s.leftovers() == [(ours, 1)]


def test_a_waiting_run_names_the_stage_and_who_computes_it(tmp_path, caplog):
    s = Store(tmp_path / "store")
    key = "w" * 24
    meta = {"kind": "train", "label": "ceiling:m"}
    held = s.lock(key)
    held.acquire()
    s._mark_running(key, meta)  # what the holder wrote when it started
    result = {}

    def second():
        result["out"] = s.compute(key, meta, lambda out: out.write_json("metrics.json", {"acc": 1.0}))

    with caplog.at_level(logging.WARNING, logger="w2sg.core.store"):
        t = threading.Thread(target=second)
        t.start()
        deadline = time.time() + 10
        while "waiting for stage" not in caplog.text and time.time() < deadline:
            time.sleep(0.02)
        held.release()
        t.join(10)
    import socket

    assert f"waiting for stage ceiling:m ({key[:12]}): it is being computed by {socket.gethostname()} pid " \
           f"{os.getpid()} since " in caplog.text
    assert result["out"][1] is False and s.status(key) == "done"
