"""Statistics of weak-to-strong results: bootstrap confidence intervals and paired comparisons.

Two sources of noise, two intervals:

* over test examples (one run): :func:`bootstrap_over_test` resamples the test set with replacement, the same
  examples for the weak, ceiling and w2s models (paired), and recomputes their accuracies and PGR. It needs
  per-example correctness, which the experiment has (every train stage stores its test predictions).
* over seeds (a group of runs): :func:`summarize_ci` takes a results table (one row per experiment and seed,
  the columns of ``w2sg.results.report``: task, weak, weak_params, strong, strong_params, loss, seed, acc_weak,
  acc_ceiling, acc_w2s, pgr) and gives, per group, the median (or mean) over seeds with a percentile
  bootstrap CI. With fewer than ``MIN_SEEDS`` seeds it gives no CI and says so.

:func:`paired_comparison` compares two losses (or any two values of one setting) on results paired by every
other setting and the seed: the Wilcoxon signed-rank test, the sign test, and effect sizes (median and mean
difference with a bootstrap CI, matched-pairs rank-biserial correlation). :func:`plot_ci` draws the
summaries with error bars.

A PGR interval wider than ``WIDE_PGR`` (1: the whole range from "no gain" to "gap closed") means the test set
is too small to tell the result from noise; the tables carry a ``warning`` column that says so.

Every bootstrap uses ``numpy.random.default_rng(seed)``: the same inputs and seed give the same interval.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import numpy as np

from w2sg.core.errors import W2SGError

METRICS = ("acc_weak", "acc_ceiling", "acc_w2s", "pgr")
GROUP = ["task", "weak", "weak_params", "strong", "strong_params", "loss"]
MIN_SEEDS = 3  # fewer seeds than this: no CI over seeds (a bootstrap of 1 or 2 values says nothing)
WIDE_PGR = 1.0  # a PGR CI wider than this cannot tell a result from noise
LEVEL = 0.95
N_BOOT = 2000
CHUNK = 500  # resamples per batch, bounding memory at CHUNK x n_test indices

Table = Any  # a pandas DataFrame, or a list of row dicts as w2sg.results.report builds them


def _frame(rows: Table):
    import pandas as pd

    df = rows.copy() if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    return df


def _check_level(level: float) -> None:
    if not 0 < level < 1:
        raise W2SGError(f"confidence level must be between 0 and 1 (e.g. 0.95), got {level}")


def _percentiles(values: np.ndarray, level: float) -> tuple:
    alpha = (1 - level) / 2
    lo, hi = np.quantile(values, [alpha, 1 - alpha])
    return float(lo), float(hi)


# --- over test examples (one run) ---------------------------------------------------------------------------

def correct(probs: np.ndarray, labels: Sequence[int]) -> np.ndarray:
    """Per-example correctness (bool) of predicted class probabilities (n, classes) against labels."""
    probs, labels = np.asarray(probs), np.asarray(labels)
    if probs.ndim != 2 or len(probs) != len(labels):
        raise W2SGError(f"predictions of shape {probs.shape} do not match {len(labels)} labels "
                        "(expected one row of class probabilities per example)")
    return probs.argmax(-1) == labels


def bootstrap_over_test(weak: Sequence[bool], ceiling: Sequence[bool], w2s: Sequence[bool], n_boot: int = N_BOOT,
                   level: float = LEVEL, seed: int = 0) -> Dict[str, Any]:
    """Paired bootstrap over test examples of one run: CIs of the three accuracies and of PGR.

    ``weak``, ``ceiling``, ``w2s``: per-example correctness of each model on the same test examples (in the
    same order). Each resample draws n example indices with replacement and uses them for all three models.

    PGR is undefined in a resample where the ceiling does not beat the weak model. If that happens in more
    than (1 - level) / 2 of the resamples, a tail of the PGR distribution is unbounded: the PGR interval is
    None, with ``pgr_ci_reason``. Otherwise the percentile interval is taken over the defined resamples and
    ``pgr_undefined_share`` says how many were left out. ``warning`` is set when the PGR CI is wider than
    ``WIDE_PGR`` or unbounded: the test set is too small to tell this PGR from noise.
    """
    _check_level(level)
    arrays = [np.asarray(a, dtype=bool) for a in (weak, ceiling, w2s)]
    n = len(arrays[0])
    if n == 0 or any(a.ndim != 1 or len(a) != n for a in arrays):
        raise W2SGError("bootstrap_over_test needs per-example correctness of the weak, ceiling and w2s models on "
                        f"the same non-empty test set; got lengths {[len(a) for a in arrays]}")
    if n_boot < 100:
        raise W2SGError(f"n_boot={n_boot} is too few resamples for a {level:.0%} interval; use 1000 or more")
    rng = np.random.default_rng(seed)
    stacked = np.stack(arrays).astype(np.float64)  # (3, n)
    accs = []
    for start in range(0, n_boot, CHUNK):
        idx = rng.integers(0, n, size=(min(CHUNK, n_boot - start), n))
        accs.append(stacked[:, idx].mean(-1))  # (3, chunk)
    acc_weak, acc_ceiling, acc_w2s = np.concatenate(accs, axis=1)
    gap = acc_ceiling - acc_weak
    ok = gap > 0
    pgr = (acc_w2s[ok] - acc_weak[ok]) / gap[ok]
    out: Dict[str, Any] = {"n_test": n, "n_boot": int(n_boot), "level": level, "seed": int(seed)}
    for name, acc, a in (("acc_weak", acc_weak, arrays[0]), ("acc_ceiling", acc_ceiling, arrays[1]),
                         ("acc_w2s", acc_w2s, arrays[2])):
        out[name] = float(a.mean())
        out[f"{name}_ci"] = list(_percentiles(acc, level))
    point_gap = arrays[1].mean() - arrays[0].mean()
    out["pgr"] = float((arrays[2].mean() - arrays[0].mean()) / point_gap) if point_gap > 0 else None
    undefined = 1.0 - ok.mean()
    out["pgr_undefined_share"] = float(undefined)
    if undefined > (1 - level) / 2:
        out["pgr_ci"] = None
        out["pgr_ci_reason"] = (f"the ceiling does not beat the weak model in {undefined:.0%} of the test "
                                "resamples: PGR's interval is unbounded")
    else:
        out["pgr_ci"] = list(_percentiles(pgr, level))
    out["warning"] = noise_warning(out["pgr_ci"], n)
    return out


def noise_warning(ci: Optional[Sequence[float]], n_test: Optional[int] = None, wide: float = WIDE_PGR) -> Optional[str]:
    """A warning when a PGR interval is unbounded or wider than ``wide``; None when it is narrower."""
    where = f" (n_test={n_test})" if n_test is not None else ""
    if ci is None:
        return f"PGR's CI is unbounded: the test set{where} is too small to tell this result from noise"
    if ci[1] - ci[0] > wide:
        return (f"PGR's {ci[0]:+.2f}..{ci[1]:+.2f} CI is wider than {wide:g}: the test set{where} is too small "
                "to tell this result from noise")
    return None


def pgr_ci_entry(boot: Dict[str, Any]) -> Dict[str, Any]:
    """What a run's metrics.json keeps of :func:`bootstrap_over_test` under ``pgr_ci``."""
    keys = ("pgr_ci", "pgr_ci_reason", "pgr_undefined_share", "acc_weak_ci", "acc_ceiling_ci", "acc_w2s_ci",
            "level", "n_boot", "n_test", "seed", "warning")
    entry = {k: boot[k] for k in keys if k in boot}
    entry["low"], entry["high"] = boot["pgr_ci"] if boot["pgr_ci"] is not None else (None, None)
    entry["over"] = "test examples (paired bootstrap of the weak, ceiling and w2s predictions)"
    return entry


