"""Bootstrap CIs over test examples and over seeds, the paired comparison, the noise warning, error-bar plots."""

import numpy as np
import pandas as pd
import pytest

from w2sg.core.errors import W2SGError
from w2sg.results import plots, report, stats


def rows_for(pgrs_by_loss, task="t", seeds=None):
    """Results rows (the report's columns) for one pair, one row per loss and seed."""
    rows = []
    for loss, pgrs in pgrs_by_loss.items():
        for seed, p in zip(seeds or range(len(pgrs)), pgrs):
            rows.append({"task": task, "weak": "w", "weak_params": 1, "strong": "s", "strong_params": 2,
                         "loss": loss, "seed": seed, "acc_weak": 0.6, "acc_ceiling": 0.8,
                         "acc_w2s": 0.6 + 0.2 * p, "pgr": p})
    return rows


# --- paired comparison: p-values against hand computation ---------------------------------------------------

def test_sign_test_p_value_matches_the_binomial_by_hand():
    a = [0.0] * 10
    b = [0.1, 0.2, 0.3, 0.05, 0.15, 0.25, 0.12, 0.22, 0.32, -0.1]  # 9 of 10 pairs favour b
    res = stats.paired_comparison(rows_for({"xent": a, "aux": b}), a="xent", b="aux")
    # two-sided: 2 * P(X >= 9), X ~ Bin(10, 1/2) = 2 * (10 + 1) / 1024
    assert res["sign_p"] == pytest.approx(22 / 1024)
    assert (res["n_pairs"], res["n_b_better"], res["n_a_better"]) == (10, 9, 1)
    assert res["b_better_share"] == pytest.approx(0.9)
    assert res["mean_diff"] == pytest.approx(np.mean(b))


def test_wilcoxon_exact_p_value_and_rank_biserial_by_hand():
    # differences 1, 2, 3, 4, 5, -6: W- = 6; of the 64 sign patterns, 14 have W- <= 6
    # ({}, six singletons, {1,2} {1,3} {1,4} {1,5} {2,3} {2,4}, {1,2,3}), so p = 2 * 14 / 64
    res = stats.paired_comparison(rows_for({"a": [0] * 6, "b": [1, 2, 3, 4, 5, -6]}), a="a", b="b")
    assert res["wilcoxon_p"] == pytest.approx(2 * 14 / 64)
    assert res["rank_biserial"] == pytest.approx((15 - 6) / 21)
    unanimous = stats.paired_comparison(rows_for({"a": [0] * 6, "b": [1, 2, 3, 4, 5, 6]}), a="a", b="b")
    assert unanimous["wilcoxon_p"] == pytest.approx(2 / 64) and unanimous["rank_biserial"] == 1.0
    assert unanimous["note"] is None


def test_pairs_match_on_task_and_seed_and_unpaired_rows_are_counted():
    rows = (rows_for({"xent": [0.1, 0.2, 0.3], "aux": [0.3, 0.4]}, task="t1")
            + rows_for({"xent": [0.0, 0.5], "aux": [0.2, 0.4]}, task="t2"))
    res = stats.paired_comparison(pd.DataFrame(rows), a="xent", b="aux")
    assert res["n_pairs"] == 4 and res["n_unpaired"] == 1  # t1 seed 2 has no aux run
    pairs = res["pairs"].sort_values(["task", "seed"])
    assert pairs["diff"].round(6).tolist() == [0.2, 0.2, 0.2, -0.1]
    assert "cannot reach p < 0.05" in res["note"], "fewer than 6 non-zero differences"
    assert stats.comparison_row(res)["mean_diff_ci_low"] <= res["mean_diff"]


