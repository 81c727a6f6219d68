"""Small jobs packed (hydra.launcher.experiments_per_job) on a real single-node Slurm (launchers/local-slurm/setup.sh).
Marked `slurm`. The grouping, requests and failure report without Slurm: tests/test_launcher_packing.py."""

import functools
import json
import re
import shutil
import subprocess
import time

import helpers
import pytest
from helpers import by_pair
from test_slurm import preempt_running_job, sweep_runs

# real processes: `w2sg -m launcher=slurm_*` submits jobs to Slurm, and the tests signal them
run_w2sg = functools.partial(helpers.run_w2sg, subprocess=True)

pytestmark = [pytest.mark.slurm, pytest.mark.skipif(shutil.which("sbatch") is None,
                                                    reason="no Slurm here: run launchers/local-slurm/setup.sh")]
GRID = ["-m", "sweep=tiny_grid"]
# 2 experiments per job, which gets both of the local node's CPUs (one thread per experiment)
PACKED = ["launcher=slurm_local", "hydra.launcher.experiments_per_job=2", "hydra.launcher.cpus_per_task=2"]


def accuracies(runs):
    """Each experiment's accuracies (weak, ceiling, w2s), by its (weak, strong) models."""
    return {pair: m["acc"] for pair, m in by_pair(runs).items()}


def slurm_ids(output: str):
    """Each experiment's Slurm job, in submission order (experiments of one pack name the same job)."""
    return re.findall(r"-> Slurm job (\d+(?:_\d+)?)", output)


def sacct_states(ids, *flags):
    out = subprocess.run(["sacct", "-n", "-X", "-P", *flags, "-o", "JobID,State", "-j", ",".join(sorted(set(ids)))],
                         capture_output=True, text=True, check=True).stdout
    return [line.split("|") for line in out.strip().splitlines()]


def test_packed_grid_runs_two_slurm_jobs_that_match_the_local_launcher(tmp_path, store, tiny_grid_local):
    proc = run_w2sg(GRID + PACKED, tmp_path)
    out = proc.stdout + proc.stderr
    ids = slurm_ids(out)
    assert len(ids) == 4 and len(set(ids)) == 2, out[-3000:]
    assert ids[0] == ids[1] and ids[2] == ids[3], "packed in sweep order"
    assert "Packing 4 jobs into 2 Slurm jobs" in out
    assert {state for _, state in sacct_states(ids)} == {"COMPLETED"}
    packed = sweep_runs(tmp_path)
    assert len(packed) == 4 and accuracies(packed) == accuracies(tiny_grid_local.values())
    trained = [s["key"] for m in packed for k, s in m["stages"].items() if not s["reused"] and k != "weak_labels"]
    assert len(trained) == len(set(trained)) == 8, "2 weak + 2 ceiling + 4 w2s, each once"
    [results] = (tmp_path / "multirun").glob("*/*/results.csv")
    assert len(results.read_text().strip().splitlines()) == 1 + 4

    # rerunning a finished sweep submits nothing: every experiment is collected from the store
    proc = run_w2sg(GRID + PACKED, tmp_path)
    out = proc.stdout + proc.stderr
    assert "Submitting" not in out and out.count("collected here, not submitted") == 4


def checkpoints(store):
    """The training checkpoints in the store now (stages being trained)."""
    return list((store / "partial").glob("*/checkpoint.pt")) if (store / "partial").exists() else []


def test_a_preempted_pack_is_requeued_and_both_experiments_resume(tmp_path, store):
    """Both experiments of a pack training when the job is preempted: each saves its checkpoint, the pack is
    requeued, and each resumes. (That a resumed stage matches an uninterrupted one: tests/test_slurm.py.)"""
    args = ["-m", "weak=tiny_random_l4", "strong=tiny_random_l3", "seed=0,1", "train=full", "task.n_train=400",
            "task.n_test=64", "train.batch_size=4", "train.epochs=2", "train.checkpoint_every=3", "progress=false"]
    proc = subprocess.Popen(["python3", "-m", "w2sg", *args, *PACKED], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while len(checkpoints(store)) < 2:  # each seed's weak model training, in its own process
        assert time.time() < deadline and proc.poll() is None, "no two checkpoints appeared"
        time.sleep(0.2)
    job = preempt_running_job()
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    assert len(set(slurm_ids(out))) == 1, "one pack"
    states = [state for _, state in sacct_states([job], "-D")]
    assert "REQUEUED" in states and states[-1] == "COMPLETED", states
    runs = sweep_runs(tmp_path)
    assert sorted(m["seed"] for m in runs) == [0, 1]
    resumed = {m["seed"]: max(json.loads((store / "stages" / s["key"] / "metrics.json").read_text())
                              .get("resumed_from_step", 0) for s in m["stages"].values()) for m in runs}
    assert all(step > 0 for step in resumed.values()), f"each experiment resumed a checkpoint: {resumed}"
