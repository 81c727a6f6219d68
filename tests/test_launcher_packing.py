"""Small jobs packed (hydra.launcher.experiments_per_job): how the Slurm launcher groups, submits and collects packs,
without Slurm. tests/test_slurm_packing.py runs packs on the local Slurm."""

from types import SimpleNamespace

import pytest
import yaml
from helpers import ROOT
from hydra.core.utils import JobStatus
from test_launcher import FakeJob, _job_return

from hydra_plugins.w2sg_launcher.packing import PackMember, pack_jobs
from hydra_plugins.w2sg_launcher.w2sg_launcher import W2sgSlurmConf, W2sgSlurmLauncher
from w2sg.core.errors import W2SGError
from w2sg.ml.train import Preempted

SMALL = {"gpus_per_node": 1, "mem_gb": 32, "timeout_min": 240, "constraint": None}
BIG = {"gpus_per_node": 1, "mem_gb": 128, "timeout_min": 720, "constraint": None}


def test_jobs_are_packed_k_at_a_time_in_sweep_order_never_across_requests():
    assert pack_jobs([SMALL] * 5, 2) == [[0, 1], [2, 3], [4]]
    assert pack_jobs([SMALL] * 4, 1) == [[0], [1], [2], [3]]
    assert pack_jobs([SMALL] * 3, 8) == [[0, 1, 2]]
    assert pack_jobs([SMALL, BIG, SMALL, SMALL, BIG, SMALL], 2) == [[0, 2], [1, 4], [3, 5]]
    assert pack_jobs([dict(SMALL), dict(reversed(list(SMALL.items())))], 2) == [[0, 1]], "the same request"
    assert pack_jobs([], 3) == []


@pytest.mark.parametrize("k", [0, -1, 1.5, "2", True])
def test_experiments_per_job_must_be_an_integer_of_at_least_one(k):
    with pytest.raises(W2SGError, match=r"hydra.launcher.experiments_per_job: .* is not a number of experiments "
                                         r"per Slurm job; give an integer >= 1"):
        W2sgSlurmLauncher(experiments_per_job=k)
    assert W2sgSlurmLauncher(experiments_per_job=3).experiments_per_job == 3
    assert W2sgSlurmConf.experiments_per_job == W2sgSlurmLauncher().experiments_per_job == 1


def test_every_slurm_profile_defines_experiments_per_job_as_one():
    for name in ("slurm_local", "slurm_gpu", "slurm_cpu"):
        launcher = yaml.safe_load((ROOT / "launchers" / f"{name}.yaml").read_text())["hydra"]["launcher"]
        assert launcher["experiments_per_job"] == 1, name


class Executor:
    """Records the arrays submitted: (request, function, its arguments)."""

    arrays: list = []

    def __init__(self, request, after):
        self.request, self.after = request, after

    def map_array(self, fn, *args):
        Executor.arrays.append((self.request, fn, args, [j.job_id for j in self.after]))
        n = len(Executor.arrays)
        return [SimpleNamespace(job_id=f"{n}_{i}", paths=SimpleNamespace(stderr=f"/logs/{n}_{i}_0_log.err"))
                for i in range(len(args[0]))]


def _launcher(monkeypatch, k, requests):
    launcher = W2sgSlurmLauncher(experiments_per_job=k)
    launcher.requests = dict(enumerate(requests))
    Executor.arrays = []
    monkeypatch.setattr(launcher, "_executor", lambda after=(), shared=False, request=None: Executor(request, after))
    monkeypatch.setattr("w2sg.app.hydra_compat.singleton_state", lambda: None)
    return launcher


def test_packs_are_submitted_one_slurm_job_each_with_k_times_the_memory(monkeypatch):
    launcher = _launcher(monkeypatch, 2, [SMALL, BIG, SMALL, SMALL, BIG])
    todo = [(i, [f"strong=m{i}"], None) for i in range(5)]
    jobs = launcher._submit(todo, [[] for _ in todo])
    arrays = sorted(Executor.arrays, key=lambda a: a[0]["timeout_min"])
    assert [(a[0]["mem_gb"], [[o for o, _ in pack] for pack in a[2][0]]) for a in arrays] == [
        (64, [[["strong=m0"], ["strong=m2"]]]),  # the two packs of 2 small jobs: 2 x 32 GB
        (32, [[["strong=m3"]]]),  # the last small job alone: one job's memory
        (256, [[["strong=m1"], ["strong=m4"]]]),
    ]
    assert all(type(a[1]).__name__ == "Pack" and a[1].launcher is launcher for a in arrays)
    assert [a[2][0][0][0][1] for a in arrays] == [0, 3, 1], "each experiment runs under its own job number"
    assert all(type(j).__name__ == "PackMember" for j in jobs)
    assert [(j.job_id, j.slot, j.idxs) for j in jobs] == [
        ("1_0", 0, [0, 2]), ("2_0", 0, [1, 4]), ("1_0", 1, [0, 2]), ("3_0", 0, [3]), ("2_0", 1, [1, 4])]


def test_k_of_one_submits_the_launcher_itself_one_job_per_experiment(monkeypatch):
    launcher = _launcher(monkeypatch, 1, [SMALL, SMALL])
    jobs = launcher._submit([(i, [f"weak=w{i}"], None) for i in range(2)], [[], []])
    [(request, fn, args, _)] = Executor.arrays
    assert fn is launcher and list(args[0]) == [["weak=w0"], ["weak=w1"]] and request == SMALL
    assert [j.job_id for j in jobs] == ["1_0", "1_1"]