def test_paired_comparison_names_bad_input():
    rows = rows_for({"xent": [0.1, 0.2], "aux": [0.3, 0.4]})
    with pytest.raises(W2SGError, match="loss='logconf' is not in the results; valid: aux, xent"):
        stats.paired_comparison(rows, a="xent", b="logconf")
    with pytest.raises(W2SGError, match="share"):
        stats.paired_comparison(rows + rows_for({"xent": [0.5]}), a="xent", b="aux")
    res = stats.paired_comparison(rows_for({"xent": [0.1]}) + rows_for({"aux": [0.1]}, seeds=[5]), "xent", "aux")
    assert res["n_pairs"] == 0 and res["wilcoxon_p"] is None and "too few" in res["note"]


# --- over test examples ---------------------------------------------------------------------------------------

def draw(rng, n, accs=(0.6, 0.8, 0.7)):
    return [rng.random(n) < a for a in accs]


def test_pgr_ci_over_test_examples_covers_the_true_value():
    rng = np.random.default_rng(1)
    covered = 0
    for rep in range(100):
        res = stats.bootstrap_over_test(*draw(rng, 1000), n_boot=500, seed=rep)
        lo, hi = res["pgr_ci"]
        covered += lo <= 0.5 <= hi  # true PGR: (0.7 - 0.6) / (0.8 - 0.6)
    assert 88 <= covered <= 100


def test_accuracy_ci_matches_the_normal_approximation_and_is_reproducible():
    rng = np.random.default_rng(0)
    weak, ceiling, w2s = draw(rng, 1000)
    res = stats.bootstrap_over_test(weak, ceiling, w2s, n_boot=4000, seed=3)
    p = weak.mean()
    lo, hi = res["acc_weak_ci"]
    assert hi - lo == pytest.approx(2 * 1.96 * np.sqrt(p * (1 - p) / 1000), rel=0.1)
    assert lo < res["acc_weak"] == p < hi
    again = stats.bootstrap_over_test(weak, ceiling, w2s, n_boot=4000, seed=3)
    assert again == res, "same inputs and seed: the same interval"


def test_resampling_is_paired_across_the_three_models():
    rng = np.random.default_rng(0)
    weak, ceiling, _ = draw(rng, 300)
    w2s = weak.copy()
    w2s[np.flatnonzero(~weak)[:15]] = True  # the student fixes 15 of the weak model's errors, nothing else
    res = stats.bootstrap_over_test(weak, ceiling, w2s, n_boot=2000, seed=0)
    gap = ceiling.mean() - weak.mean()
    # paired: every resample's w2s - weak is >= 0, so PGR's CI stays above 0 (unpaired it would cross it)
    assert res["pgr_ci"][0] > 0 and res["pgr"] == pytest.approx(15 / 300 / gap)


def test_small_test_set_warns_and_a_large_one_does_not():
    rng = np.random.default_rng(0)
    small = stats.bootstrap_over_test(*draw(rng, 40), seed=0)
    assert small["warning"] and "too small to tell this result from noise" in small["warning"]
    assert "n_test=40" in small["warning"]
    large = stats.bootstrap_over_test(*draw(rng, 20000, (0.6, 0.9, 0.75)), n_boot=500, seed=0)
    assert large["warning"] is None and large["pgr_ci"][1] - large["pgr_ci"][0] < 0.1
    entry = stats.pgr_ci_entry(small)
    assert (entry["low"], entry["high"]) == tuple(small["pgr_ci"]) and entry["warning"] == small["warning"]
    assert stats.ci_columns({"pgr_ci": entry}) == {"pgr_ci_low": entry["low"], "pgr_ci_high": entry["high"],
                                                   "pgr_ci_level": 0.95, "pgr_ci_warning": entry["warning"]}
    assert stats.ci_columns({"pgr": 0.3}) == {"pgr_ci_low": None, "pgr_ci_high": None, "pgr_ci_level": None,
                                              "pgr_ci_warning": None}


