"""Statistics of weak-to-strong results: bootstrap confidence intervals, the summary over seeds, paired
comparisons.

Two sources of noise, two intervals:

* over test examples (one run): :func:`bootstrap_over_test` resamples the test set with replacement, the same
  examples for the weak, ceiling and w2s models (paired), and recomputes their accuracies and PGR. It needs
  per-example correctness, which the experiment has (every train stage stores its test predictions).
* over seeds (a group of runs): :func:`summarize` takes a results table (one row per experiment and seed,
  the columns of ``w2sg.results.collect``: task, weak, weak_params, strong, strong_params, loss, seed, acc_weak,
  acc_ceiling, acc_w2s, pgr) and gives, per group, the median, min and max over seeds and the median with its
  exact distribution-free CI (:func:`median_ci`: order statistics, whose coverage is a binomial sum; with few
  seeds it cannot reach the level asked for, and ``<metric>_ci_level`` says what it reaches: 0.9375 for the
  min-max of 5 seeds), or the mean with a percentile bootstrap CI at the stated level; with fewer than
  ``MIN_SEEDS`` seeds no CI, and it says so. That one summary serves both report tables: ``summary.csv``
  (:func:`spread_view`) and ``summary_ci.csv`` (:func:`ci_view`, :func:`summarize_ci`). :func:`loss_summary`
  gives the median PGR per loss and at the largest gap.

:func:`paired_comparison` compares two losses (or any two values of one setting) on results paired by every
other setting and the seed: the Wilcoxon signed-rank test, the sign test, and effect sizes (median and mean
difference with a bootstrap CI, matched-pairs rank-biserial correlation). The plots of these numbers are in
w2sg.results.plots (its ``plot_ci`` draws the error bars of :func:`summarize_ci`'s output).

A PGR interval that includes 0 cannot tell the result from no gain, and one wider than ``WIDE_PGR`` (1: the
whole range from "no gain" to "gap closed") cannot tell it from noise; :func:`noise_warning` says so of a run's
interval over test examples, and the summaries' ``warning`` column of the interval over seeds.

Every bootstrap uses ``numpy.random.default_rng(seed)``: the same inputs and seed give the same interval.
"""

from __future__ import annotations

import json
import math
import statistics
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from w2sg.core.errors import W2SGError

METRICS = ("acc_weak", "acc_ceiling", "acc_w2s", "pgr")  # the result columns of a row
GROUP = ["task", "weak", "weak_params", "strong", "strong_params", "loss"]  # an experiment, before its settings
MIN_SEEDS = 3  # fewer seeds than this: no CI over seeds (a bootstrap of 1 or 2 values says nothing)
WIDE_PGR = 1.0  # a PGR CI wider than this cannot tell a result from noise
LEVEL = 0.95
N_BOOT = 2000
CHUNK = 500  # resamples per batch, bounding memory at CHUNK x n_test indices

Table = Any  # a pandas DataFrame, or a list of row dicts as w2sg.results.collect builds them


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
    """A warning when a PGR interval over test examples is unbounded, includes 0 (the test set cannot tell the
    result from no gain) or is wider than ``wide`` (nor from noise); None when it is clear of 0 and narrower."""
    where = f" (n_test={n_test})" if n_test is not None else ""
    if ci is None:
        return f"PGR's CI is unbounded: the test set{where} is too small to tell this result from noise"
    lo, hi = ci
    if hi - lo > wide:
        return (f"PGR's {lo:+.2f}..{hi:+.2f} CI is wider than {wide:g}{' and includes 0' if lo <= 0 <= hi else ''}: "
                f"the test set{where} is too small to tell this result from noise")
    if lo <= 0 <= hi:
        return f"PGR's {lo:+.2f}..{hi:+.2f} CI includes 0: the test set{where} cannot tell this result from no gain"
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
    """Columns for a results row from a run's metrics.json: its PGR CI over test examples, the CI's level and its
    :func:`noise_warning`, judged now (a run recorded under an older rule gets today's warning).

    All None for a run recorded without ``pgr_ci`` (before it existed, or with only some stages)."""
    entry = metrics.get("pgr_ci") or {}
    warning = entry.get("warning")
    if "low" in entry and "high" in entry:
        ci = None if entry["low"] is None or entry["high"] is None else (entry["low"], entry["high"])
        warning = noise_warning(ci, entry.get("n_test"))
    return {"pgr_ci_low": entry.get("low"), "pgr_ci_high": entry.get("high"), "pgr_ci_level": entry.get("level"),
            "pgr_ci_warning": warning}


