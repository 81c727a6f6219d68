"""The study summaries of `w2sg report`: median PGR per loss, the largest gap, bootstrap chain vs direct."""

import csv
import hashlib
import json
import logging
import os

import pytest

from w2sg.results.report import main, write_report

SIZES = {"m1": 10, "m2": 20, "m3": 30}


def run_metrics(weak, strong, loss, seed, acc, chain=None, **settings):
    """A run's metrics.json as w2sg.run.experiment writes it; stage keys follow from everything that differs."""
    settings = {"train.mode": "full", "train.lr": 1e-3, "task.n_train": 600, **settings}
    ident = json.dumps([weak, strong, loss, seed, settings, chain is not None])
    roles = ["weak", "weak_labels", "ceiling", "w2s"] + (["link1", "ceiling1", "link2"] if chain else [])
    stages = {r: {"key": hashlib.sha256((r + ident).encode()).hexdigest()[:24], "reused": False} for r in roles}
    w, c, s = acc
    m = {"task": "t", "loss": loss, "seed": seed,
         "weak": {"model": weak, "params": SIZES[weak], "size": ""},
         "strong": {"model": strong, "params": SIZES[strong], "size": ""},
         "acc": {"weak": w, "ceiling": c, "w2s": s}, "pgr": (s - w) / (c - w), "stages": stages,
         "settings": settings}
    if chain:
        m["chain"] = {"name": "m1_m2_m3", "end_to_end": {"acc": chain, "pgr": (chain - w) / (c - w)},
                      "direct": {"acc": s, "pgr": (s - w) / (c - w)}, "bootstrap_minus_direct": chain - s}
    return m


@pytest.fixture
def sweep(tmp_path):
    runs = []
    for seed in (0, 1, 2):
        runs += [run_metrics("m1", "m2", "xent", seed, (0.6, 0.7, 0.65)),          # gap 0.10, PGR 0.5
                 run_metrics("m1", "m3", "xent", seed, (0.6, 0.8, 0.62 + 0.02 * seed)),  # gap 0.20, PGR .1 .2 .3
                 run_metrics("m1", "m2", "logconf", seed, (0.6, 0.7, 0.69)),       # PGR 0.9
                 run_metrics("m1", "m3", "logconf", seed, (0.6, 0.8, 0.7))]        # PGR 0.5
    chains = [run_metrics("m1", "m3", loss, seed, (0.6, 0.8, 0.7), chain=0.7 + d)
              for loss, d in (("xent", 0.01), ("logconf", -0.02)) for seed in (0, 1, 2)]
    for i, m in enumerate(runs):
        (tmp_path / "grid" / str(i)).mkdir(parents=True)
        (tmp_path / "grid" / str(i) / "metrics.json").write_text(json.dumps(m))
    for i, m in enumerate(chains):
        (tmp_path / "chain" / str(i)).mkdir(parents=True)
        (tmp_path / "chain" / str(i) / "metrics.json").write_text(json.dumps(m))
    return tmp_path


def test_median_pgr_per_loss_and_at_the_largest_gap(sweep):
    report = write_report(sweep / "grid")
    by_loss = {r["loss"]: r for r in report["losses"]}
    assert by_loss["xent"]["largest_gap_pair"] == "m1->m3" and by_loss["xent"]["largest_gap"] == pytest.approx(0.2)
    assert by_loss["xent"]["pgr_median"] == pytest.approx(0.4)  # median of 0.5 x3, 0.1, 0.2, 0.3
    assert by_loss["xent"]["pgr_median_at_largest_gap"] == pytest.approx(0.2)
    assert by_loss["logconf"]["pgr_median"] == pytest.approx(0.7)  # median of 0.9 x3, 0.5 x3
    assert by_loss["logconf"]["pgr_median_at_largest_gap"] == pytest.approx(0.5)
    rows = list(csv.DictReader(open(sweep / "grid" / "loss_summary.csv")))
    assert [r["loss"] for r in rows] == ["logconf", "xent"] and rows[0]["n_runs"] == "6"
    assert not (sweep / "grid" / "chains.csv").exists()