def test_a_test_set_ci_that_includes_zero_warns_however_narrow():
    assert "includes 0: the test set (n_test=5000) cannot tell this result from no gain" in \
        stats.noise_warning([-0.05, 0.30], 5000)
    assert stats.noise_warning([0.05, 0.30], 5000) is None
    assert "wider than 1 and includes 0" in stats.noise_warning([-0.5, 0.9], 40)
    assert "wider than 1:" in stats.noise_warning([0.1, 1.3], 40)
    # a large test set whose student gains nothing: narrow, but no evidence of a gain
    rng = np.random.default_rng(0)
    weak, ceiling, _ = draw(rng, 20000, (0.6, 0.9, 0.6))
    res = stats.bootstrap_over_test(weak, ceiling, weak.copy(), n_boot=500, seed=0)
    assert res["pgr_ci"][1] - res["pgr_ci"][0] < 0.1 and "includes 0" in res["warning"]
    # a run recorded under the old rule (warning only when wider than 1) is judged by today's in reports
    old = {"pgr_ci": {"low": -0.05, "high": 0.3, "level": 0.95, "n_test": 3000, "warning": None}}
    assert "includes 0" in stats.ci_columns(old)["pgr_ci_warning"]


def test_no_gap_in_many_resamples_gives_an_unbounded_interval():
    rng = np.random.default_rng(0)
    weak, _, w2s = draw(rng, 200)
    res = stats.bootstrap_over_test(weak, weak.copy(), w2s, seed=0)  # ceiling = weak: no gap anywhere
    assert res["pgr"] is None and res["pgr_ci"] is None and res["pgr_undefined_share"] == 1.0
    assert "unbounded" in res["pgr_ci_reason"] and "unbounded" in res["warning"]
    assert stats.pgr_ci_entry(res)["low"] is None


def test_bootstrap_over_test_names_bad_input():
    with pytest.raises(W2SGError, match="same non-empty test set"):
        stats.bootstrap_over_test([True, False], [True], [False, False])
    with pytest.raises(W2SGError, match="too few resamples"):
        stats.bootstrap_over_test([True], [True], [True], n_boot=10)
    with pytest.raises(W2SGError, match="do not match 3 labels"):
        stats.correct(np.ones((2, 2)) / 2, [0, 1, 1])


# --- over seeds ---------------------------------------------------------------------------------------------

def test_ci_over_seeds_covers_the_true_mean():
    rng = np.random.default_rng(0)
    covered = sum(
        (lambda ci: ci["ci_low"] <= 0.3 <= ci["ci_high"])(
            stats.bootstrap_ci(rng.normal(0.3, 0.2, size=30), "mean", n_boot=2000, seed=i))
        for i in range(200))
    assert 180 <= covered <= 198  # a percentile bootstrap of 30 values: near 95%


def test_median_ci_is_the_order_statistic_interval_with_its_real_coverage():
    from scipy.stats import binom

    # 10 values: [x_(2), x_(9)] covers the median with 1 - 2 P(Bin(10, 1/2) <= 1) = 0.9785 (x_(3), x_(8): 0.891)
    vals = [0.40, 0.15, 0.33, 0.34, -0.07, 0.47, 0.39, 0.62, 0.55, -0.09]
    ci = stats.median_ci(vals)
    assert (ci["ci_low"], ci["ci_high"]) == (-0.07, 0.55) and ci["value"] == pytest.approx(0.365)
    assert ci["ci_level"] == pytest.approx(1 - 2 * binom.cdf(1, 10, 0.5)) and ci["ci_note"] is None
    for n, j in ((3, 1), (5, 1), (6, 1), (9, 2), (17, 5), (30, 10)):
        assert stats.median_coverage(n, j) == pytest.approx(1 - 2 * binom.cdf(j - 1, n, 0.5))
        assert stats.median_coverage(n, j) >= 0.95 or j == 1, "the narrowest interval that reaches 95 %"
        assert j == (n + 1) // 2 or stats.median_coverage(n, j + 1) < 0.95
    five = stats.median_ci([0.3, None, 0.1, float("nan"), 0.5, 0.2, 0.4])
    assert (five["n"], five["ci_low"], five["ci_high"], five["ci_level"]) == (5, 0.1, 0.5, 0.9375)
    assert "below 0.95 (6 or more values reach it)" in five["ci_note"]
    # the coverage is what ci_level says: 10000 draws of 5 values from a skewed distribution
    rng = np.random.default_rng(0)
    hits = [(lambda c: c["ci_low"] <= np.log(2) <= c["ci_high"])(stats.median_ci(rng.exponential(size=5)))
            for _ in range(10000)]
    assert np.mean(hits) == pytest.approx(0.9375, abs=0.01)
    with pytest.raises(W2SGError, match="between 0 and 1"):
        stats.median_ci(vals, level=95)