# --- over seeds (groups of runs) ----------------------------------------------------------------------------

def _defined(values: Iterable[Any]) -> np.ndarray:
    return np.asarray([v for v in values if v is not None and not _isnan(v)], dtype=np.float64)


def bootstrap_ci(values: Iterable[float], stat: str = "median", n_boot: int = 10000, level: float = LEVEL,
                 seed: int = 0) -> Dict[str, Any]:
    """Percentile bootstrap CI of the median or mean of ``values`` (e.g. one value per seed), at ``level``
    (``ci_level``; nominal: with few values its real coverage is lower, and for the median of n values it is
    at most that of their min-max, 1 - 2 / 2**n: use :func:`median_ci` for the median).

    None values are left out (and counted in ``n``'s absence). Fewer than ``MIN_SEEDS`` values: no interval,
    and ``ci_note`` says so."""
    _check_level(level)
    if stat not in ("median", "mean"):
        raise W2SGError(f"stat must be 'median' or 'mean', got {stat!r}")
    vals = _defined(values)
    fn = np.median if stat == "median" else np.mean
    out: Dict[str, Any] = {"n": len(vals), "value": float(fn(vals)) if len(vals) else None,
                           "ci_low": None, "ci_high": None, "ci_level": None, "ci_note": None,
                           "ci_method": f"percentile bootstrap ({n_boot} resamples)"}
    if len(vals) < MIN_SEEDS:
        out["ci_note"] = f"{len(vals)} value(s): no CI (needs at least {MIN_SEEDS} seeds)"
        return out
    rng = np.random.default_rng(seed)
    boots = fn(vals[rng.integers(0, len(vals), size=(n_boot, len(vals)))], axis=1)
    out["ci_low"], out["ci_high"] = _percentiles(boots, level)
    out["ci_level"] = level
    return out


def median_coverage(n: int, j: int) -> float:
    """The probability that [x_(j), x_(n+1-j)], the j-th smallest and j-th largest of n independent draws,
    covers the median of their distribution: 1 - 2 P(Bin(n, 1/2) <= j - 1) (exact for a continuous distribution,
    a lower bound otherwise)."""
    if not 1 <= j <= (n + 1) // 2:
        raise W2SGError(f"order statistic j={j} of n={n} values: j must be between 1 and {(n + 1) // 2}")
    return 1.0 - 2.0 * sum(math.comb(n, i) for i in range(j)) / 2.0 ** n


def median_ci(values: Iterable[float], level: float = LEVEL) -> Dict[str, Any]:
    """The exact distribution-free CI of the median of ``values`` (e.g. one value per seed), from order
    statistics: of the intervals [x_(j), x_(n+1-j)], the narrowest whose coverage (:func:`median_coverage`) is at
    least ``level``. Too few values for ``level`` (95 %: 5 or fewer) give the widest one, [min, max], whose
    coverage is lower (5 values: 0.9375; 4: 0.875; 3: 0.75). ``ci_level`` is the interval's coverage, never the
    level asked for; ``ci_note`` says when it falls short of it.

    None and NaN values are left out (``n`` counts the rest). Fewer than ``MIN_SEEDS`` values: no interval, and
    ``ci_note`` says so."""
    _check_level(level)
    vals = np.sort(_defined(values))
    n = len(vals)
    out: Dict[str, Any] = {"n": n, "value": float(np.median(vals)) if n else None, "ci_low": None,
                           "ci_high": None, "ci_level": None, "ci_note": None,
                           "ci_method": "order statistics (exact, distribution-free)"}
    if n < MIN_SEEDS:
        out["ci_note"] = f"{n} value(s): no CI (needs at least {MIN_SEEDS} seeds)"
        return out
    j = 1
    while j + 1 <= (n + 1) // 2 and median_coverage(n, j + 1) >= level:
        j += 1
    out["ci_low"], out["ci_high"] = float(vals[j - 1]), float(vals[n - j])
    out["ci_level"] = median_coverage(n, j)
    if out["ci_level"] < level:
        enough = math.ceil(math.log2(2 / (1 - level)) - 1e-9)  # the fewest values whose min-max reaches level
        out["ci_note"] = (f"{n} values: the widest interval (min to max) covers the median with probability "
                          f"{out['ci_level']:.4g}, below {level:g} ({enough} or more values reach it)")
    return out


