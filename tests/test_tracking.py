"""W&B (offline, read back from disk), the sweep summary, and the local report."""

import csv
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
from wandb_offline import read_run, read_runs


def _stage_metrics(store, key):
    return json.loads((store / "stages" / key / "metrics.json").read_text())


def test_every_stage_logs_an_offline_run_readable_from_disk(tmp_path, store):
    run_w2sg(TINY, tmp_path)
    [m] = metrics_files(tmp_path)
    runs = read_runs(tmp_path / "wandb")
    by_id = {}
    for r in runs:
        by_id.setdefault(r["id"], []).append(r)
    [exp] = [r for r in runs if r["job_type"] == "experiment"]
    assert set(by_id) - {exp["id"]} == {s["key"] for s in m["stages"].values()}, "run ids are the stage keys"
    assert all(len(rs) == 1 for rs in by_id.values()), "one run folder per id"
    for name, s in m["stages"].items():
        first = by_id[s["key"]][0]
        assert first["job_type"] == {"weak_labels": "labels"}.get(name, name)
        assert first["project"] == "w2sg"
        cfg = first["config"]
        assert (cfg["task"], cfg["seed"]) == ("tweet_sentiment", 0)
        if name != "weak_labels":
            assert cfg["loss"] == ("xent" if name != "w2s" else m["loss"])
            hist = first["history"]
            assert any("train/loss" in h for h in hist) and any("eval/acc" in h for h in hist)
            assert first["summary"]["acc"] == pytest.approx(_stage_metrics(store, s["key"])["acc"])
    w2s = by_id[m["stages"]["w2s"]["key"]]
    cfg = w2s[0]["config"]
    assert (cfg["weak_model"], cfg["weak_params"]) == ("tiny_random", m["weak"]["params"])
    assert (cfg["strong_model"], cfg["strong_params"]) == ("tiny_random_l2", m["strong"]["params"])
    assert "pgr" not in w2s[0]["summary"], "experiment numbers live in the experiment's run"
    # the experiment's own run: config and summary, no history
    assert exp["history"] == [] and exp["project"] == "w2sg"
    assert exp["config"]["stage_keys"] == {name: s["key"] for name, s in m["stages"].items()}
    assert exp["config"]["settings"] == json.loads(json.dumps(m["settings"]))
    assert (exp["config"]["weak_model"], exp["config"]["strong_model"]) == ("tiny_random", "tiny_random_l2")
    summary = exp["summary"]
    assert summary["acc_w2s"] == pytest.approx(m["acc"]["w2s"]) and summary["acc_weak"] == pytest.approx(m["acc"]["weak"])
    assert summary["pgr"] == (pytest.approx(m["pgr"]) if m["pgr"] is not None else None)
    # PGR's CI over test examples (or its warning) and the diagnostics reach W&B too
    assert summary.get("pgr_ci_low") == m["pgr_ci"].get("low") and summary.get("pgr_ci_warning") == m["pgr_ci"].get("warning")
    assert summary["diag_teacher_agreement_test"] == pytest.approx(m["diagnostics"]["teacher_agreement_test"])
    assert summary["diag_misfit_sq"] == pytest.approx(m["diagnostics"]["misfit_sq"])


def _folders(tmp_path):
    return sorted(p.name for p in (tmp_path / "wandb").glob("offline-run-*"))


def test_a_rerun_that_computes_nothing_writes_no_run_folder(tmp_path, warm_store):
    # warm_store: every stage computed (w2sg <TINY> logger=none), nothing tracked
    [m] = run_w2sg(TINY, tmp_path).metrics  # every stage reused: only the experiment's run, which did not exist yet
    [exp] = read_runs(tmp_path / "wandb")
    assert exp["job_type"] == "experiment" and exp["summary"]["acc_w2s"] == pytest.approx(m["acc"]["w2s"])
    first = _folders(tmp_path)
    run_w2sg(TINY, tmp_path)
    assert _folders(tmp_path) == first, "reruns that reuse every stage write no W&B run folder"
    run_w2sg(TINY + ["recompute=[w2s]"], tmp_path)  # new numbers: the w2s stage's run and the experiment's
    runs = read_runs(tmp_path / "wandb")
    assert len(_folders(tmp_path)) == 3 and sorted(r["job_type"] for r in runs) == ["experiment", "experiment", "w2s"]


def test_broken_wandb_leaves_the_run_successful(tmp_path, store):
    proc = run_w2sg(TINY + ["logger.mode=bogus"], tmp_path)
    out = proc.stdout + proc.stderr
    assert out.count("W&B tracking failed") == 1, "reported once"
    [m] = metrics_files(tmp_path)
    check_results(m, store, task_test_labels(run_config(m)))