def test_chain_vs_direct_table_plot_and_printout(sweep, capsys):
    assert main([str(sweep / "chain")]) == 0
    out = capsys.readouterr().out
    assert "chain m1_m2_m3 (xent, 3 seeds): median acc chain 0.710 vs direct 0.700" in out
    assert "chain m1_m2_m3 (logconf, 3 seeds): median acc chain 0.680 vs direct 0.700" in out
    rows = list(csv.DictReader(open(sweep / "chain" / "chains.csv")))
    assert len(rows) == 6 and float(rows[0]["chain_minus_direct"]) == pytest.approx(-0.02)
    png = (sweep / "chain" / "chain_vs_direct.png").read_bytes()
    assert png[:4] == b"\x89PNG" and len(png) > 10_000


def _write(folder, metrics, mtime=None):
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(metrics))
    if mtime is not None:
        os.utime(folder / "metrics.json", (mtime, mtime))


def test_experiments_that_differ_in_a_setting_are_separate_rows_and_medians(tmp_path):
    # w2sg -m train=probe train.lr=1e-3,1e-2: two jobs, two experiments (they once became one row)
    for i, (lr, acc) in enumerate(((1e-3, (0.6, 0.7, 0.663)), (1e-2, (0.6, 0.7, 0.62)))):
        for seed in (0, 1):
            _write(tmp_path / f"{i}{seed}", run_metrics("m1", "m2", "xent", seed, acc, **{"train.lr": lr}))
    _write(tmp_path / "probe", run_metrics("m1", "m2", "xent", 0, (0.6, 0.7, 0.7), **{"train.mode": "probe"}))
    report = write_report(tmp_path)
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert len(rows) == 5 and {"train.lr", "train.mode"} <= set(rows[0]) and "task.n_train" not in rows[0]
    summary = {(s["train.mode"], s["train.lr"]): s for s in report["summary"]}
    assert set(summary) == {("full", 1e-3), ("full", 1e-2), ("probe", 1e-3)}
    assert summary["full", 1e-3]["n_seeds"] == 2 and summary["full", 1e-3]["pgr_median"] == pytest.approx(0.63)
    assert summary["full", 1e-2]["n_seeds"] == 2 and summary["full", 1e-2]["pgr_median"] == pytest.approx(0.2)
    assert summary["probe", 1e-3]["n_seeds"] == 1
    assert len({r["loss"] for r in report["losses"]}) == 1 and len(report["losses"]) == 3  # per setting too
    assert len(report["curves"]["pgr_vs_strong_size.png"]) == 3


def test_runs_of_one_experiment_are_one_row_the_newest_when_recomputed(tmp_path, caplog):
    m = run_metrics("m1", "m2", "xent", 0, (0.6, 0.7, 0.65))
    _write(tmp_path / "a", m, mtime=1000)
    _write(tmp_path / "b", m, mtime=2000)  # a rerun: every stage reused, the same numbers
    assert [r["pgr"] for r in write_report(tmp_path)["rows"]] == [pytest.approx(0.5)]
    _write(tmp_path / "c", {**m, "acc": {**m["acc"], "w2s": 0.68}, "pgr": 0.8}, mtime=3000)  # recompute=[w2s]
    with caplog.at_level(logging.WARNING, logger="w2sg.results"):
        assert [r["pgr"] for r in write_report(tmp_path)["rows"]] == [0.8]
    assert "same experiment" in caplog.text and "reporting the newer" in caplog.text


def test_a_folder_named_stages_above_the_runs_is_no_reason_to_skip_them(tmp_path):
    _write(tmp_path / "stages" / "sweep" / "0", run_metrics("m1", "m2", "xent", 0, (0.6, 0.7, 0.65)))
    assert len(write_report(tmp_path / "stages" / "sweep")["rows"]) == 1


