"""Data-parallel training (w2sg.ml.distributed): train.processes=2 starts two local gloo ranks on the CPU, and a
stage trained by them equals the one process's stage to float rounding (the same global batches, the gradient of
the mean over each of them), for DDP and FSDP2; rank 0's checkpoint resumes; bad settings are named."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY, compose

from w2sg.core.errors import W2SGError
from w2sg.core.plan import plan
from w2sg.core.store import Store
from w2sg.ml import distributed
from w2sg.run import experiment
from w2sg.run.runner import Runner

# the tiny BERT without dropout (its masks are drawn per rank), 5 epochs of 4 global batches: 20 optimizer steps
BASE = TINY + ["stages=[weak]", "train.epochs=5", "train.batch_size=8", "train.max_grad_norm=1.0",
               "+weak.random_init.hidden_dropout_prob=0.0", "+weak.random_init.attention_probs_dropout_prob=0.0"]
RTOL, ATOL = 1e-5, 1e-6  # fp32: the loss's float summation order differs between one and two ranks


def weak_stage(tmp_path, name, overrides):
    cfg = compose(["logger=none", f"store_dir={tmp_path / name}", "progress=false"] + BASE + list(overrides))
    runner = Runner(cfg, Store(cfg.store_dir))
    experiment.run(cfg, runner)
    stage = plan(cfg)["weak"]
    sd = runner.store.get(stage.key)
    return stage.key, sd.read_json("metrics.json"), sd.read_array("test_probs")


def assert_same(one, two):
    key1, m1, p1 = one
    key2, m2, p2 = two
    assert key1 == key2, "strategy and processes stay out of the stage key"
    assert m1["n_train"] == m2["n_train"] and len(m1["history"]) == len(m2["history"]) == 5
    for a, b in zip(m1["history"], m2["history"]):
        assert a["train_acc"] == b["train_acc"]
        assert a["loss"] == pytest.approx(b["loss"], rel=RTOL, abs=ATOL)
    np.testing.assert_allclose(p1, p2, rtol=RTOL, atol=ATOL)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return weak_stage(tmp_path_factory.mktemp("one"), "s", ["train.processes=1"])


@pytest.mark.slow  # two spawned ranks and a reference run: 20-40 s (CI runs -m slow)
def test_two_ddp_ranks_train_as_one_process(single, tmp_path):
    assert_same(single, weak_stage(tmp_path, "s", ["train.processes=2", "train.strategy=ddp"]))


@pytest.mark.slow  # two spawned ranks and a reference run: 20-40 s (CI runs -m slow)
def test_two_ddp_ranks_with_gradient_accumulation_train_as_one_process(tmp_path):
    one = weak_stage(tmp_path, "a", ["train.processes=1", "train.minibatch_size=2"])
    assert_same(one, weak_stage(tmp_path, "b", ["train.processes=2", "train.minibatch_size=2"]))


@pytest.mark.slow  # two spawned ranks and a reference run: 20-40 s (CI runs -m slow)
def test_two_fsdp_ranks_train_as_one_process(single, tmp_path):
    assert_same(single, weak_stage(tmp_path, "s", ["train.processes=2", "train.strategy=fsdp"]))


# one task of a Slurm job of two (the variables Slurm sets in each task of `srun`): task 0 runs the weak stage
# through serve_tasks, task 1 serves as its second rank; task 0 writes what the stage is and task 1 what it returned
SLURM_TASK = """
import json, os, pickle, sys
sys.path.insert(0, {tests!r})
import test_distributed as t
from w2sg.ml.distributed import serve_tasks

rank = int(os.environ["SLURM_PROCID"])
result = serve_tasks(lambda: t.weak_stage(t.Path({folder!r}), "served", []))
with open(os.path.join({folder!r}, f"task{{rank}}.pkl"), "wb") as f:
    pickle.dump(result, f)