def test_wandb_off_writes_no_runs(tmp_path, store):
    run_w2sg(TINY + ["logger=none"], tmp_path)
    assert not (tmp_path / "wandb").exists()
    assert len(metrics_files(tmp_path)) == 1
    run_w2sg(TINY + ["loss=kl"], tmp_path, env_extra={"WANDB_MODE": "disabled"})
    assert not (tmp_path / "wandb").exists()


@pytest.mark.slow  # keeps the default suite under 5 minutes; CI runs -m slow too
def test_sweep_report_table_plots_and_wandb_summary(tmp_path, store):
    run_w2sg(["-m", "sweep=tiny_grid", "seed=0,1"], tmp_path)
    [sweep_dir] = [p.parent for p in (tmp_path / "multirun").glob("*/*/multirun.yaml")]
    runs = [json.loads(p.read_text()) for p in sweep_dir.glob("*/metrics.json")]
    assert len(runs) == 8
    with open(sweep_dir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8
    expected = {(m["weak"]["model"], m["strong"]["model"], m["seed"]): m for m in runs}
    for r in rows:
        m = expected[(r["weak"], r["strong"], int(r["seed"]))]
        assert float(r["acc_w2s"]) == pytest.approx(m["acc"]["w2s"])
        assert (r["pgr"] == "") == (m["pgr"] is None)
    with open(sweep_dir / "summary.csv") as f:
        summary = list(csv.DictReader(f))
    assert len(summary) == 4 and all(s["n_seeds_run"] == "2" for s in summary)
    for name in ("pgr_vs_strong_size.png", "accuracy_vs_strong_size.png"):
        data = (sweep_dir / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    sweep_runs = [r for r in read_runs(tmp_path / "wandb") if r["job_type"] == "sweep_summary"]
    assert len(sweep_runs) == 1 and sweep_runs[0]["group"] == "tiny_grid"
    assert sweep_runs[0]["config"]["sweep_dir"] == str(sweep_dir)
    logged = sweep_runs[0]["summary"]
    assert logged["results/_type"] == "table-file" and logged["results/nrows"] == 8
    assert logged["summary/nrows"] == 4
    for chart in ("pgr_vs_strong_size", "pgr_vs_strong_size_by_loss", "w2s_acc_vs_strong_size"):
        assert logged[f"{chart}_table/nrows"] == 4  # each line plot's data
    assert logged["png/pgr_vs_strong_size/_type"] == "image-file"
    stage_runs = [r for r in read_runs(tmp_path / "wandb") if r["job_type"] in ("w2s", "experiment")]
    assert {r["group"] for r in stage_runs} == {"tiny_grid"} and len(stage_runs) == 8 + 8
    # a second invocation of the same sweep: its own summary run in the same group, and no other run folder
    before = _folders(tmp_path)
    run_w2sg(["-m", "sweep=tiny_grid", "seed=0"], tmp_path)
    [added] = [read_run(next((tmp_path / "wandb" / f).glob("run-*.wandb")))
               for f in set(_folders(tmp_path)) - set(before)]
    assert (added["job_type"], added["group"]) == ("sweep_summary", "tiny_grid")
    assert added["id"] != sweep_runs[0]["id"] and added["summary"]["results/nrows"] == 4


def test_report_command_on_a_sweep_and_on_the_store(tmp_path, store):
    runs = run_w2sg(["-m", "sweep=tiny_grid"], tmp_path).metrics
    [sweep_dir] = [p.parent for p in (tmp_path / "multirun").glob("*/*/multirun.yaml")]
    proc = run_w2sg(["report", str(sweep_dir), "--out", str(tmp_path / "a")], tmp_path)
    assert "tiny_random -> tiny_random_l3" in proc.stdout
    run_w2sg(["report", str(store), "--out", str(tmp_path / "b")], tmp_path)
    a, b = ([dict(r) for r in csv.DictReader(open(tmp_path / d / "results.csv"))] for d in ("a", "b"))
    from w2sg.results import diagnostics, stats

    assert {*stats.ci_columns({}), *diagnostics.KEYS} & set(a[0]), "CIs and diagnostics are in both"
    assert len(a) == len(runs) and a == b, "the store's experiment records give the runs' table"
    from w2sg.results.report import write_report

    curves = write_report(sweep_dir, tmp_path / "c")["curves"]
    # one PGR curve per weak model with a PGR for some strong model (one seed: the median is that PGR)
    with_pgr = sorted({m["weak"]["model"] for m in runs if m["pgr"] is not None})
    assert len(runs) == 4 and curves["pgr_vs_strong_size.png"] == [f"weak={w}, loss=xent" for w in with_pgr]
    assert curves["accuracy_vs_strong_size.png"] == [
        "ceiling (strong on ground truth)", "w2s from tiny_random (xent)", "w2s from tiny_random_l2 (xent)"]
    proc = run_w2sg(["report", str(tmp_path / "nothing")], tmp_path, check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