def ci_over_seeds(values: Iterable[float], stat: str = "median", n_boot: int = 10000, level: float = LEVEL,
                  seed: int = 0) -> Dict[str, Any]:
    """The summaries' CI over seeds: :func:`median_ci` for the median, :func:`bootstrap_ci` for the mean."""
    if stat == "median":
        _check_level(level)
        return median_ci(values, level)
    return bootstrap_ci(values, stat, n_boot, level, seed)


def _isnan(v: Any) -> bool:
    try:
        return bool(np.isnan(v))
    except TypeError:
        return False


def hashable(v: Any) -> Any:
    """A group column's value as pandas can group on it: lists and dicts (settings may hold them) as their repr."""
    return v if v is None or isinstance(v, (str, int, float, bool, np.generic)) else repr(v)


def summarize(rows: Table, group: Optional[List[str]] = None, metrics: Sequence[str] = METRICS,
              stat: str = "median", n_boot: int = 10000, level: float = LEVEL, seed: int = 0):
    """The summary over seeds, per group (default: every setting but the seed), as one DataFrame: it serves both
    report tables, ``summary.csv`` (median, min and max; :func:`spread_view`) and ``summary_ci.csv`` (the
    median with its CI over seeds; :func:`summarize_ci`).

    Columns: the group's values (lists and dicts as their repr), ``n_rows``, ``n_seeds`` (the seeds whose PGR is
    defined, i.e. not null or NaN; with no ``pgr`` metric, every seed), ``n_seeds_run`` (every seed), per metric
    ``<metric>_median``, ``<metric>_min``, ``<metric>_max`` (None values left out), ``<metric>_<stat>`` with
    ``<metric>_ci_low``, ``<metric>_ci_high`` and ``<metric>_ci_level`` (:func:`ci_over_seeds`: for the median
    the exact order-statistic interval and its real coverage, e.g. 0.9375 for the min-max of 5 seeds; for the
    mean a percentile bootstrap at ``level``); ``ci_method``; ``ci_note`` (too few seeds for a CI, or for one at
    ``level``), ``warning`` (PGR's CI over seeds includes 0, or is wider than ``WIDE_PGR``: these seeds cannot
    tell the result from no gain, or from noise) and, when the rows carry per-seed test-set CIs (the columns of
    :func:`ci_columns`), ``noisy_seeds``: the seeds whose own PGR CI over test examples has a
    :func:`noise_warning` (unbounded, includes 0, or wider than ``WIDE_PGR``), which ``warning`` then names.
    Sorted by the group's values; the index is the position of each group's first row in ``rows`` (sort by it
    for the groups in the order the rows first show them).

    The CI over seeds covers the seed-to-seed spread of results measured on each seed's own test split; the
    per-seed CIs over test examples show that source of noise on its own."""
    import pandas as pd

    df = _frame(rows).reset_index(drop=True)
    group = [c for c in (group if group is not None else GROUP) if c in df.columns]
    missing = [m for m in metrics if m not in df.columns]
    if missing or "seed" not in df.columns:
        raise W2SGError(f"results table lacks column(s) {missing + ([] if 'seed' in df.columns else ['seed'])}; "
                        f"it has {list(df.columns)} (one row per experiment and seed, as w2sg.results.report writes)")
    for c in group:
        df[c] = df[c].map(hashable)
    out, first = [], []
    for key, g in df.groupby(group, sort=True, dropna=False) if group else [((), df)]:
        key = key if isinstance(key, tuple) else (key,)
        s: Dict[str, Any] = dict(zip(group, key))
        defined = g[[v is not None and not _isnan(v) for v in g["pgr"].tolist()]] if "pgr" in metrics else g
        s["n_rows"], s["n_seeds"] = len(g), int(defined["seed"].nunique())
        s["n_seeds_run"] = int(g["seed"].nunique())
        notes: Dict[str, List[str]] = {}  # note -> the metrics it is about, in order
        for m in metrics:
            vals = [v for v in g[m].tolist() if v is not None and not _isnan(v)]
            s[f"{m}_median"] = statistics.median(vals) if vals else None
            s[f"{m}_min"], s[f"{m}_max"] = (min(vals), max(vals)) if vals else (None, None)
            ci = ci_over_seeds(vals, stat, n_boot, level, seed)
            s[f"{m}_{stat}"], s[f"{m}_ci_low"], s[f"{m}_ci_high"] = ci["value"], ci["ci_low"], ci["ci_high"]
            s[f"{m}_ci_level"] = ci["ci_level"]
            s["ci_method"] = ci["ci_method"]
            if ci["ci_note"]:
                notes.setdefault(ci["ci_note"], []).append(m)
        s["ci_note"] = "; ".join(f"{', '.join(ms)}: {note}" for note, ms in notes.items()) or None
        s["warning"] = seeds_warning(s) if "pgr" in metrics else None
        if "pgr_ci_warning" in g.columns:
            s["noisy_seeds"] = int(g["pgr_ci_warning"].notna().sum())
            if s["noisy_seeds"]:
                s["warning"] = "; ".join(filter(None, [s["warning"], (
                    f"{s['noisy_seeds']} of {len(g)} seeds have a PGR CI over test examples that is unbounded, "
                    f"includes 0 or is wider than {WIDE_PGR:g}: their test sets cannot tell their results from no "
                    "gain or from noise")]))
        out.append(s)
        first.append(int(g.index[0]))
    return pd.DataFrame(out, index=first)