def test_the_store_and_a_sweep_report_every_experiment_apart(tmp_path, store):
    from helpers import TINY, run_w2sg

    # the sweep: two learning rates of one probe experiment, and a run validating on a held-out share
    run_w2sg(["-m", *TINY, "train=probe", "train.lr=1e-3,1e-2"], tmp_path)
    run_w2sg(TINY + ["train.val_frac=0.25"], tmp_path)
    [sweep_dir] = [p.parent for p in (tmp_path / "multirun").glob("*/*/multirun.yaml")]
    runs = {json.loads(p.read_text())["settings"]["train.lr"]: json.loads(p.read_text())
            for p in sweep_dir.glob("*/metrics.json")}
    sweep = write_report(sweep_dir)["rows"]
    assert sorted((r["train.lr"], r["pgr"]) for r in sweep) == sorted((lr, m["pgr"]) for lr, m in runs.items())
    assert len(list((store / "experiments").glob("*.json"))) == 3, "each run recorded its experiment"
    rows = write_report(store, tmp_path / "report")["rows"]
    got = {(r["train.mode"], r["train.lr"], r["train.val_frac"]): r for r in rows}
    assert set(got) == {("probe", 1e-3, 0.0), ("probe", 1e-2, 0.0), ("full", 1e-3, 0.25)}, "val_frac > 0 included"
    assert got["probe", 1e-2, 0.0]["acc_w2s"] == runs[1e-2]["acc"]["w2s"]
    summary = list(csv.DictReader(open(tmp_path / "report" / "summary.csv")))
    assert len(summary) == 3 and {s["n_seeds_run"] for s in summary} == {"1"}
    # n_seeds counts the seeds with a PGR (tiny random models often have none: the ceiling does not beat weak)
    assert sorted(int(s["n_seeds"]) for s in summary) == sorted(int(r["pgr"] is not None) for r in rows)
    # the store's report is the report of the runs that recorded it (the multirun and the single run)
    write_report(tmp_path, tmp_path / "runs_report")
    for name in ("results.csv", "summary.csv", "summary_ci.csv", "loss_summary.csv"):
        assert (tmp_path / "report" / name).read_text() == (tmp_path / "runs_report" / name).read_text(), name


@pytest.mark.slow  # keeps the default suite under 5 minutes; CI runs -m slow too
def test_run_folders_are_unique_per_process(tmp_path, store):
    import re
    import subprocess
    import sys

    from helpers import TINY

    def start(*args):
        return subprocess.Popen([sys.executable, "-m", "w2sg", *args], cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    procs = [start("--cfg", "hydra", "--resolve") for _ in range(2)]
    dirs = [re.findall(r"^    dir: (\S+)$", p.communicate()[0], re.M) for p in procs]
    for run_dir, sweep_dir in dirs:
        assert re.fullmatch(r"outputs/\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d-[0-9a-f]{6}", run_dir), run_dir
        assert sweep_dir == "multi" + run_dir.replace("outputs", "run", 1)
    assert dirs[0] != dirs[1]
    # two runs started together (once they shared a folder when started in the same second)
    procs = [start(*TINY, f"seed={seed}", "stages=[weak]") for seed in (0, 1)]
    assert [p.wait() for p in procs] == [0, 0], [p.stdout.read() for p in procs]
    found = sorted(json.loads(p.read_text())["seed"] for p in (tmp_path / "outputs").glob("*/*/metrics.json"))
    assert found == [0, 1]


def test_runs_that_predate_recorded_settings_are_not_merged(tmp_path, caplog):
    for i, lr in enumerate((1e-3, 1e-2)):  # an older metrics.json: no settings, so these cannot be told apart
        m = run_metrics("m1", "m2", "xent", 0, (0.6, 0.7, 0.65 + 0.01 * i), **{"train.lr": lr})
        del m["settings"]
        _write(tmp_path / str(i), m)
    with caplog.at_level(logging.WARNING, logger="w2sg.results"):
        report = write_report(tmp_path)
    assert len(report["rows"]) == 2 and [s["n_seeds"] for s in report["summary"]] == [1, 1]
    assert "predate recorded settings" in caplog.text


def test_report_writes_cis_and_paired_loss_comparisons_apart_by_setting(tmp_path):
    """summary_ci.csv: one row per experiment (models, task, loss and every varying setting), its median over
    seeds with a CI; loss_comparisons.csv pairs xent and logconf runs only within the same settings."""
    rows = []
    for lr, lift in ((1e-3, 0.0), (1e-2, 0.05)):
        for seed in range(4):
            rows += [run_metrics("m1", "m3", "xent", seed, (0.6, 0.8, 0.62 + 0.01 * seed + lift), **{"train.lr": lr}),
                     run_metrics("m1", "m3", "logconf", seed, (0.6, 0.8, 0.66 + 0.01 * seed + lift),
                                 **{"train.lr": lr})]
    for i, m in enumerate(rows):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "metrics.json").write_text(json.dumps(m))
    report = write_report(tmp_path)
    assert tmp_path / "summary_ci.csv" in report["files"] and tmp_path / "pgr_ci.png" in report["files"]
    with open(tmp_path / "summary_ci.csv") as f:
        summary = list(csv.DictReader(f))
    assert len(summary) == 4  # 2 losses x 2 learning rates, never mixed
    row = next(s for s in summary if s["loss"] == "xent" and float(s["train.lr"]) == 1e-2)
    assert int(row["n_seeds"]) == 4
    assert float(row["pgr_median"]) == pytest.approx(0.425)  # PGRs .35 .40 .45 .50 (w2s .67 .. .70)
    # 4 seeds: the median's exact interval is their min-max, which covers it with 1 - 2/16, and says so
    assert (float(row["pgr_ci_low"]), float(row["pgr_ci_high"])) == (pytest.approx(0.35), pytest.approx(0.5))
    assert float(row["pgr_ci_level"]) == 0.875 and "below 0.95" in row["ci_note"]
    assert row["ci_method"].startswith("order statistics") and int(row["n_seeds_run"]) == 4
    with open(tmp_path / "loss_comparisons.csv") as f:
        (comp,) = list(csv.DictReader(f))
    assert int(comp["n_pairs"]) == 8 and int(comp["n_unpaired"]) == 0  # paired within each lr and seed
    assert (comp["a"], comp["b"]) == ("logconf", "xent")  # b - a: logconf beats xent by 0.04 / 0.2 everywhere
    assert float(comp["median_diff"]) == pytest.approx(-0.2)
    assert int(comp["n_a_better"]) == 8 and float(comp["sign_p"]) == pytest.approx(2 / 2 ** 8)


