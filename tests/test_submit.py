"""Submitting large sweeps: each job's config composed once per set of group choices, the same as Hydra's."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from hydra_plugins.w2sg_launcher.sweep_configs import SweepConfigs

CONF = Path(__file__).resolve().parents[1] / "conf"
COMMON = ["launcher=slurm_local", "hydra.launcher.wait=false"]  # on the command line: in every job, as Hydra does
JOBS = [[*job, "launcher=slurm_local"] for job in [
    ["experiment=smoke", "seed=0"],
    ["experiment=smoke", "seed=7", "loss=logconf", "loss.aux_coef=0.25"],
    ["experiment=smoke", "seed=1", "weak=tiny_random_l2", "train.lr=0.001"],
    ["pair=tiny", "seed=2", "train=lora", "train.lora.rank=2", "+task.load_kwargs.extra_note=hello"],
    ["experiment=smoke", "seed=3", "stages=[weak,weak_labels]", "recompute=[weak]", "hydra.job.name=other"],
    ["experiment=smoke", "seed=4", "task.data_files={train: a.jsonl, test: b.jsonl}", "store.keep_weights=all"],
]]


@pytest.fixture(scope="module")
def hydra_loader():
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    from w2sg.app.config import register

    register()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        master = loader.load_configuration("config", COMMON,
                                           RunMode.MULTIRUN)
        yield loader, master


def test_sweep_configs_equal_hydras_own_composition(hydra_loader):
    loader, master = hydra_loader
    configs = SweepConfigs(loader, master)
    seeds = [["experiment=smoke", f"seed={i}", f"train.lr={(i + 1) / 1000}", "launcher=slurm_local"] for i in range(3)]
    for shared in (False, True):  # a copy per job; one working copy while jobs set the same keys
        # the second time from the cached compositions; seeds: the same keys in a row (the working copy reused)
        no_values = [["weak=tiny_random", "strong=tiny_random_l3", "launcher=slurm_local"]]  # group choices alone
        for job in no_values + JOBS + JOBS[:2] + seeds + JOBS[1:2] + seeds[:1] + JOBS[:1] + no_values:
            fast = OmegaConf.to_container(configs(job, shared=shared), resolve=False)
            slow = OmegaConf.to_container(loader.load_sweep_config(master, job), resolve=False)
            assert fast == slow, (shared, job)
    assert len(configs.bases) == 5, "composed once per set of group choices"


def test_sweep_configs_reject_what_hydra_rejects(hydra_loader):
    loader, master = hydra_loader
    configs = SweepConfigs(loader, master)
    for bad in (["seed=abc"], ["train.no_such_key=1"], ["loss=no_such_loss"]):
        bad = [*bad, "launcher=slurm_local"]
        with pytest.raises(Exception) as slow:
            loader.load_sweep_config(master, bad)
        with pytest.raises(type(slow.value)):
            configs(bad)


def test_planning_many_jobs_decides_as_planning_each_from_scratch(hydra_loader, tmp_path):
    """Which jobs have every stage stored (collected here) and which are submitted: the launcher's fast path
    (shared compositions, memoized specs, the empty-store shortcut) against composing and planning each job."""
    from types import SimpleNamespace

    from hydra_plugins.w2sg_launcher.w2sg_launcher import W2sgSlurmLauncher
    from w2sg.app.config import resolve
    from w2sg.core import plan as planning
    from w2sg.core.graph import memoized_specs
    from w2sg.core.store import Store

    loader, master = hydra_loader
    store_dir = tmp_path / "store"
    jobs = [["experiment=smoke", f"seed={seed}", f"loss={loss}", "launcher=slurm_local", f"store_dir={store_dir}"]
            for seed in range(4) for loss in ("xent", "logconf")]
    jobs += [[*jobs[0], "recompute=[w2s]"], [*jobs[2], "stages=[weak,weak_labels]"]]

    def one_by_one():
        return [W2sgSlurmLauncher._all_done(loader.load_sweep_config(master, job)) for job in jobs]

    def launcher_path():
        launcher = W2sgSlurmLauncher()
        launcher.hydra_context, launcher.config = SimpleNamespace(config_loader=loader), master
        stores = {}
        with memoized_specs():
            return [launcher._all_done(launcher._sweep_config(job, i, shared=True), stores)
                    for i, job in enumerate(jobs)]

    assert launcher_path() == one_by_one() == [False] * len(jobs), "an empty store: every job is submitted"
    store = Store(store_dir)
    for job in jobs[:3] + jobs[4:5]:  # seed 0 (both losses), seed 1 xent, seed 2 xent: every stage stored
        for stage in planning.plan(resolve(loader.load_sweep_config(master, job))).values():
            store.compute(stage.key, {"kind": stage.kind}, lambda out: out.write_json("metrics.json", {}))
    expected = [True, True, True, False, True, False, False, False, False, True]
    assert one_by_one() == expected, "seed 2 logconf needs its own w2s; recompute=[w2s] trains; a subset is stored"
    assert launcher_path() == expected


def test_no_report_is_written_for_a_sweep_submitted_without_waiting(tmp_path):
    from w2sg.app.callback import ReportCallback

    def end(wait: bool, sweep_dir):
        sweep_dir.mkdir()
        config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep_dir)}, "launcher": {"wait": wait},
                                             "runtime": {"choices": {}}}, "logger": {"name": "none"}})
        ReportCallback().on_multirun_end(config)
        return sorted(p.name for p in sweep_dir.glob("*.csv"))

    assert end(False, tmp_path / "submitted") == [], "nothing has run: no empty results.csv / summary.csv"
    assert "results.csv" in end(True, tmp_path / "awaited"), "a sweep that waited reports, even when empty"
