"""The Slurm launcher's options and the stage-subset runs it builds on, without Slurm."""

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from helpers import ROOT, compose
from hydra.core.utils import JobReturn, JobStatus

from hydra_plugins.w2sg_launcher.failures import error_line
from hydra_plugins.w2sg_launcher.w2sg_launcher import W2sgSlurmConf, W2sgSlurmLauncher
from w2sg.app import cli
from w2sg.core import plan as planning
from w2sg.core.errors import W2SGError
from w2sg.core.store import Store
from w2sg.ml.train import Preempted
from w2sg.results import collect

GRID = ["sweep=tiny_grid", "logger=none"]
PAIRS = [(w, s) for w in ("tiny_random", "tiny_random_l2") for s in ("tiny_random_l3", "tiny_random_l4")]


def grid_configs(pairs=PAIRS, extra=()):
    return [compose([*GRID, f"weak={w}", f"strong={s}", *extra]) for w, s in pairs]


def test_unknown_shared_stages_value_names_the_valid_ones():
    with pytest.raises(W2SGError, match=r"shared_stages: unknown value 'fifo'; valid: lock, dependency"):
        W2sgSlurmLauncher(shared_stages="fifo")
    assert W2sgSlurmLauncher(shared_stages="dependency").shared_stages == "dependency"


def test_a_failed_job_is_summed_up_by_its_exception_line():
    trace = ("Job (task=0) failed during processing with trace:\n----------------------\n"
             "Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n"
             "w2sg.core.errors.W2SGError: need n_train >= 2\n\n----------------------\n"
             "You can check full logs with 'job.stderr(0)' and 'job.stdout(0)'or at paths:\n  - a.err\n  - a.out")
    assert error_line(trace) == "w2sg.core.errors.W2SGError: need n_train >= 2"  # submitit's FailedJobError
    assert error_line("task 'x': need n_train >= 2\nmore") == "task 'x': need n_train >= 2"  # Hydra's JobReturn


def test_every_slurm_profile_uses_the_default_shared_stages():
    for name in ("slurm_local", "slurm_gpu", "slurm_cpu"):
        launcher = yaml.safe_load((ROOT / "launchers" / f"{name}.yaml").read_text())["hydra"]["launcher"]
        assert launcher["shared_stages"] == W2sgSlurmConf.shared_stages, name


def test_stage_names_are_checked_naming_the_valid_ones(store):
    [cfg] = grid_configs(PAIRS[:1], ["stages=[weak,wieght]"])
    with pytest.raises(W2SGError, match=r"stages: no stage named 'wieght'.*valid: weak, weak_labels, ceiling, w2s"):
        planning.select(cfg, planning.plan(cfg))
    [cfg] = grid_configs(PAIRS[:1], ["stages=[]"])
    with pytest.raises(W2SGError, match="stages: empty list"):
        planning.select(cfg, planning.plan(cfg))
    [cfg] = grid_configs(PAIRS[:1], ["stages=[w2s]"])  # w2s needs the weak labels, which need the weak model
    assert list(planning.select(cfg, planning.plan(cfg))) == ["weak", "weak_labels", "w2s"]
    [cfg] = grid_configs(PAIRS[:1])
    assert list(planning.select(cfg, planning.plan(cfg))) == ["weak", "weak_labels", "ceiling", "w2s"]


def test_shared_stage_groups_dedupe_by_key(store):
    groups = planning.shared_stage_groups(grid_configs())
    assert [(g.labels, g.names, g.jobs) for g in groups] == [
        (["weak:tiny_random", "weak_labels:tiny_random"], ["weak", "weak_labels"], [0, 1]),
        (["ceiling:tiny_random_l3"], ["ceiling"], [0, 2]),
        (["ceiling:tiny_random_l4"], ["ceiling"], [1, 3]),
        (["weak:tiny_random_l2", "weak_labels:tiny_random_l2"], ["weak", "weak_labels"], [2, 3]),
    ]
    # tiny_random_l2 is the strong model of pair 0 and the weak model of pair 1: one group, run by pair 1
    cfgs = grid_configs([("tiny_random", "tiny_random_l2"), ("tiny_random_l2", "tiny_random_l3")])
    groups = {g.labels[0]: g for g in planning.shared_stage_groups(cfgs)}
    assert len(groups) == 3
    g = groups["ceiling:tiny_random_l2"]
    assert (g.labels, g.source, g.names, g.jobs) == (
        ["ceiling:tiny_random_l2", "weak_labels:tiny_random_l2"], 1, ["weak", "weak_labels"], [0, 1])