def ci_columns(metrics: Dict[str, Any]) -> Dict[str, Any]:
    """Columns for a results row from a run's metrics.json: its PGR CI over test examples and its warning.

    All None for a run recorded without ``pgr_ci`` (before it existed, or with only some stages)."""
    entry = metrics.get("pgr_ci") or {}
    return {"pgr_ci_low": entry.get("low"), "pgr_ci_high": entry.get("high"), "pgr_ci_warning": entry.get("warning")}


# --- over seeds (groups of runs) ----------------------------------------------------------------------------

def bootstrap_ci(values: Iterable[float], stat: str = "median", n_boot: int = 10000, level: float = LEVEL,
                 seed: int = 0) -> Dict[str, Any]:
    """Percentile bootstrap CI of the median or mean of ``values`` (e.g. one value per seed).

    None values are left out (and counted in ``n``'s absence). Fewer than ``MIN_SEEDS`` values: no interval,
    and ``ci_note`` says so."""
    _check_level(level)
    if stat not in ("median", "mean"):
        raise W2SGError(f"stat must be 'median' or 'mean', got {stat!r}")
    vals = np.asarray([v for v in values if v is not None and not _isnan(v)], dtype=np.float64)
    fn = np.median if stat == "median" else np.mean
    out: Dict[str, Any] = {"n": len(vals), "value": float(fn(vals)) if len(vals) else None,
                           "ci_low": None, "ci_high": None, "ci_note": None}
    if len(vals) < MIN_SEEDS:
        out["ci_note"] = f"{len(vals)} value(s): no CI (needs at least {MIN_SEEDS} seeds)"
        return out
    rng = np.random.default_rng(seed)
    boots = fn(vals[rng.integers(0, len(vals), size=(n_boot, len(vals)))], axis=1)
    out["ci_low"], out["ci_high"] = _percentiles(boots, level)
    return out


