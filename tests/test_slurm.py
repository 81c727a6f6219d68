"""Sweeps through a real single-node Slurm (launchers/local-slurm/setup.sh), as CI runs them. Marked `slurm`."""

import functools
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import helpers
import pytest
from helpers import by_pair

# real processes: `w2sg -m launcher=slurm_*` submits jobs to Slurm, and the tests signal and cancel them
run_w2sg = functools.partial(helpers.run_w2sg, subprocess=True)

pytestmark = [pytest.mark.slurm, pytest.mark.skipif(shutil.which("sbatch") is None,
                                                    reason="no Slurm here: run launchers/local-slurm/setup.sh")]
GRID = ["-m", "sweep=tiny_grid"]
SLURM = ["launcher=slurm_local"]


def sweep_runs(cwd):
    return [json.loads(p.read_text()) for p in sorted((cwd / "multirun").glob("*/*/*/metrics.json"))]


def job_ids(output: str):
    return re.findall(r"-> Slurm job (\d+)", output)


def shared_job_ids(output: str):
    return re.findall(r"-> shared Slurm job (\d+(?:_\d+)?)", output)


def sacct_states(ids):
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(ids)],
                         capture_output=True, text=True, check=True).stdout
    return dict(line.split("|") for line in out.strip().splitlines())


def preempt_running_job() -> str:
    """Send the only running job submitit's preemption signal and let it start again at once once requeued;
    returns its id."""
    [job] = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()
    subprocess.run(["scancel", "--signal=USR2", job], check=True)  # what submitit uses for preemption
    start_when_requeued(job)
    return job