def seeds_warning(s: Dict[str, Any]) -> Optional[str]:
    """The warning of a summary row's PGR CI over seeds: it includes 0, or is wider than ``WIDE_PGR``."""
    lo, hi, level = s.get("pgr_ci_low"), s.get("pgr_ci_high"), s.get("pgr_ci_level")
    if lo is None or hi is None or _isnan(lo) or _isnan(hi):
        return None
    span = f"PGR's {level:.1%} CI over seeds, {lo:+.2f}..{hi:+.2f},"
    if hi - lo > WIDE_PGR:
        return (f"{span} is wider than {WIDE_PGR:g}{' and includes 0' if lo <= 0 <= hi else ''}: these "
                f"{s['n_seeds']} seeds cannot tell the result from noise")
    if lo <= 0 <= hi:
        return f"{span} includes 0: these {s['n_seeds']} seeds cannot tell the result from no gain"
    return None


def summarize_ci(rows: Table, group: Optional[List[str]] = None, metrics: Sequence[str] = METRICS,
                 stat: str = "median", n_boot: int = 10000, level: float = LEVEL, seed: int = 0):
    """Per group (default: every setting but the seed), ``stat`` over seeds with its CI, as a DataFrame
    (``summary_ci.csv``): the group's values, ``n_seeds``, ``n_seeds_run``, per metric ``<metric>_<stat>``,
    ``<metric>_ci_low``, ``<metric>_ci_high``, ``<metric>_ci_level`` (the interval's coverage), then
    ``ci_method``, ``ci_note``, ``warning`` and (with per-seed test-set CIs) ``noisy_seeds``; see
    :func:`summarize`, whose columns these are."""
    return ci_view(summarize(rows, group, metrics, stat, n_boot, level, seed), metrics, stat)


def _group_columns(summary: Any) -> List[str]:
    """The group's columns of a :func:`summarize` DataFrame (those before ``n_rows``)."""
    columns = list(summary.columns)
    return columns[:columns.index("n_rows")] if "n_rows" in columns else []