# --- a store's report: the experiments its runs recorded -----------------------------------------------------

def _store_experiment(store, m, record=True):
    """Store a run's stages (done) and, as `w2sg` does when a run ends, record its experiment."""
    for role, stage in m["stages"].items():
        meta = {"kind": "labels" if role.endswith("labels") else "train",
                "label": f"{role}:{m['weak']['model']}->{m['strong']['model']}"}
        store.compute(stage["key"], meta, lambda out: out.write_json("metrics.json", {}))
    return store.record_experiment(m) if record else None


@pytest.mark.parametrize("folder", ["grid", "chain"])
def test_a_store_report_is_the_report_of_the_runs_that_recorded_it(sweep, tmp_path, folder):
    from w2sg.core.store import Store

    store = Store(tmp_path / "store")
    for path in sorted((sweep / folder).glob("*/metrics.json")):
        _store_experiment(store, json.loads(path.read_text()))
    runs = write_report(sweep / folder, tmp_path / "runs")
    stored = write_report(store.root, tmp_path / "stored")
    assert [p.name for p in stored["files"]] == [p.name for p in runs["files"]]
    assert "chains.csv" in [p.name for p in stored["files"]] if folder == "chain" else "loss_summary.csv"
    for path in runs["files"]:
        other = tmp_path / "stored" / path.name
        if path.suffix == ".csv":
            assert other.read_text() == path.read_text(), path.name
    assert stored["rows"] == runs["rows"] and len(stored["rows"]) == (12 if folder == "grid" else 6)


def test_a_record_names_its_stages_and_replaces_that_of_a_rerun(tmp_path):
    from w2sg.core.store import Store
    from w2sg.results.collect import rows_from_store
    from w2sg.run.tracking import experiment_run_id

    store = Store(tmp_path / "store")
    m = run_metrics("m1", "m2", "xent", 0, (0.6, 0.7, 0.65))
    path = _store_experiment(store, m)
    assert path == store.root / "experiments" / f"{experiment_run_id(s['key'] for s in m['stages'].values())}.json"
    assert json.loads(path.read_text()) == m and list(store.experiments()) == [m]
    recomputed = {**m, "acc": {**m["acc"], "w2s": 0.68}, "pgr": 0.8}  # recompute=[w2s]: same stage keys
    assert store.record_experiment(recomputed) == path
    assert sorted(p.name for p in (store.root / "experiments").iterdir()) == [path.name], "no temp file left"
    assert [r["pgr"] for r in rows_from_store(store.root)] == [0.8]
    subset = {**m, "subset": ["weak", "weak_labels"], "stages": {k: m["stages"][k] for k in ("weak", "weak_labels")}}
    assert store.record_experiment(subset) is None and len(list(store.experiments())) == 1, "stages= runs: none"
    other = run_metrics("m1", "m3", "xent", 0, (0.6, 0.8, 0.7))
    _store_experiment(store, other)
    os.utime(path, (1, 1))
    assert [r["strong"]["model"] for r in store.experiments()] == ["m2", "m3"], "oldest record first"