def start_when_requeued(job: str, timeout: float = 120) -> None:
    """Once the job is requeued (pending again), let it start at once: Slurm gives a requeued job a begin time
    minutes ahead (the test would wait 2-3 minutes for nothing)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True).stdout.strip()
        if state == "PENDING":
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True)
            return
        time.sleep(0.2)


def wait_until_ended(ids, timeout=600):
    """Until accounting knows every job (it may lag behind the submission) and each has ended; their states."""
    deadline = time.time() + timeout
    while (states := sacct_states(ids)) == {} or set(states.values()) - {"COMPLETED", "FAILED"}:
        assert time.time() < deadline, states
        time.sleep(2)
    return states


def test_grid_submitted_and_left_runs_on_slurm_as_on_the_local_launcher_and_is_collected(tmp_path, store,
                                                                                          tiny_grid_local):
    """Submit and walk away (wait=false), then the same command collects every job from the store. (wait=true with
    lock: the cancelled, preempted and crashing jobs' tests.)"""
    start = time.time()
    proc = run_w2sg(GRID + SLURM + ["hydra.launcher.wait=false"], tmp_path)
    assert time.time() - start < 60
    ids = job_ids(proc.stdout + proc.stderr)
    assert len(ids) == 4
    assert "10 stages" in run_w2sg(["status", *GRID[1:], "-m"], tmp_path).stdout
    assert set(wait_until_ended(ids).values()) == {"COMPLETED"}
    print(f"2x2 tiny grid under Slurm: {time.time() - start:.1f}s")
    slurm = by_pair(sweep_runs(tmp_path))  # the jobs' own metrics, in the sweep folder
    assert slurm.keys() == tiny_grid_local.keys()
    for pair, m in slurm.items():
        assert m["acc"] == tiny_grid_local[pair]["acc"], pair
    trained = [s["key"] for m in slurm.values() for k, s in m["stages"].items()
               if not s["reused"] and k != "weak_labels"]
    assert len(trained) == len(set(trained)) == 8, "2 weak + 2 ceiling + 4 w2s, each once"

    # rerunning the command submits nothing: every job is collected from the store
    proc = run_w2sg(GRID + SLURM, tmp_path)
    out = proc.stdout + proc.stderr
    assert "Submitting" not in out and out.count("collected here, not submitted") == 4
    assert "10 stages: 10 done" in run_w2sg(["status", "-m", *GRID[1:]], tmp_path).stdout


def test_preempted_job_is_requeued_and_resumes_from_its_checkpoint(tmp_path, store):
    args = ["-m", "weak=tiny_random_l4", "strong=tiny_random_l3", "train=full", "task.n_train=400", "task.n_test=64",
            "train.batch_size=4", "train.epochs=3", "train.checkpoint_every=3", "progress=false"]
    (tmp_path / "ref").mkdir()
    helpers.run_w2sg(args, tmp_path / "ref", env_extra={"W2SG_STORE": str(tmp_path / "ref_store")})  # in this process
    [ref] = sweep_runs(tmp_path / "ref")
    proc = subprocess.Popen(["python3", "-m", "w2sg", *args, *SLURM], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not list((store / "partial").glob("*/checkpoint.pt")) if (store / "partial").exists() else True:
        assert time.time() < deadline and proc.poll() is None, "no checkpoint appeared"
        time.sleep(0.2)
    job = preempt_running_job()
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    states = subprocess.run(["sacct", "-n", "-P", "-D", "-X", "-o", "State", "-j", job], capture_output=True,
                            text=True).stdout.split()
    assert "REQUEUED" in states and states[-1] == "COMPLETED", states
    [m] = sweep_runs(tmp_path)
    assert m["acc"] == ref["acc"] and m["pgr"] == ref["pgr"]
    resumed = [json.loads((store / "stages" / s["key"] / "metrics.json").read_text()).get("resumed_from_step", 0)
               for s in m["stages"].values()]
    assert max(resumed) > 0, "one stage resumed from its checkpoint"
    # the requeued job continued the interrupted stage's W&B run (run id = stage key): no duplicate run ids
    from wandb_offline import read_runs

    # not the sweep summary, not the experiment's run (a requeued job's run file may lack a run record)
    runs = [r for r in read_runs(tmp_path / "wandb") if not r["id"].startswith(("sweep-", "exp-"))]
    interrupted = [s["key"] for s, r in zip(m["stages"].values(), resumed) if r > 0]
    assert {r["id"] for r in runs} == {s["key"] for s in m["stages"].values()}
    assert all(sum(r["id"] == key for r in runs) >= 2 for key in interrupted), "one W&B run, written twice"


def test_crashing_job_fails_the_sweep_naming_job_and_log(tmp_path, store):
    proc = run_w2sg(["-m", "pair=tiny", "train=full", "train.epochs=1", "task.n_test=32", "task.n_train=64,1", "progress=false",
                     *SLURM], tmp_path, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "1 of 2 jobs failed" in out
    match = re.search(r"job #1 \(.*task.n_train=1.*\), Slurm id (\S+): .*\n\s+log: (\S+)", out)
    assert match, out[-3000:]
    assert "need n_train >= 2" in open(match.group(2)).read()
    assert len(sweep_runs(tmp_path)) == 1, "the other job finished and wrote its metrics"


DEPENDENCY = SLURM + ["hydra.launcher.shared_stages=dependency"]


def test_dependency_variant_matches_the_local_launcher_and_trains_each_shared_stage_once(tmp_path, store,
                                                                                          tiny_grid_local):
    proc = run_w2sg(GRID + DEPENDENCY, tmp_path)
    out = proc.stdout + proc.stderr
    shared, main = shared_job_ids(out), re.findall(r"-> Slurm job (\d+(?:_\d+)?) after ", out)
    assert len(shared) == 4 and len(main) == 4, out[-3000:]
    assert set(sacct_states(shared + main).values()) == {"COMPLETED"}
    slurm, local = by_pair(sweep_runs(tmp_path)), tiny_grid_local
    assert slurm.keys() == local.keys()
    for pair, m in slurm.items():
        assert (m["acc"], m["pgr"]) == (local[pair]["acc"], local[pair]["pgr"]), pair
        assert "subset" not in m and all(m["stages"][k]["reused"] for k in ("weak", "weak_labels", "ceiling"))
    parts = [json.loads(p.read_text()) for p in (tmp_path / "multirun").glob("*/*/shared/*/metrics.json")]
    assert sorted(tuple(m["subset"]) for m in parts) == [("ceiling",)] * 2 + [("weak", "weak_labels")] * 2
    trained = [s["key"] for m in parts + list(slurm.values()) for k, s in m["stages"].items()
               if not s["reused"] and k != "weak_labels"]
    assert len(trained) == len(set(trained)) == 8, "2 weak + 2 ceiling + 4 w2s, each once"
    [results] = (tmp_path / "multirun").glob("*/*/results.csv")
    assert len(results.read_text().strip().splitlines()) == 1 + 4, "the report skips the shared-stage jobs"


def test_dependency_variant_reports_a_failed_shared_stage_and_cancels_its_dependents(tmp_path, store):
    start = time.time()
    proc = run_w2sg(["-m", "pair=tiny", "train=full", "train.epochs=1", "task.n_test=32", "task.n_train=64,1", "progress=false",
                     *DEPENDENCY], tmp_path, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and time.time() - start < 600
    assert "1 of 2 jobs failed (2 of 4 shared-stage jobs failed)" in out, out[-3000:]
    match = re.search(r"shared stages weak:tiny_random \+ weak_labels:tiny_random, Slurm id (\S+): .*need n_train "
                      r">= 2.*\n\s+log: (\S+)", out)
    assert match, out[-3000:]
    assert "need n_train >= 2" in open(match.group(2)).read()
    cancelled = re.search(r"job #1 \(.*task.n_train=1.*\), Slurm id (\S+): not run: its shared-stage job (\S+) "
                          r"\(.*\) failed\n\s+log: (\S+)", out)
    assert cancelled, out[-3000:]
    states = sacct_states([match.group(1), cancelled.group(1)])
    assert states[match.group(1)] == "FAILED" and states[cancelled.group(1)].startswith("CANCELLED"), states
    assert len(sweep_runs(tmp_path)) == 1, "the other job finished and wrote its metrics"


def _slurm_id(pid: int) -> str:
    """The Slurm id (array job_task, as the launcher names jobs) of the job a process runs in."""
    env = dict(kv.split("=", 1) for kv in open(f"/proc/{pid}/environ").read().split("\0") if "=" in kv)
    if "SLURM_ARRAY_JOB_ID" in env:
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env["SLURM_JOB_ID"]


def test_cancelled_job_is_reported_with_its_checkpoint_and_the_rerun_resumes_only_it(tmp_path, store):
    # two jobs (one weak model, two strong ones), each training its own w2s stage
    args = ["-m", "weak=tiny_random", "strong=tiny_random_l3,tiny_random_l4", "train=full", "task.n_train=400",
            "task.n_test=32", "train.batch_size=4", "train.epochs=2", "train.checkpoint_every=10", "progress=false",
            *SLURM]
    proc = subprocess.Popen(["python3", "-m", "w2sg", *args], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline, marker = time.time() + 600, None
    while marker is None:  # a w2s stage (needed by its job alone) training, with a checkpoint
        assert time.time() < deadline and proc.poll() is None, "no w2s checkpoint appeared"
        for ckpt in (store / "partial").glob("*/checkpoint.pt") if (store / "partial").exists() else []:
            try:  # a stage that finishes between the glob and this read takes its partial folder with it
                info = json.loads((ckpt.parent / "stage.json").read_text())
            except FileNotFoundError:
                continue
            if info["label"].startswith("w2s:"):
                marker = info
        time.sleep(0.05)
    job = _slurm_id(marker["pid"])
    subprocess.run(["scancel", job], check=True)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode != 0, out
    assert "0 of 2 jobs failed" not in out and "1 of 2 jobs were cancelled or preempted" in out, out[-3000:]
    match = re.search(rf"Slurm id {job}: cancelled or preempted \(SIGTERM\) at step (\d+) of (\S+); its checkpoint "
                      r"is saved \((\S+)\): rerun the sweep to resume it from there\n\s+log: (\S+)", out)
    assert match, out[-3000:]
    step, label, checkpoint, log = match.groups()
    assert label == marker["label"] and int(step) > 0
    assert checkpoint == str(store / "partial" / marker["key"] / "checkpoint.pt") and Path(checkpoint).exists()
    job_log = open(log).read()
    assert "Traceback" not in job_log, job_log[-3000:]
    assert f"{label} stopped by SIGTERM at step {step}; checkpoint saved; rerun the same command" in job_log
    assert len(sweep_runs(tmp_path)) == 1, "the other job finished"

    proc = run_w2sg(args, tmp_path)  # submits only the cancelled job, which resumes its stage
    out = proc.stdout + proc.stderr
    assert "Submitting 1 of 2 jobs" in out and out.count("collected here, not submitted") == 1, out[-3000:]
    stage = json.loads((store / "stages" / marker["key"] / "metrics.json").read_text())
    assert stage["resumed_from_step"] == int(step)


def test_a_job_of_two_tasks_trains_its_stage_on_both_and_stores_it_once(tmp_path, store):
    # the tiny BERT without dropout (its masks are drawn per rank): two ranks train as one process does
    args = ["-m", "pair=tiny", "train=full", "train.epochs=2", "task.n_train=64", "task.n_test=32", "progress=false",
            "stages=[weak]", "train.batch_size=8", "+weak.random_init.hidden_dropout_prob=0.0",
            "+weak.random_init.attention_probs_dropout_prob=0.0"]
    (tmp_path / "ref").mkdir()
    helpers.run_w2sg(args, tmp_path / "ref", env_extra={"W2SG_STORE": str(tmp_path / "ref_store")})  # in this process
    [ref] = sweep_runs(tmp_path / "ref")
    proc = run_w2sg(args + SLURM + ["hydra.launcher.tasks_per_node=2"], tmp_path)
    [job] = job_ids(proc.stdout + proc.stderr)
    deadline = time.time() + 120  # task 0's result is back; the job ends when task 1 has left too
    while (states := set(sacct_states([job]).values())) & {"RUNNING", "COMPLETING", "PENDING"} or not states:
        assert time.time() < deadline, states
        time.sleep(1)
    assert states == {"COMPLETED"}
    [m] = sweep_runs(tmp_path)
    [stage] = m["stages"].values()
    assert [p.name for p in (store / "stages").iterdir()] == [stage["key"]], "stored once, by task 0"
    stored = json.loads((store / "stages" / stage["key"] / "metrics.json").read_text())
    assert stored["runtime"]["ranks"] == 2 and stored["runtime"]["strategy"] == "ddp", "task 1 was the second rank"
    [ref_stage] = ref["stages"].values()
    assert ref_stage["key"] == stage["key"]
    assert m["acc"] == ref["acc"], "the same global batches: the same model to float rounding"