def ci_view(summary: Any, metrics: Sequence[str] = METRICS, stat: str = "median"):
    """:func:`summarize_ci`'s columns of a :func:`summarize` DataFrame, sorted by the group's values."""
    if summary.empty:
        return summary
    per_metric = [f"{m}_{x}" for m in metrics for x in (stat, "ci_low", "ci_high", "ci_level")]
    tail = ["ci_method", "ci_note", "warning"] + (["noisy_seeds"] if "noisy_seeds" in summary.columns else [])
    return summary[_group_columns(summary) + ["n_seeds", "n_seeds_run"] + per_metric + tail].reset_index(drop=True)


def spread_view(summary: Any, rows: List[Dict[str, Any]], metrics: Sequence[str] = METRICS) -> List[Dict[str, Any]]:
    """``summary.csv``'s rows of a :func:`summarize` DataFrame of ``rows`` (a list of row dicts): per group, in
    the order the rows first show the groups, its values as the rows hold them, ``n_seeds`` (PGR defined),
    ``n_seeds_run`` and each metric's median, min and max over seeds. Raises ValueError for a group with two rows
    of one seed: two experiments that no recorded setting tells apart."""
    group = _group_columns(summary)
    out = []
    for first, s in summary.sort_index().iterrows():
        row = {c: rows[first].get(c) for c in group}
        if s["n_rows"] > s["n_seeds_run"]:
            same = [r for r in rows if all(json.dumps(r.get(c), default=repr) == json.dumps(v, default=repr)
                                           for c, v in row.items())]
            raise ValueError(f"{s['n_rows'] - s['n_seeds_run']} experiment(s) of {row.get('weak')} -> "
                             f"{row.get('strong')} "
                             "share a seed and every recorded setting (w2s stages "
                             f"{', '.join(str(r.get('w2s_key')) for r in same)}); report their folders separately")
        row["n_seeds"], row["n_seeds_run"] = int(s["n_seeds"]), int(s["n_seeds_run"])
        for m in metrics:
            for x in ("median", "min", "max"):
                v = s[f"{m}_{x}"]
                row[f"{m}_{x}"] = None if v is None or _isnan(v) else v.item() if isinstance(v, np.generic) else v
        out.append(row)
    return out


def groups(rows: List[Dict[str, Any]], by: List[str]) -> Dict[Tuple, List[Dict[str, Any]]]:
    """Rows grouped by the values of some columns (keys: their JSON text), in the order the rows first show them."""
    out: Dict[Tuple, List[Dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(tuple(json.dumps(r.get(c)) for c in by), []).append(r)
    return out


def _median(vals: List[Any]) -> Optional[float]:
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def loss_summary(rows: List[Dict[str, Any]], summary: List[Dict[str, Any]],
                 settings: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    """Per task, loss and setting: median PGR over every pair and seed, and the median PGR at the largest gap.

    ``summary``: :func:`spread_view`'s rows. The largest gap is the (weak, strong) pair whose median ceiling -
    weak accuracy is largest."""
    settings = [c for c in (settings or []) if not c.startswith(("weak_model.", "weak_train.", "strong_model."))]
    out = []
    for _, rs_task in sorted(groups(rows, ["task"] + settings).items()):
        first = rs_task[0]
        ts = [s for s in summary if all(s.get(c) == first.get(c) for c in ["task"] + settings)
              and s["acc_ceiling_median"] is not None]
        gap = max(ts, key=lambda s: s["acc_ceiling_median"] - s["acc_weak_median"]) if ts else None
        for loss in sorted({r["loss"] for r in rs_task}):
            rs = [r for r in rs_task if r["loss"] == loss]
            at_gap = [r for r in rs if gap and (r["weak"], r["strong"]) == (gap["weak"], gap["strong"])]
            out.append({"task": first["task"], "loss": loss, **{c: first.get(c) for c in settings},
                        "n_runs": len(rs), "pgr_median": _median([r["pgr"] for r in rs]),
                        "pgr_positive_share": (sum(r["pgr"] > 0 for r in rs if r["pgr"] is not None)
                                               / max(1, sum(r["pgr"] is not None for r in rs))),
                        "largest_gap_pair": f"{gap['weak']}->{gap['strong']}" if gap else None,
                        "largest_gap": (gap["acc_ceiling_median"] - gap["acc_weak_median"]) if gap else None,
                        "pgr_median_at_largest_gap": _median([r["pgr"] for r in at_gap])})
    return out


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