def _isnan(v: Any) -> bool:
    try:
        return bool(np.isnan(v))
    except TypeError:
        return False


def summarize_ci(rows: Table, group: Optional[List[str]] = None, metrics: Sequence[str] = METRICS,
                 stat: str = "median", n_boot: int = 10000, level: float = LEVEL, seed: int = 0):
    """Per group (default: every setting but the seed), ``stat`` over seeds with a bootstrap CI, as a DataFrame.

    Columns: the group's settings, ``n_seeds``, and per metric ``<metric>_<stat>``, ``<metric>_ci_low``,
    ``<metric>_ci_high``; ``ci_note`` (too few seeds for a CI) and ``warning`` (PGR's CI wider than
    ``WIDE_PGR``: these seeds cannot tell the result from noise). If the rows carry per-seed test-set CIs
    (the columns of :func:`ci_columns`), ``noisy_seeds`` counts the seeds whose own PGR CI over test examples
    is unbounded or wider than ``WIDE_PGR``, and ``warning`` says so.

    With few seeds the bootstrap over seeds understates the uncertainty (with 3 seeds the median's interval
    cannot reach beyond their min and max); the per-seed CIs over test examples show the other source of noise."""
    import pandas as pd

    df = _frame(rows)
    group = [c for c in (group if group is not None else GROUP) if c in df.columns]
    missing = [m for m in metrics if m not in df.columns]
    if missing or "seed" not in df.columns:
        raise W2SGError(f"results table lacks column(s) {missing + ([] if 'seed' in df.columns else ['seed'])}; "
                        f"it has {list(df.columns)} (one row per experiment and seed, as w2sg.results.report writes)")
    out = []
    for key, g in df.groupby(group, sort=True, dropna=False) if group else [((), df)]:
        key = key if isinstance(key, tuple) else (key,)
        s: Dict[str, Any] = dict(zip(group, key))
        s["n_seeds"] = int(g["seed"].nunique())
        notes: Dict[str, None] = {}  # ordered set
        for m in metrics:
            ci = bootstrap_ci(g[m].tolist(), stat, n_boot, level, seed)
            s[f"{m}_{stat}"], s[f"{m}_ci_low"], s[f"{m}_ci_high"] = ci["value"], ci["ci_low"], ci["ci_high"]
            if ci["ci_note"]:
                notes[f"{m}: {ci['ci_note']}"] = None
        s["ci_note"] = "; ".join(notes) or None
        s["warning"] = None
        if "pgr" in metrics and s["pgr_ci_low"] is not None and s["pgr_ci_high"] - s["pgr_ci_low"] > WIDE_PGR:
            s["warning"] = (f"PGR's CI over seeds is wider than {WIDE_PGR:g}: these {s['n_seeds']} seeds cannot "
                            "tell the result from noise")
        if "pgr_ci_warning" in g.columns:
            s["noisy_seeds"] = int(g["pgr_ci_warning"].notna().sum())
            if s["noisy_seeds"]:
                s["warning"] = "; ".join(filter(None, [s["warning"], (
                    f"{s['noisy_seeds']} of {len(g)} seeds have a PGR CI over test examples wider than {WIDE_PGR:g} "
                    "or unbounded: the test set is too small to tell their results from noise")]))
        out.append(s)
    return pd.DataFrame(out)


