"""`w2sg status`: running stages from their lock, seed and loss columns, one meaning of --kind, roles as stored
(or from the label, for older stages), fast store view without heavy imports, one line per run of a sweep."""

import json
import subprocess
import sys

import pytest
from helpers import TINY, compose

from w2sg.app import config, status
from w2sg.core.plan import plan
from w2sg.core.store import Store

PROBE_LM = TINY + ["train.mode=probe", "generative=lm"]  # a plan with every stage kind: train, labels, features, lm


def _stages(overrides):
    """Every stage of a run's plan with the features and LM stages it needs, by key."""
    todo, found = list(plan(compose(overrides)).values()), {}
    while todo:
        stage = todo.pop()
        found[stage.key] = stage
        todo += stage.inputs.values()
    return found


def _meta(stage):
    return {"kind": stage.kind, "label": stage.label, "spec": stage.spec, "model_name": stage.model.name,
            "task_name": "tweet_sentiment"}


def _rows(store, overrides=None):
    rows = status.stage_rows(store) if overrides is None else status.plan_rows(store, overrides)
    return {r["key"]: r for r in rows}


def test_a_stage_being_computed_is_running_in_both_views_for_every_kind(store):
    stages = _stages(PROBE_LM)
    assert {s.kind for s in stages.values()} == {"train", "labels", "features", "lm"}
    s = Store(store)
    seen = {}

    def compute(stage):
        def fn(out):  # runs while Store.compute holds the stage's lock, before any checkpoint
            listed, planned = _rows(s)[stage.key], _rows(s, PROBE_LM)[stage.key]
            seen[stage.kind] = (listed["state"], planned["state"])
            assert (listed["kind"], listed["role"], listed["label"]) == (stage.kind, stage.role, stage.label)
            # a features stage serves every seed (its key is the encoder's): it lists none
            assert listed["seed"] == ("" if stage.kind == "features" else "0") and listed["metric"] == ""
            out.write_json("metrics.json", {"acc": 0.75})
        return fn

    for stage in stages.values():
        s.compute(stage.key, _meta(stage), compute(stage))
    assert seen == {kind: ("running", "running") for kind in ("train", "labels", "features", "lm")}
    assert {r["state"] for r in _rows(s).values()} == {"done"}
    assert {r["state"] for r in _rows(s, PROBE_LM).values()} == {"done"}


def test_a_stopped_stage_is_interrupted_with_a_checkpoint_and_stopped_without(store):
    stages = list(plan(compose(TINY)).values())
    s = Store(store)

    def stop(stage, checkpoint):
        def fn(out):
            if checkpoint:
                (s.partial_dir(stage.key) / "checkpoint.pt").write_bytes(b"0")
            raise KeyboardInterrupt
        return fn

    for i in (0, 2):  # the weak model stops after a checkpoint; the ceiling before its first one
        with pytest.raises(KeyboardInterrupt):
            s.compute(stages[i].key, _meta(stages[i]), stop(stages[i], checkpoint=i == 0))
    listed = _rows(s)  # a stage stopped before its first checkpoint is listed too (a rerun starts it afresh)
    assert sorted(listed) == sorted([stages[0].key, stages[2].key])
    assert (listed[stages[0].key]["state"], listed[stages[0].key]["label"]) == ("interrupted", stages[0].label)
    assert (listed[stages[2].key]["state"], listed[stages[2].key]["label"]) == ("stopped", stages[2].label)
    planned = _rows(s, TINY)
    assert planned[stages[0].key]["state"] == "interrupted" and planned[stages[2].key]["state"] == "stopped"
    assert planned[stages[1].key]["state"] == "missing"


def _store_fake(s, seed, loss, acc, kind="train", label="w2s:tiny_random->tiny_random_l2"):
    meta = {"kind": kind, "label": label, "spec": {"seed": seed, "loss": {"name": loss}}, "model_name": "m",
            "task_name": "tweet_sentiment"}
    key = f"{kind}{seed}{loss}".ljust(24, "0")
    s.compute(key, meta, lambda out: out.write_json("metrics.json", {"acc": acc, "history": []}))
    return key