def test_a_subset_run_writes_metrics_without_pgr_that_reports_skip(tmp_path, store, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    [cfg] = grid_configs(PAIRS[:1], ["stages=[weak_labels]"])
    metrics = cli.run(cfg)  # writes ./metrics.json and prints the table
    assert "acc w2s" in capsys.readouterr().out
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written == json.loads(json.dumps(metrics))
    assert written["subset"] == ["weak", "weak_labels"] and list(written["stages"]) == ["weak", "weak_labels"]
    assert written["pgr"] is None and "only stages weak, weak_labels ran" in written["pgr_reason"]
    assert written["acc"]["weak"] is not None and written["acc"]["ceiling"] is None and written["acc"]["w2s"] is None
    assert collect.rows_from_runs(Path(tmp_path)) == []
    # what the subset stored is not planned again; the rest of the grid still is
    groups = planning.shared_stage_groups(grid_configs())
    assert [g.labels[0] for g in groups] == ["ceiling:tiny_random_l3", "ceiling:tiny_random_l4", "weak:tiny_random_l2"]


def _store_all(cfg):
    """Every stage of the run's plan as stored (stand-ins: the launcher only asks whether they are done)."""
    store = Store(cfg.store_dir)
    for stage in planning.plan(cfg).values():
        store.compute(stage.key, {"kind": stage.kind}, lambda out: out.write_json("metrics.json", {}))


def test_a_job_with_stages_to_recompute_is_submitted_not_collected_here(store):
    [cfg] = grid_configs(PAIRS[:1])
    _store_all(cfg)
    launcher = W2sgSlurmLauncher()
    assert launcher._all_done(cfg)
    [cfg] = grid_configs(PAIRS[:1], ["recompute=[w2s]"])
    assert not launcher._all_done(cfg), "recompute=[w2s] trains: it runs on Slurm, not on the submitting node"
    [cfg] = grid_configs(PAIRS[:1], ["stages=[weak_labels]", "recompute=[w2s]"])
    assert launcher._all_done(cfg), "w2s is not among the stages this job runs"


def test_preempted_survives_pickling_as_a_job_result():
    import cloudpickle

    e = Preempted(signal.SIGTERM, 7, "w2s:tiny_random->tiny_random_l3", "/store/partial/abc/checkpoint.pt")
    for dumps in (pickle.dumps, cloudpickle.dumps):  # submitit writes job results with cloudpickle
        back = pickle.loads(dumps(e))
        assert (type(back), back.signum, back.step, back.stage, back.checkpoint, str(back)) == (
            Preempted, signal.SIGTERM, 7, e.stage, e.checkpoint, str(e))
    assert str(e) == "w2s:tiny_random->tiny_random_l3 stopped by SIGTERM at step 7; checkpoint saved"


class FakeJob:
    """What the launcher reads of a submitit job."""

    def __init__(self, job_id, ret=None, error=None):
        self.job_id, self._ret, self._error = job_id, ret, error
        self.paths = SimpleNamespace(stderr=f"/logs/{job_id}_0_log.err")

    def results(self):
        if self._error is not None:
            raise self._error
        return [pickle.loads(pickle.dumps(self._ret))]  # as submitit reads it back from the job's result file


def _job_return(status, value):
    ret = JobReturn()
    ret.status, ret._return_value = status, value
    return ret


def test_a_cancelled_job_is_reported_with_its_stage_step_checkpoint_and_how_to_resume():
    ckpt = "/store/partial/abc/checkpoint.pt"
    jobs = [FakeJob("11", _job_return(JobStatus.COMPLETED, 0.5)),
            FakeJob("12", _job_return(JobStatus.FAILED, Preempted(15, 7, "w2s:tiny_random->tiny_random_l3", ckpt))),
            FakeJob("13", _job_return(JobStatus.FAILED, W2SGError("task 'x': need n_train >= 2")))]
    todo = [(i, [f"weak=w{i}"], None) for i in range(3)]
    with pytest.raises(W2SGError) as info:
        W2sgSlurmLauncher()._collect(todo, jobs, [[], [], []], [], [], 3)
    lines = str(info.value).splitlines()
    assert lines[0] == ("1 of 3 jobs failed and 1 of 3 jobs were cancelled or preempted; the others finished and "
                        "their stages are stored (rerun the same command to resume or retry only what is missing):")
    assert lines[1:] == [
        "  job #1 (weak=w1), Slurm id 12: cancelled or preempted (SIGTERM) at step 7 of "
        f"w2s:tiny_random->tiny_random_l3; its checkpoint is saved ({ckpt}): rerun the sweep to resume it from there",
        "    log: /logs/12_0_log.err",
        "  job #2 (weak=w2), Slurm id 13: task 'x': need n_train >= 2",
        "    log: /logs/13_0_log.err"]
    results = W2sgSlurmLauncher()._collect(todo[:1], jobs[:1], [[]], [], [], 1)
    assert results[0].return_value == 0.5


def test_a_wandb_service_stopped_with_the_job_leaves_no_traceback(tmp_path):
    """scancel sends SIGTERM to every process of a job, W&B's service process too: the stage's run cannot finish,
    which is reported once as a warning, not as a traceback at exit ending the job's log."""
    script = textwrap.dedent(f"""
        import os, signal, subprocess, time
        from omegaconf import OmegaConf
        from w2sg.run.tracking import Tracker

        tracker = Tracker(OmegaConf.create({{"project": "t", "mode": "offline", "dir": {str(tmp_path)!r}}}), None)
        with tracker.stage_run("k" * 24, "weak:x", "weak", {{}}) as run:
            run.log({{"train/loss": 1.0}})
            services = subprocess.run(["pgrep", "-P", str(os.getpid())], capture_output=True, text=True).stdout
            assert services.split(), "a W&B service process"
            for pid in services.split():
                os.kill(int(pid), signal.SIGTERM)
            def alive(pid):  # neither gone nor a zombie
                ps = subprocess.run(["ps", "-o", "stat=", "-p", pid], capture_output=True, text=True)
                return ps.stdout.strip()[:1] not in ("", "Z")
            deadline = time.time() + 60
            while any(alive(pid) for pid in services.split()) and time.time() < deadline:
                time.sleep(0.05)
        print("done")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, WANDB_MODE="offline"))
    assert proc.returncode == 0 and proc.stdout.strip() == "done", proc.stderr
    assert proc.stderr.count("W&B tracking failed") == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


# --- each job sized to its own models (w2sg.run.resources) ------------------------------------------------------

GPU_SWEEPS = ("gpt2_grid", "pythia_checkpoints", "qwen_grid", "paper_nlp", "eleuther")


def _job_configs(sweep, extra=()):
    """The composed config (Hydra's node included) of each distinct model pair of a sweep under launcher=slurm_gpu."""
    from w2sg.app.config import compose as w2sg_compose
    from w2sg.app.config import expand_sweep

    seen, out = set(), []
    for job in expand_sweep([f"sweep={sweep}", "launcher=slurm_gpu", *extra]):
        pair = tuple(o for o in job if o.split("=")[0] in ("weak", "strong", "pair", "train"))
        if pair not in seen:
            seen.add(pair)
            out.append((job, w2sg_compose(job, with_hydra=True, conf_dir=ROOT / "conf")))
    return out


def test_each_job_of_a_mixed_grid_asks_for_its_own_resources():
    from w2sg.app.config import resolve
    from w2sg.run.resources import GB, job_memory, job_request

    mapping = "hydra.launcher.gpu_constraints={40: a100_40g, 80: a100_80g, 141: h200}"
    asked = {}
    for job, cfg in _job_configs("qwen_grid", [mapping]):
        strong = next(o.split("=")[1] for o in job if o.startswith("strong="))
        request = job_request(cfg, " ".join(job))
        need = job_memory(resolve(cfg))["bytes"]  # in bf16: the profile plans for a GPU (train.device=cuda)
        want = "a100_40g" if need <= 40 * GB else "a100_80g" if need <= 80 * GB else "h200"
        assert request["constraint"] == want, (job, need / GB)
        asked.setdefault(strong, set()).add((request["gpus_per_node"], request["mem_gb"], request["timeout_min"],
                                             request["constraint"]))
    # the 3B jobs ask for the 3B's memory and time (not the 7B's, the sweep's primary strong model), on a 40 GB GPU
    assert asked == {"qwen2_5_3b": {(1, 96, 600, "a100_40g")}, "qwen2_5_7b": {(1, 128, 720, "a100_80g")}}
    [(job, cfg)] = _job_configs("qwen_grid", ["hydra.launcher.constraint=h100", mapping, "weak=qwen2_5_0_5b",
                                              "strong=qwen2_5_3b"])
    assert job_request(cfg)["constraint"] == "h100", "a constraint the user sets wins"
    [(job, cfg)] = _job_configs("qwen_grid", ["hydra.launcher.gpu_constraints={24: l4}", "weak=qwen2_5_0_5b",
                                              "strong=qwen2_5_7b"])
    with pytest.raises(W2SGError, match=r"needs about \d\d\.\d GB on one GPU, more than the largest GPU of "
                                         r"hydra.launcher.gpu_constraints \(24 GB\); use train.mode=lora"):
        job_request(cfg, "#0")


def test_every_job_of_the_gpu_sweeps_fits_an_80gb_gpu():
    """The catalogue's GPU sweeps as shipped pass the memory check on one 80 GB GPU (the estimate every stage
    checks before it loads): long texts (512-1024 tokens) are split into minibatches small enough."""
    from w2sg.app.config import resolve
    from w2sg.run.resources import GB, job_memory

    for sweep in GPU_SWEEPS:
        for job, cfg in _job_configs(sweep):
            need = job_memory(resolve(cfg))
            assert need["bytes"] < 79 * GB, (sweep, job, need["stage"], need["bytes"] / GB)


def test_jobs_with_different_requests_are_submitted_as_different_arrays(monkeypatch):
    small = {"gpus_per_node": 1, "mem_gb": 96, "timeout_min": 600, "constraint": "a100_40g"}
    big = {"gpus_per_node": 1, "mem_gb": 128, "timeout_min": 720, "constraint": "a100_80g"}
    launcher = W2sgSlurmLauncher()
    launcher.requests = {0: small, 1: big, 2: small}
    arrays = []

    class Executor:
        def __init__(self, request):
            self.request = request

        def map_array(self, fn, overrides, *rest):
            arrays.append((self.request, [o[0] for o in overrides]))
            return [SimpleNamespace(job_id=f"{len(arrays)}_{i}", paths=SimpleNamespace(stderr="x.err"))
                    for i in range(len(overrides))]

    monkeypatch.setattr(launcher, "_executor", lambda after=(), shared=False, request=None: Executor(request))
    monkeypatch.setattr("w2sg.app.hydra_compat.singleton_state", lambda: None)
    todo = [(i, [f"strong={s}"], None) for i, s in enumerate(("3b", "7b", "3b"))]
    jobs = launcher._submit(todo, [[], [], []])
    assert sorted(arrays, key=lambda a: a[0]["mem_gb"]) == [(small, ["strong=3b", "strong=3b"]),
                                                           (big, ["strong=7b"])]
    assert [j.job_id for j in jobs] == ["1_0", "2_0", "1_1"]