# --- paired comparison --------------------------------------------------------------------------------------

def paired_comparison(rows: Table, a: Any, b: Any, by: str = "loss", metric: str = "pgr",
                      keys: Optional[List[str]] = None, n_boot: int = 10000, level: float = LEVEL,
                      seed: int = 0) -> Dict[str, Any]:
    """Compare ``by == b`` against ``by == a`` on ``metric``, paired by every other setting and the seed.

    Pairs are rows equal on ``keys`` (default: task, weak, weak_params, strong, strong_params, loss and seed,
    less ``by``, as far as the table has them). The differences d = metric(b) - metric(a) are tested with the
    two-sided Wilcoxon signed-rank test (zero differences dropped; exact for small samples) and the two-sided
    sign test (binomial on the non-zero differences). Effect sizes: median and mean difference (mean with a
    bootstrap CI), the share of pairs where b beats a, and the matched-pairs rank-biserial correlation
    r = (W+ - W-) / (W+ + W-) in [-1, 1] (1: b better in every pair). Returns a dict; ``pairs`` is the
    paired DataFrame (keys, ``<metric>_a``, ``<metric>_b``, ``diff``)."""
    from scipy.stats import binomtest, rankdata, wilcoxon

    df = _frame(rows)
    for col in (by, metric):
        if col not in df.columns:
            raise W2SGError(f"results table has no column {col!r}; columns: {list(df.columns)}")
    values = sorted(df[by].dropna().unique().tolist(), key=str)
    for v in (a, b):
        if v not in values:
            raise W2SGError(f"{by}={v!r} is not in the results; valid: {', '.join(map(str, values))}")
    if a == b:
        raise W2SGError(f"compare two different values of {by!r}; got {a!r} twice")
    keys = [k for k in (keys if keys is not None else GROUP + ["seed"]) if k != by and k in df.columns]
    sides = {}
    for name, v in (("a", a), ("b", b)):
        side = df[df[by] == v][keys + [metric]]
        dup = side[side.duplicated(keys, keep=False)]
        if len(dup):
            raise W2SGError(f"{by}={v!r} has {len(dup)} rows that share {keys}: pass keys= naming the setting "
                            f"that tells them apart")
        sides[name] = side.rename(columns={metric: f"{metric}_{name}"})
    pairs = sides["a"].merge(sides["b"], on=keys, how="inner")
    unpaired = len(sides["a"]) + len(sides["b"]) - 2 * len(pairs)
    pairs = pairs.dropna(subset=[f"{metric}_a", f"{metric}_b"]).reset_index(drop=True)
    pairs["diff"] = pairs[f"{metric}_b"].astype(float) - pairs[f"{metric}_a"].astype(float)
    d = pairs["diff"].to_numpy()
    nz = d[d != 0]
    out: Dict[str, Any] = {"by": by, "a": a, "b": b, "metric": metric, "keys": keys, "n_pairs": len(d),
                           "n_unpaired": int(unpaired), "n_ties": int(len(d) - len(nz)),
                           "n_b_better": int((d > 0).sum()), "n_a_better": int((d < 0).sum()),
                           "median_diff": float(np.median(d)) if len(d) else None,
                           "mean_diff": float(np.mean(d)) if len(d) else None,
                           "mean_diff_ci": None, "wilcoxon_p": None, "sign_p": None, "rank_biserial": None,
                           "note": None, "pairs": pairs}
    if len(d) < 2 or len(nz) == 0:
        out["note"] = (f"{len(d)} pair(s), {len(nz)} with a difference: too few to test"
                       + ("" if len(d) else f" (no rows of {by}={a!r} and {by}={b!r} share {keys})"))
        return out
    out["b_better_share"] = float((d > 0).mean())
    out["sign_p"] = float(binomtest(int((nz > 0).sum()), len(nz), 0.5, alternative="two-sided").pvalue)
    out["wilcoxon_p"] = float(wilcoxon(nz, alternative="two-sided").pvalue)
    ranks = rankdata(np.abs(nz))
    w_plus, w_minus = ranks[nz > 0].sum(), ranks[nz < 0].sum()
    out["rank_biserial"] = float((w_plus - w_minus) / (w_plus + w_minus))
    ci = bootstrap_ci(d, "mean", n_boot, level, seed)
    out["mean_diff_ci"] = [ci["ci_low"], ci["ci_high"]] if ci["ci_low"] is not None else None
    if len(nz) < 6:
        out["note"] = (f"{len(nz)} non-zero differences: even a unanimous result cannot reach p < 0.05 "
                       "(two-sided); add seeds or tasks")
    return out