def test_a_pack_waits_for_every_shared_stage_job_its_members_need(monkeypatch):
    launcher = _launcher(monkeypatch, 2, [SMALL] * 3)
    weak, ceil_a, ceil_b = (SimpleNamespace(job_id=i) for i in ("7_0", "7_1", "7_2"))
    todo = [(i, [f"strong=m{i}"], None) for i in range(3)]
    jobs = launcher._submit(todo, [[weak, ceil_a], [weak, ceil_b], [ceil_a]])
    assert sorted((a[3], len(a[2][0][0])) for a in Executor.arrays) == [(["7_0", "7_1", "7_2"], 2), (["7_1"], 1)]
    assert [j.job_id for j in jobs[0].after] == ["7_0", "7_1", "7_2"]


def test_a_pack_of_jobs_of_several_tasks_is_refused(monkeypatch):
    launcher = _launcher(monkeypatch, 2, [dict(SMALL, tasks_per_node=2)] * 2)
    with pytest.raises(W2SGError, match=r"jobs #0, #1: .*experiments_per_job=2 packs experiments into one task"):
        launcher._submit([(i, [f"w={i}"], None) for i in range(2)], [[], []])


def test_a_packs_gpu_holds_its_experiments_together(monkeypatch):
    from w2sg.run.resources import GB

    mapping = {40: "a100_40g", 80: "a100_80g"}
    launcher = _launcher(monkeypatch, 2, [dict(SMALL, constraint="a100_40g")] * 3)
    launcher.gpu_needs = {0: (30 * GB, mapping), 1: (30 * GB, mapping), 2: (30 * GB, mapping)}
    launcher._submit([(i, [f"w={i}"], None) for i in range(3)], [[], [], []])
    assert sorted(a[0]["constraint"] for a in Executor.arrays) == ["a100_40g", "a100_80g"]
    launcher.gpu_needs = {i: (50 * GB, mapping) for i in range(3)}
    with pytest.raises(W2SGError, match=r"jobs #0, #1: packed into one Slurm job .* need about 100.0 GB on one GPU"):
        launcher._submit([(i, [f"w={i}"], None) for i in range(3)], [[], [], []])


def test_each_experiment_of_a_pack_is_collected_and_reported_as_a_job_is():
    ckpt = "/store/partial/abc/checkpoint.pt"
    pack = FakeJob("21_0", [_job_return(JobStatus.COMPLETED, 0.5),
                            _job_return(JobStatus.FAILED, W2SGError("task 'x': need n_train >= 2")),
                            _job_return(JobStatus.FAILED, Preempted(12, 3, "w2s:a->b", ckpt))])
    crashed = FakeJob("21_1", error=RuntimeError("Job 21_1 has not produced any output (state: CANCELLED)"))
    jobs = [PackMember(pack, slot, [0, 1, 2]) for slot in range(3)] + [PackMember(crashed, 0, [3])]
    todo = [(i, [f"weak=w{i}"], None) for i in range(4)]
    with pytest.raises(W2SGError) as info:
        W2sgSlurmLauncher(experiments_per_job=3)._collect(todo, jobs, [[]] * 4, [], [], 4)
    lines = str(info.value).splitlines()
    assert lines[0].startswith("2 of 4 jobs failed and 1 of 4 jobs were cancelled or preempted;")
    assert lines[1:] == [
        "  job #1 (weak=w1), Slurm id 21_0 (pack of 3: #0, #1, #2): task 'x': need n_train >= 2",
        "    log: /logs/21_0_0_log.err",
        "  job #2 (weak=w2), Slurm id 21_0 (pack of 3: #0, #1, #2): cancelled or preempted (SIGUSR2) at step 3 of "
        f"w2s:a->b; its checkpoint is saved ({ckpt}): rerun the sweep to resume it from there",
        "    log: /logs/21_0_0_log.err",
        "  job #3 (weak=w3), Slurm id 21_1 (pack of 1: #3): Job 21_1 has not produced any output (state: CANCELLED)",
        "    log: /logs/21_1_0_log.err"]
    results = W2sgSlurmLauncher(experiments_per_job=3)._collect(todo[:1], jobs[:1], [[]], [], [], 1)
    assert results[0].return_value == 0.5


def test_a_pack_cancelled_for_a_shared_stage_names_whose_input_failed():
    weak = FakeJob("30_0", error=RuntimeError("Job (task=0) failed\nTraceback (most recent call last):\nboom"))
    ceiling = FakeJob("30_1", _job_return(JobStatus.COMPLETED, None))
    pack = FakeJob("31_0", error=RuntimeError("cancelled"))
    pack.cancel = lambda check=True: None
    jobs = [PackMember(pack, slot, [0, 1], [weak, ceiling]) for slot in range(2)]
    groups = [SimpleNamespace(labels=["weak:a", "weak_labels:a"]), SimpleNamespace(labels=["ceiling:b"])]
    with pytest.raises(W2SGError) as info:
        W2sgSlurmLauncher(experiments_per_job=2)._collect(
            [(0, ["weak=a"], None), (1, ["weak=c"], None)], jobs, [[weak], [ceiling]], groups, [weak, ceiling], 2)
    text = str(info.value)
    assert "job #0 (weak=a), Slurm id 31_0 (pack of 2: #0, #1): not run: its shared-stage job 30_0 (weak:a" in text
    assert "job #1 (weak=c), Slurm id 31_0 (pack of 2: #0, #1): not run: its pack's shared-stage job 30_0" in text