def test_a_record_whose_stages_are_gone_is_skipped_with_a_count(tmp_path, caplog):
    import shutil

    from w2sg.core.store import Store

    store = Store(tmp_path / "store")
    kept, gone = (run_metrics("m1", strong, "xent", 0, (0.6, 0.7, 0.65)) for strong in ("m2", "m3"))
    for m in (kept, gone):
        _store_experiment(store, m)
    shutil.rmtree(store.stage_path(gone["stages"]["ceiling"]["key"]))
    with caplog.at_level(logging.WARNING, logger="w2sg.results"):
        rows = write_report(store.root, tmp_path / "out")["rows"]
    assert [r["strong"] for r in rows] == ["m2"]
    assert "1 experiment record(s) in" in caplog.text and "name stages the store no longer holds" in caplog.text
    assert "belong to no recorded experiment" not in caplog.text, "its w2s stage is still named by its record"


def test_a_store_without_experiment_records_says_how_many_and_the_way_out(tmp_path, caplog):
    from w2sg.core.store import Store

    store = Store(tmp_path / "store")  # as stored before runs recorded their experiments
    for strong in ("m2", "m3"):
        _store_experiment(store, run_metrics("m1", strong, "xent", 0, (0.6, 0.7, 0.65)), record=False)
    recorded = run_metrics("m2", "m3", "xent", 0, (0.6, 0.7, 0.65))
    _store_experiment(store, recorded)
    with caplog.at_level(logging.WARNING, logger="w2sg.results"):
        assert main([str(store.root), "--out", str(tmp_path / "out")]) == 0
    err = caplog.text
    assert f"2 w2s stage(s) in {store.root} belong to no recorded experiment" in err
    assert "rerun their experiments: every stage is reused, and the run records the experiment" in err
    rows = list(csv.DictReader(open(tmp_path / "out" / "results.csv")))
    assert [(r["weak"], r["strong"]) for r in rows] == [("m2", "m3")]


def test_a_store_s_report_without_out_goes_to_a_new_folder_here_never_into_the_store(tmp_path, monkeypatch, capsys):
    from w2sg.core.store import Store

    store = Store(tmp_path / "store")
    _store_experiment(store, run_metrics("m1", "m2", "xent", 0, (0.6, 0.7, 0.65)))
    before = sorted(p.name for p in store.root.iterdir())
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert main([str(store.root)]) == 0
    assert sorted(p.name for p in store.root.iterdir()) == before, "nothing written into the store"
    [out] = here.iterdir()
    assert out.name.startswith("w2sg-report-store-") and (out / "results.csv").is_file()
    assert str(out / "results.csv") in capsys.readouterr().out
    assert main([str(store.root)]) == 0 and len(list(here.iterdir())) == 2, "a second report: a folder of its own"


def test_an_unwritable_report_folder_is_named_with_the_way_out(tmp_path, capsys):
    from w2sg.core.errors import W2SGError
    from w2sg.core.store import Store

    store = Store(tmp_path / "store")
    _store_experiment(store, run_metrics("m1", "m2", "xent", 0, (0.6, 0.7, 0.65)))
    (tmp_path / "a_file").write_text("")
    out = tmp_path / "a_file" / "report"  # cannot be created, even by root
    with pytest.raises(W2SGError, match=rf"cannot write the report into {out}: .*pass --out"):
        write_report(store.root, out)
    assert main([str(store.root), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"cannot write the report into {out}" in err and "--out" in err and "Traceback" not in err
