"""The study summaries of `w2sg report`: median PGR per loss, the largest gap, bootstrap chain vs direct."""

import csv
import json

import pytest

from w2sg.report import main, write_report

SIZES = {"m1": 10, "m2": 20, "m3": 30}


def run_metrics(weak, strong, loss, seed, acc, chain=None):
    w, c, s = acc
    m = {"task": "t", "loss": loss, "seed": seed,
         "weak": {"model": weak, "params": SIZES[weak], "size": ""},
         "strong": {"model": strong, "params": SIZES[strong], "size": ""},
         "acc": {"weak": w, "ceiling": c, "w2s": s}, "pgr": (s - w) / (c - w)}
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