def test_n_seeds_counts_the_seeds_whose_pgr_is_defined():
    rows = rows_for({"xent": [0.1, 0.2, 0.3, 0.4, 0.5]})
    rows[0]["pgr"], rows[1]["pgr"] = None, float("nan")
    full = stats.summarize(rows)
    s = full.iloc[0]
    assert (s["n_seeds"], s["n_seeds_run"], s["n_rows"]) == (3, 5, 5)
    assert s["pgr_median"] == pytest.approx(0.4) and s["acc_w2s_median"] == pytest.approx(0.66)
    assert s["pgr_ci_level"] == 0.75 and s["acc_w2s_ci_level"] == 0.9375  # 3 and 5 values
    (spread,) = stats.spread_view(full, rows)  # no duplicate seeds although only 3 have a PGR
    assert (spread["n_seeds"], spread["n_seeds_run"]) == (3, 5)
    ci = stats.ci_view(full)
    columns = list(ci.columns)
    assert columns.index("n_seeds_run") == columns.index("n_seeds") + 1 and ci["n_seeds"][0] == 3
    assert {"pgr_ci_level", "ci_method"} <= set(ci.columns) and ci["ci_method"][0].startswith("order statistics")


def test_a_ci_over_seeds_that_includes_zero_warns():
    s = stats.summarize_ci(rows_for({"xent": [-0.05, 0.1, 0.2, 0.3, 0.25, 0.15]})).iloc[0]
    assert s["pgr_ci_level"] == pytest.approx(1 - 2 / 64) and s["pgr_ci_low"] == -0.05
    assert "includes 0: these 6 seeds cannot tell the result from no gain" in s["warning"]
    clear = stats.summarize_ci(rows_for({"xent": [0.05, 0.1, 0.2, 0.3, 0.25, 0.15]})).iloc[0]
    assert pd.isna(clear["warning"])


def test_fewer_than_three_seeds_give_no_ci_and_say_so():
    ci = stats.bootstrap_ci([0.1, None, 0.5])
    assert ci["value"] == pytest.approx(0.3) and ci["ci_low"] is None and "needs at least 3 seeds" in ci["ci_note"]
    with pytest.raises(W2SGError, match="'median' or 'mean'"):
        stats.bootstrap_ci([1, 2, 3], stat="mode")