"""


@pytest.mark.slow  # two processes and a reference run: 20-40 s (CI runs -m slow)
def test_a_slurm_job_of_two_tasks_trains_the_stage_on_both_and_stores_it_once(single, tmp_path):
    import os
    import pickle
    import subprocess
    import sys

    script = SLURM_TASK.format(tests=str(Path(__file__).parent), folder=str(tmp_path))
    procs = []
    for rank in range(2):
        env = dict(os.environ, SUBMITIT_EXECUTOR="slurm", SLURM_JOB_ID="4242", SLURM_NTASKS="2", SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank),
                   SLURM_JOB_NUM_NODES="1", SLURM_NODEID="0", SLURM_JOB_NODELIST="localhost",
                   MASTER_PORT=str(distributed.free_port() if rank == 0 else procs[0][1]), OMP_NUM_THREADS="1")
        procs.append((subprocess.Popen([sys.executable, "-c", script], env=env), env["MASTER_PORT"]))
    assert [p.wait(timeout=300) for p, _ in procs] == [0, 0]
    task0 = pickle.loads((tmp_path / "task0.pkl").read_bytes())
    assert pickle.loads((tmp_path / "task1.pkl").read_bytes()) is None, "task 1 served and returned nothing"
    assert_same(single, task0)
    key, metrics, _ = task0
    assert metrics["runtime"]["ranks"] == 2 and metrics["runtime"]["strategy"] == "ddp"
    assert [p.name for p in (tmp_path / "served" / "stages").iterdir()] == [key], "stored once, by task 0"


@pytest.mark.slow(seconds=80)  # a stopped and a resumed two-rank run and a reference (CI runs -m slow)
def test_two_ranks_stopped_by_slurm_resume_from_rank_0s_checkpoint_to_the_same_stage(tmp_path):
    """SIGTERM to every process of the job (as Slurm signals a job step): the ranks agree to stop, rank 0 saves the
    gathered checkpoint, the command exits 143; the rerun resumes from it and ends with the uninterrupted stage."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from helpers import run_w2sg

    args = ["weak=tiny_random_l4", "strong=tiny_random_l3", "train=full", "task.n_train=400", "task.n_test=64",
            "train.batch_size=4", "train.epochs=2", "train.checkpoint_every=3", "progress=false", "stages=[weak]",
            "+weak.random_init.hidden_dropout_prob=0.0", "+weak.random_init.attention_probs_dropout_prob=0.0"]
    store = tmp_path / "store"
    env = dict(os.environ, W2SG_STORE=str(store))
    proc = subprocess.Popen([sys.executable, "-m", "w2sg", *args, "train.processes=2"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 240
    while not list(store.glob("partial/*/checkpoint.pt")):
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "stopped by SIGTERM at step" in err, err
    [key] = [p.name for p in store.glob("partial/*")]
    assert not (store / "stages" / key).exists()
    run_w2sg(args + ["train.processes=2"], tmp_path, env_extra={"W2SG_STORE": str(store)}, subprocess=True)
    resumed = json.loads((store / "stages" / key / "metrics.json").read_text())
    assert resumed["resumed_from_step"] > 0 and resumed["runtime"]["ranks"] == 2
    (tmp_path / "ref").mkdir()
    run_w2sg(args + ["train.processes=1"], tmp_path / "ref", env_extra={"W2SG_STORE": str(tmp_path / "ref_store")},
             subprocess=True)
    np.testing.assert_allclose(np.load(store / "stages" / key / "test_probs.npy"),
                               np.load(tmp_path / "ref_store" / "stages" / key / "test_probs.npy"), rtol=RTOL, atol=ATOL)


def test_batches_are_sliced_so_the_averaged_gradient_is_the_global_mean():
    idx = list(range(7))
    parts = [distributed.shard(idx, r, 2) for r in range(2)]
    assert parts == [[0, 1, 2], [3, 4, 5, 6]]
    assert sum(distributed.loss_weight(len(p), 7, 2) for p in parts) / 2 == pytest.approx(1.0)
    # the same number of forward passes on every rank (DDP synchronises on the last), each at most mb examples
    assert [len(distributed.microbatches(p, 7, 2, 2)) for p in parts] == [2, 2]
    assert distributed.microbatches([], 1, 2, 4) == [[]]


@pytest.mark.parametrize("overrides, message", [
    (["train.strategy=ring"], "valid: auto, single, ddp, fsdp"),
    (["train.processes=0"], "train.processes must be"),
    (["train=lora", "train.strategy=ddp"], "train.mode=lora"),
    (["train.strategy=single", "train.processes=2"], "train.strategy=single"),
])
def test_bad_parallel_settings_are_named(overrides, message):
    from w2sg.run.device import runtime_policy

    with pytest.raises(W2SGError, match=message):
        runtime_policy(compose(["train=full"] + overrides).train)


def test_in_a_slurm_job_of_several_tasks_every_task_is_a_rank(monkeypatch):
    from types import SimpleNamespace

    from w2sg.run.bodies import parallel_plan

    def context(processes=None, strategy="auto", fits=True):
        return SimpleNamespace(cfg=SimpleNamespace(train=SimpleNamespace(strategy=strategy, processes=processes,
                                                                         device_map=None)),
                               policy=SimpleNamespace(device="cpu"), fits_one_device=lambda *a: fits)

    assert parallel_plan(context(), "full") == ("single", 1), "one process on the CPU outside such a job"
    monkeypatch.setattr(distributed, "_SERVED", distributed.Served(distributed.World(0, 4, 0), None))
    assert parallel_plan(context(), "full") == ("ddp", 4)
    assert parallel_plan(context(4, "fsdp"), "full") == ("fsdp", 4)
    assert parallel_plan(context(), "lora") == ("single", 1), "LoRA trains in task 0 alone"
    stage = SimpleNamespace(spec={"train": {"batch_size": 32, "minibatch_size": 4}})
    assert parallel_plan(context(fits=True), "full", stage) == ("ddp", 4)
    assert parallel_plan(context(fits=False), "full", stage) == ("fsdp", 4), "auto shards what one GPU cannot hold"
    assert parallel_plan(context(fits=False, strategy="ddp"), "full", stage) == ("ddp", 4), "a strategy set is kept"
    with pytest.raises(W2SGError, match=r"train.processes=2, but this Slurm job has 4 tasks.*train.processes=null"):
        parallel_plan(context(2), "full")