def test_seed_and_loss_columns_tell_the_runs_of_a_sweep_apart(store, capsys):
    s = Store(store)
    for seed in (0, 1, 2):
        _store_fake(s, seed, "xent", 0.5 + seed / 10)
    _store_fake(s, 0, "logconf", 0.7)
    assert status.main([]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["KEY", "KIND", "ROLE", "LABEL", "TASK", "SEED", "LOSS", "STATE", "METRIC", "AGE"]
    rows = sorted(tuple(line.split()[5:9]) for line in lines[1:5])
    assert rows == [("0", "logconf", "done", "acc=0.7000"), ("0", "xent", "done", "acc=0.5000"),
                    ("1", "xent", "done", "acc=0.6000"), ("2", "xent", "done", "acc=0.7000")]
    assert status.main(["--seed", "1", "--loss", "xent"]) == 0
    assert "1 stages: 1 done" in capsys.readouterr().out
    planned = {r["role"]: r for r in status.plan_rows(s, TINY + ["seed=2", "loss=logconf"])}
    assert {role: (r["seed"], r["loss"]) for role, r in planned.items()} == {
        "weak": ("2", "xent"), "labels": ("2", ""), "ceiling": ("2", "xent"), "w2s": ("2", "logconf")}


def test_kind_is_the_stage_kind_in_both_views_and_role_the_part(store, capsys):
    s = Store(store)
    _store_fake(s, 0, "xent", 0.5)
    _store_fake(s, 0, "xent", 0.6, kind="labels", label="weak_labels:tiny_random")
    for view in ([], TINY):
        assert status.main(["--kind", "train", *view]) == 0
        out = capsys.readouterr().out
        assert "labels" not in out.split("\n\n")[0] and ("1 stages" if not view else "3 stages") in out
        assert status.main(["--role", "w2s", *view]) == 0
        assert "1 stages" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        status.main(["--kind", "w2s"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert "unknown kind 'w2s'; valid: train, labels, transform, features, lm; 'w2s' is a role: use --role w2s" in err
    with pytest.raises(SystemExit):
        status.main(["--role", "wek"])
    assert ("unknown role 'wek'; valid: weak, ceiling, w2s, link, s2s, labels, transform, features, lm"
            in capsys.readouterr().err)


def test_roles_in_the_store_view_match_the_plan():
    for overrides in (TINY + ["chain=tiny"], TINY + ["s2s=2"], PROBE_LM):
        for stage in _stages(overrides).values():
            assert status.role_of(stage.kind, stage.label) == stage.role, stage.label


def test_the_role_is_the_stored_one_and_from_the_label_only_for_stages_stored_without(store, capsys):
    s = Store(store)
    recorded = _store_fake(s, 0, "xent", 0.5, label="s2s1:tiny_random_l2")
    done = store / "stages" / recorded / "DONE"
    # as stages record their role: the summary's, not the label's (which would give s2s)
    done.write_text(json.dumps({**json.loads(done.read_text()), "role": "w2s", "side": "strong"}))
    older = _store_fake(s, 1, "xent", 0.6, label="ceiling2:tiny_random_l2")
    marker = json.loads((store / "stages" / older / "DONE").read_text())
    marker.pop("role", None), marker.pop("side", None)  # as stored before stages recorded their role
    (store / "stages" / older / "DONE").write_text(json.dumps(marker))
    rows = _rows(s)
    assert (rows[recorded]["role"], rows[older]["role"]) == ("w2s", "ceiling")
    assert status.main(["--role", "w2s"]) == 0
    out = capsys.readouterr().out
    assert recorded[:12] in out and older[:12] not in out and "1 stages: 1 done" in out


def test_the_store_view_reads_the_done_marker_alone_and_older_stages_in_full(store, monkeypatch):
    s = Store(store)
    new = _store_fake(s, 0, "xent", 0.5)
    old = _store_fake(s, 1, "xent", 0.6)
    (store / "stages" / old / "DONE").write_text("")  # as stages were stored before the marker held a summary
    broken = _store_fake(s, 2, "xent", 0.7)
    (store / "stages" / broken / "DONE").unlink()
    full_reads, real_status = [], Store.status
    monkeypatch.setattr(Store, "status", lambda self, key: full_reads.append(key) or real_status(self, key))
    rows = _rows(s)
    assert sorted(full_reads) == sorted([old, broken]), "a stored stage with a summary marker is read from it alone"
    assert [rows[k]["state"] for k in (new, old, broken)] == ["done", "done", "invalid"]
    assert (rows[old]["seed"], rows[old]["loss"], rows[old]["metric"]) == ("1", "xent", "acc=0.6000")
    assert json.loads((store / "stages" / new / "DONE").read_text())["acc"] == 0.5


def test_the_store_view_resolves_the_store_as_a_run_does(store, monkeypatch):
    assert config.default_store_dir() == compose([]).store_dir == str(store)
    monkeypatch.delenv("W2SG_STORE")
    assert config.default_store_dir() == compose([]).store_dir


def test_runs_shows_each_job_of_a_sweep_with_its_stage_counts(store, capsys):
    sweep = ["-m", "--runs", "sweep=tiny_grid"]
    jobs = {tuple(o for o in job if not o.startswith("sweep=")): job for job in config.expand_sweep(sweep[2:])}
    stages = {job: plan(compose(full)) for job, full in jobs.items()}
    first, running = ("weak=tiny_random", "strong=tiny_random_l3"), ("weak=tiny_random_l2", "strong=tiny_random_l4")
    assert set(jobs) == {(f"weak={w}", f"strong={s}") for w in ("tiny_random", "tiny_random_l2")
                         for s in ("tiny_random_l3", "tiny_random_l4")}
    s = Store(store)
    for stage in stages[first].values():  # the first job is complete: the others share its weak or ceiling stages
        s.compute(stage.key, _meta(stage), lambda out: out.write_json("metrics.json", {"acc": 0.5}))

    def table(*options):
        assert status.main([*sweep, *options]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0] == "overrides of every run: sweep=tiny_grid"
        assert lines[1].split() == ["JOB", "STAGES", "DONE", "RUNNING", "INTERRUPTED", "MISSING", "OVERRIDES"]
        rows = {tuple(line.split()[6:]): tuple(map(int, line.split()[1:6])) for line in lines[2:-2]}
        return rows, lines[-1]

    seen = {}

    def while_running(out):  # the ceiling of tiny_random_l4, computed now (its lock held)
        seen["all"], seen["running"] = table(), table("--state", "running")
        out.write_json("metrics.json", {"acc": 0.5})

    ceiling = stages[running]["ceiling"]
    s.compute(ceiling.key, _meta(ceiling), while_running)
    rows, last = seen["all"]
    assert rows == {first: (4, 4, 0, 0, 0),  # stages, done, running, interrupted, missing
                    ("weak=tiny_random", "strong=tiny_random_l4"): (4, 2, 1, 0, 1),
                    ("weak=tiny_random_l2", "strong=tiny_random_l3"): (4, 1, 0, 0, 3),
                    running: (4, 0, 1, 0, 3)}
    assert last.startswith("4 runs: 1 complete, 3 partly done, 0 not started  (store: ")
    assert set(seen["running"][0]) == {("weak=tiny_random", "strong=tiny_random_l4"), running}
    rows, last = table("--role", "ceiling")  # the filters choose the stages counted
    assert rows == {first: (1, 1, 0, 0, 0), ("weak=tiny_random", "strong=tiny_random_l4"): (1, 1, 0, 0, 0),
                    ("weak=tiny_random_l2", "strong=tiny_random_l3"): (1, 1, 0, 0, 0), running: (1, 1, 0, 0, 0)}
    assert last.startswith("4 runs: 4 complete, 0 partly done, 0 not started")
    with pytest.raises(SystemExit) as exit_:
        status.main(["--runs"])
    assert exit_.value.code == 2 and "--runs lists the runs of a sweep" in capsys.readouterr().err


def test_help_documents_the_runs_view(capsys):
    with pytest.raises(SystemExit) as exit_:
        status.main(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert "w2sg status -m --runs <overrides incl. sweep=<name>>" in out and "--runs  " in out


HEAVY = ("omegaconf", "hydra", "numpy", "filelock", "torch", "pandas")


def test_the_store_view_imports_nothing_heavy(store):
    s = Store(store)
    key = _store_fake(s, 0, "xent", 0.5)
    code = ("import sys\nfrom w2sg.app import entry\nsys.argv = ['w2sg', 'status']\ntry:\n    entry.main()\n"
            f"except SystemExit as e:\n    print('exit', e.code)\nprint([m for m in {HEAVY!r} if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    lines = proc.stdout.splitlines()
    assert key[:12] in proc.stdout and "1 stages: 1 done" in proc.stdout
    assert lines[-2:] == ["exit 0", "[]"], proc.stdout


@pytest.mark.parametrize("value", [
    "${oc.env:W2SG_STORE,${oc.env:HOME}/.cache/w2sg/store}", "/srv/w2sg", "${oc.env:HOME}/s",
    "${oc.env:W2SG_STORE,/a}/b/${oc.env:HOME}", "${oc.env:NOT_SET_HERE,/a}/b/${oc.env:HOME,/h}", "'/quoted/${oc.env:HOME}'",
    "${oc.env:NOT_SET_HERE,null}/x"])
def test_the_store_dir_read_without_omegaconf_is_the_one_omegaconf_resolves(tmp_path, monkeypatch, value):
    from omegaconf import OmegaConf

    (tmp_path / "config.yaml").write_text(f"defaults:\n  - _self_\nstore_dir: {value}  # where stages go\nseed: 0\n")
    for env in ("/from/env", None):
        if env is None:
            monkeypatch.delenv("W2SG_STORE", raising=False)
        else:
            monkeypatch.setenv("W2SG_STORE", env)
        expected = str(OmegaConf.load(tmp_path / "config.yaml").store_dir)
        assert config.default_store_dir(tmp_path) == expected, (value, env)


def test_the_run_summary_counts_every_stage_that_ran_inputs_included(tmp_path, store):
    """A probe run's features stages are inputs of its train stages, not in the plan's top level; the summary's
    stage count is every stage that ran (here: every stage the store holds after a cold run)."""
    import re

    from helpers import run_w2sg

    args = TINY + ["train.mode=probe", "logger=none"]
    cold = run_w2sg(args, tmp_path)
    stored = len(list((store / "stages").iterdir()))
    [line] = re.findall(r"^stages\s+(.*)$", cold.stdout, re.M)
    assert stored > len(cold.metrics[0]["stages"]), "the plan's top level leaves the features stages out"
    assert line == f"{stored} (0 reused from the store)"
    warm = run_w2sg(args, tmp_path)
    assert re.findall(r"^stages\s+(.*)$", warm.stdout, re.M) == [f"{stored} ({stored} reused from the store)"]