def comparison_row(result: Dict[str, Any]) -> Dict[str, Any]:
    """A paired comparison as one flat row (for a CSV), without the pairs table."""
    row = {k: v for k, v in result.items() if k not in ("pairs", "keys", "mean_diff_ci")}
    lo, hi = result["mean_diff_ci"] or (None, None)
    return {**row, "mean_diff_ci_low": lo, "mean_diff_ci_high": hi}


# --- plots --------------------------------------------------------------------------------------------------

def plot_ci(summary: Table, out: Union[str, Path], metric: str = "pgr", stat: str = "median",
            x: str = "strong_params", curve: Sequence[str] = ("weak", "loss"), title: Optional[str] = None) -> Path:
    """Error-bar plot of :func:`summarize_ci`'s output: ``metric`` vs ``x``, one curve per ``curve`` values.

    Bars are the bootstrap CIs over seeds; a point without a CI (too few seeds) is drawn hollow without a bar.
    ``x`` of strong_params / weak_params is drawn on a log scale in millions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = _frame(summary)
    col = f"{metric}_{stat}"
    for c in [col, f"{metric}_ci_low", f"{metric}_ci_high", x, *curve]:
        if c not in df.columns:
            raise W2SGError(f"plot_ci: the summary has no column {c!r} (pass the output of summarize_ci)")
    scale = 1e6 if x.endswith("params") else 1.0
    fig, ax = plt.subplots(figsize=(6, 4.2))
    curve = list(curve)
    groups = list(df.dropna(subset=[col]).groupby(curve, sort=True)) if curve else [((), df.dropna(subset=[col]))]
    for i, (key, g) in enumerate(groups):
        key = key if isinstance(key, tuple) else (key,)
        g = g.sort_values(x)
        label = ", ".join(f"{c}={v}" for c, v in zip(curve, key)) or metric
        dodge = 1 + 0.04 * (i - (len(groups) - 1) / 2)  # curves side by side, so their bars do not overlap
        xs, ys = g[x].to_numpy(dtype=float) / scale * dodge, g[col].to_numpy(dtype=float)
        line, = ax.plot(xs, ys, "-", label=label)
        has = g[f"{metric}_ci_low"].notna().to_numpy()
        lo = ys - g[f"{metric}_ci_low"].to_numpy(dtype=float)
        hi = g[f"{metric}_ci_high"].to_numpy(dtype=float) - ys
        if has.any():
            ax.errorbar(xs[has], ys[has], yerr=[lo[has], hi[has]], fmt="o", color=line.get_color(), capsize=3)
        if (~has).any():
            ax.plot(xs[~has], ys[~has], "o", mfc="none", color=line.get_color())
    if metric == "pgr":
        ax.axhline(0, color="grey", lw=0.8)
        ax.axhline(1, color="grey", lw=0.8, ls=":")
    if scale != 1.0:
        ax.set_xscale("log")
        ax.set_xlabel(f"{x.replace('_params', '')} model parameters (M)")
    else:
        ax.set_xlabel(x)
    ax.set_ylabel(f"{metric} ({stat} over seeds; bars: {LEVEL:.0%} bootstrap CI)")
    ax.set_title(title or f"{metric} with {LEVEL:.0%} CIs over seeds (hollow: too few seeds for a CI)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(out)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_stats(rows: Table, out: Union[str, Path], seed: int = 0, settings: Sequence[str] = ()) -> List[Path]:
    """Everything above for a report folder: ``summary_ci.csv`` (per group, median over seeds with CIs and
    warnings), ``loss_comparisons.csv`` (every two losses, paired on PGR, when the results have two or more),
    ``pgr_ci[_<task>].png`` (error bars), and ``misfit_vs_gain.png`` when the rows carry diagnostics columns.
    ``settings``: the columns that tell experiments apart besides models, task and loss (the report's setting
    columns): groups and pairs are never formed across different settings."""
    from itertools import combinations

    from w2sg.results import diagnostics

    df, out = _frame(rows), Path(out)
    written: List[Path] = []
    if df.empty:
        return written
    settings = [c for c in settings if c in df.columns]
    for c in settings:  # settings may hold lists or dicts: group on their text
        df[c] = df[c].map(lambda v: v if v is None or isinstance(v, (str, int, float, bool)) else repr(v))
    summary = summarize_ci(df, group=GROUP + settings, seed=seed)
    summary.to_csv(out / "summary_ci.csv", index=False)
    written.append(out / "summary_ci.csv")
    losses = sorted(df["loss"].dropna().unique().tolist(), key=str) if "loss" in df.columns else []
    if len(losses) >= 2:
        import pandas as pd

        # pairs: equal in everything but the loss and its own parameters
        keys = [c for c in GROUP + settings + ["seed"] if c != "loss" and not c.startswith("loss.")]
        comps = [comparison_row(paired_comparison(df, a, b, keys=keys, seed=seed)) for a, b in combinations(losses, 2)]
        pd.DataFrame(comps).to_csv(out / "loss_comparisons.csv", index=False)
        written.append(out / "loss_comparisons.csv")
    tasks = sorted(summary["task"].unique().tolist(), key=str) if "task" in summary.columns else [None]
    for task in tasks:
        part = summary if task is None else summary[summary["task"] == task]
        suffix = "" if len(tasks) == 1 else f"_{task}"
        written.append(plot_ci(part, out / f"pgr_ci{suffix}.png",
                               title=f"PGR: {task}, {LEVEL:.0%} CIs over seeds" if task else None))
    if {"misfit_sq", "gain_sq"} <= set(df.columns) and df["misfit_sq"].notna().any():
        written.append(diagnostics.plot(df, out / "misfit_vs_gain.png"))
    return written