def test_summary_per_group_with_cis_notes_and_warnings():
    wide = [-0.3, 0.9, 0.2, -0.5, 1.1]  # seeds all over the place
    rows = rows_for({"xent": wide, "aux": [0.30, 0.31, 0.29, 0.30, 0.32]}) + rows_for({"xent": [0.1, 0.2]}, task="u")
    for r, w in zip(rows, ["PGR's CI is wider", None] * 6):
        r["pgr_ci_warning"] = w
    summary = stats.summarize_ci(rows).set_index(["task", "loss"])
    assert list(summary.index) == [("t", "aux"), ("t", "xent"), ("u", "xent")]
    xent = summary.loc[("t", "xent")]
    assert xent["n_seeds"] == 5 and xent["pgr_median"] == pytest.approx(0.2)
    # 5 seeds: the exact interval of the median is their min-max, which covers it with 1 - 2/32, not 95 %
    assert (xent["pgr_ci_low"], xent["pgr_ci_high"], xent["pgr_ci_level"]) == (min(wide), max(wide), 0.9375)
    assert "93.8% CI over seeds" in xent["warning"] and "below 0.95" in xent["ci_note"]
    assert "cannot tell the result from noise" in xent["warning"] and xent["noisy_seeds"] == 3
    aux = summary.loc[("t", "aux")]
    assert aux["warning"].startswith("2 of 5 seeds have a PGR CI over test examples that is unbounded, includes 0")
    rows_clean = [dict(r, pgr_ci_warning=None) for r in rows]
    aux = stats.summarize_ci(rows_clean).set_index(["task", "loss"]).loc[("t", "aux")]
    assert pd.isna(aux["warning"]) and aux["noisy_seeds"] == 0 and aux["pgr_ci_high"] - aux["pgr_ci_low"] < 0.05
    few = summary.loc[("u", "xent")]
    assert pd.isna(few["pgr_ci_low"]) and pd.isna(few["pgr_ci_high"])
    assert "pgr: 2 value(s): no CI" in few["ci_note"] and few["pgr_median"] == pytest.approx(0.15)
    again = stats.summarize_ci(pd.DataFrame(rows)).set_index(["task", "loss"])
    assert again.loc[("t", "xent"), "pgr_ci_low"] == xent["pgr_ci_low"], "seeded: reproducible"


def test_summary_names_missing_columns():
    with pytest.raises(W2SGError, match=r"lacks column\(s\) \['pgr'\]"):
        stats.summarize_ci([{"task": "t", "seed": 0, "acc_weak": 1, "acc_ceiling": 1, "acc_w2s": 1}])


def test_error_bar_plot(tmp_path):
    rows = rows_for({"xent": [0.1, 0.2, 0.3], "aux": [0.3, 0.4]})
    rows += [dict(r, strong="s2", strong_params=5, seed=r["seed"]) for r in rows]
    summary = stats.summarize_ci(rows)
    path = plots.plot_ci(summary, tmp_path / "pgr_ci.png")
    assert path.exists() and path.stat().st_size > 5000
    assert plots.ci_label(summary, "pgr") == "CI (coverage 75.0%)", "3 seeds: the min-max, named for its coverage"
    acc = plots.plot_ci(summary, tmp_path / "acc.png", metric="acc_w2s")  # the README's name for it
    assert acc.exists()
    with pytest.raises(W2SGError, match="no column 'auroc_median'"):
        plots.plot_ci(summary, tmp_path / "x.png", metric="auroc")


def test_write_stats_writes_csvs_and_plots(tmp_path):
    rows = rows_for({"xent": [0.1, 0.2, 0.3, 0.0, 0.1, 0.2], "aux": [0.3, 0.4, 0.5, 0.2, 0.3, 0.2]})
    for i, r in enumerate(rows):
        r.update(misfit_sq=0.01 * i, gain_sq=0.012 * i, misfit_disagreement=0.02 * i, gain_acc=0.01 * i)
    files = report.write_stats(rows, tmp_path)
    assert [p.name for p in files] == ["summary_ci.csv", "loss_comparisons.csv", "pgr_ci.png", "misfit_vs_gain.png"]
    comp = pd.read_csv(tmp_path / "loss_comparisons.csv")
    assert (comp.loc[0, "a"], comp.loc[0, "b"], comp.loc[0, "n_pairs"], comp.loc[0, "n_b_better"]) == ("aux", "xent", 6, 0)
    assert comp.loc[0, "sign_p"] == pytest.approx(2 / 32), "5 non-zero differences, all one way (one tie)"
    summary = pd.read_csv(tmp_path / "summary_ci.csv")
    assert list(summary["n_seeds"]) == [6, 6] and summary["pgr_ci_low"].notna().all()
    assert report.write_stats([], tmp_path / "none") == []
