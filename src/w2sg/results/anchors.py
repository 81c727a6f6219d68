"""Published figures ("anchors") next to ours: which rows of a report reproduce them, with a verdict per row.

The anchors live beside the reproduction sweeps, in ``sweeps/anchors/*.csv`` (installed with the package as
``w2sg/conf/sweep/anchors/``), one row per published figure:

``source, sweep, kind, task, loss, baseline, models, metric, statistic, value, count, n, p_value, test, verified,
note`` and, optionally, the statistic's definition ``population, averaging, pooling, pgr_from`` (``DEFINITION``;
empty: the first value of each). ``models`` is the population the figure was measured on (``|``-separated config
names; a model with no catalogue entry keeps the source's name and matches no row); ``verified`` is ``yes`` only
when the figure was read in its source (``note`` says where).

Two kinds of anchor, each matched to the report's rows (one per experiment and seed) of its ``models`` whose weak
model is smaller than the strong one (``weak_params < strong_params``). A run's PGR is the report's ``pgr``
(accuracy) or, for ``pgr_from=auroc``, computed from the row's ``auroc_weak``/``auroc_ceiling``/``auroc_w2s``.

* ``median``: the median PGR of one task and loss (openai/weak-to-strong). With ``averaging=seed_mean_baselines``
  each model's weak and ceiling figure is first averaged over seeds (one value per model and seed) and each run's
  w2s figure is set against those; ``population=strong_more_accurate`` keeps only the pairs whose strong model is
  the more accurate (averaged); ``pooling=pairs_and_seeds``: ours is one median over all those PGRs (pairs and
  seeds), ``per_seed_then_seeds``: the median over seeds of each seed's median over pairs. The CI is always
  :func:`w2sg.results.stats.median_ci` (exact order statistics) over the per-seed medians, with its coverage
  (``ci_level``: 0.75 for 3 seeds, 0.9375 for 5). Verdicts, in this order:

  - ``no anchor figure``: the source gives no number for this row (ours is still shown);
  - ``not comparable``: a model of the anchor's population has no rows (theirs pools pairs we did not run), or no
    run has the figures the anchor's PGR needs (e.g. no AUROC);
  - ``no CI``: fewer than 3 seeds;
  - ``inconclusive``: our CI is wider than ``WIDE_MEDIAN`` (0.5 PGR units), too wide to confirm a figure;
  - ``reproduced``: the anchor lies inside our CI (ends included);
  - ``differs``: it lies outside.

* ``wins``: a cross-task count, ``loss`` beating ``baseline`` on ``count`` of ``n`` data sets (EleutherAI/w2s).
  Ours, per group of settings: the median PGR over seeds of every (task, weak, strong) unit run with both losses;
  the share of units where ``loss``'s median is higher (ties count as not higher), with its exact
  (Clopper-Pearson) 95% CI, and beside it our paired tests (:func:`w2sg.results.stats.paired_comparison` on the units:
  two-sided Wilcoxon and sign test; plus the one-sided Wilcoxon signed-rank p of ``loss > baseline``, the test
  the anchor reports). Verdicts: ``not comparable`` when no run has the PGR's figures; ``no CI`` with fewer than
  3 units; ``inconclusive`` when the share's CI is wider than ``WIDE_SHARE`` (0.5: it cannot tell "wins most"
  from "loses most"); ``reproduced`` when their share ``count / n`` lies inside our CI; ``differs`` otherwise.

An anchor whose task, loss (and baseline) and models no row has is ``not covered`` and is left out of
``anchors.csv``. Anchors match on task, loss and models only: that the other settings are the sweep file's
(``sweep``) is the user's to check; rows that differ in a recorded setting are compared separately.
"""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from w2sg.core.errors import W2SGError
from w2sg.results.collect import is_setting

ANCHOR_DIR = Path(__file__).resolve().parents[1] / "conf" / "sweep" / "anchors"
FIELDS = ["source", "sweep", "kind", "task", "loss", "baseline", "models", "metric", "statistic", "value", "count",
          "n", "p_value", "test", "verified", "note"]
# how the figure's statistic is defined (optional columns; empty: the default, the first of each)
DEFINITION = {"population": ("all_pairs", "strong_more_accurate"),
              "averaging": ("per_run", "seed_mean_baselines"),
              "pooling": ("per_seed_then_seeds", "pairs_and_seeds"),
              "pgr_from": ("accuracy", "auroc")}
KINDS = ("median", "wins")
MIN_UNITS = 3  # fewer data sets than this: no CI for a cross-task share
WIDE_SHARE = 0.5  # a share's CI wider than this cannot tell "wins most" from "loses most"
WIDE_MEDIAN = 0.5  # a median PGR's CI wider than this (half the span "no gain" to "gap closed"): inconclusive
VERDICTS = ("reproduced", "differs", "inconclusive", "no CI", "not comparable", "no anchor figure", "not covered")
COLUMNS = ["source", "sweep", "kind", "task", "loss", "baseline", "models", "settings", "metric", "statistic",
           "theirs", "ours", "ci_low", "ci_high", "ci_level", "n_seeds", "n_runs", "verdict", "their_p", "our_p",
           "our_wilcoxon_p_two_sided", "our_sign_p", "detail", "verified", "note"] + list(DEFINITION)


# --- loading ----------------------------------------------------------------------------------------------

def _number(value: str, field: str, where: str, kind=float) -> Optional[Any]:
    if value is None or value.strip() == "":
        return None
    try:
        return kind(value)
    except ValueError:
        raise W2SGError(f"{where}: {field}={value!r} is not a number; leave it empty when there is none") from None


def _parse(raw: Dict[str, str], where: str) -> Dict[str, Any]:
    missing = [f for f in FIELDS if f not in raw]
    if missing:
        raise W2SGError(f"{where}: missing column(s) {missing}; an anchor file has the columns {FIELDS}")
    a: Dict[str, Any] = {k: (raw.get(k) or "").strip() for k in FIELDS + list(DEFINITION)}
    for k, valid in DEFINITION.items():
        a[k] = a[k] or valid[0]
        if a[k] not in valid:
            raise W2SGError(f"{where}: {k}={a[k]!r}; valid: {', '.join(valid)}")
    if a["kind"] not in KINDS:
        raise W2SGError(f"{where}: kind={a['kind']!r}; valid: {', '.join(KINDS)}")
    a["models"] = [m for m in a["models"].split("|") if m]
    if not a["models"] or not a["loss"]:
        raise W2SGError(f"{where}: every anchor names its loss and its models (config names separated by |)")
    a["value"] = _number(a["value"], "value", where)
    a["count"] = _number(a["count"], "count", where, int)
    a["n"] = _number(a["n"], "n", where, int)
    a["p_value"] = _number(a["p_value"], "p_value", where)
    if a["kind"] == "wins":
        if not a["baseline"] or a["count"] is None or not a["n"] or not 0 <= a["count"] <= a["n"]:
            raise W2SGError(f"{where}: a 'wins' anchor needs a baseline loss and 0 <= count <= n, n > 0")
        a["value"] = a["count"] / a["n"]
    elif not a["task"] or a["task"] == "*":
        raise W2SGError(f"{where}: a 'median' anchor names one task")
    return a


def load(paths: Optional[Sequence[Path]] = None) -> List[Dict[str, Any]]:
    """Every anchor of the given CSV files (default: the shipped ``sweeps/anchors/*.csv``), parsed and checked."""
    paths = sorted(ANCHOR_DIR.glob("*.csv")) if paths is None else [Path(p) for p in paths]
    out = []
    for path in paths:
        with open(path, newline="", encoding="utf-8") as f:
            for i, raw in enumerate(csv.DictReader(f), start=2):
                out.append(_parse(raw, f"{path}, line {i}"))
    return out


# --- matching ---------------------------------------------------------------------------------------------

def _settings_label(row: Dict[str, Any], settings: Sequence[str]) -> str:
    return " ".join(f"{c}={row.get(c)}" for c in settings)


def _matching(rows: List[Dict[str, Any]], anchor: Dict[str, Any], losses: Sequence[str]) -> List[Dict[str, Any]]:
    """Rows of the anchor's models (weak smaller than strong), task (if one) and losses, with a PGR."""
    models = set(anchor["models"])
    return [r for r in rows if r.get("weak") in models and r.get("strong") in models
            and r.get("weak_params") is not None and r.get("strong_params") is not None
            and r["weak_params"] < r["strong_params"] and r.get("loss") in losses
            and (anchor["kind"] == "wins" or r.get("task") == anchor["task"])
            and (r.get("pgr") is not None or anchor["pgr_from"] == "auroc")]


def _by_settings(rows: List[Dict[str, Any]], settings: Sequence[str]) -> Dict[str, List[Dict[str, Any]]]:
    groups: Dict[str, List[Dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(json.dumps([r.get(c) for c in settings], default=str), []).append(r)
    return groups


def _base(anchor: Dict[str, Any], settings_label: str) -> Dict[str, Any]:
    row = {k: anchor[k] for k in ("source", "sweep", "kind", "task", "loss", "baseline", "metric", "statistic",
                                  "verified", "note", *DEFINITION)}
    row.update(models="|".join(anchor["models"]), settings=settings_label, theirs=anchor["value"],
               their_p=anchor["p_value"])
    return row


def median_verdict(theirs: Optional[float], low: Optional[float], high: Optional[float],
                   wide: Optional[float] = None) -> str:
    """The verdict of a figure against our CI (see the module docstring); ``wide``: default ``WIDE_MEDIAN``."""
    wide = WIDE_MEDIAN if wide is None else wide
    if theirs is None:
        return "no anchor figure"
    if low is None or high is None:
        return "no CI"
    if high - low > wide:
        return "inconclusive"
    return "reproduced" if low <= theirs <= high else "differs"


def _float(v: Any) -> Optional[float]:
    """A number from a pandas cell; None for a missing one (None or NaN)."""
    return None if v is None or v != v else float(v)


def _gap_ratio(w2s: Any, weak: Any, ceiling: Any) -> Optional[float]:
    w2s, weak, ceiling = _float(w2s), _float(weak), _float(ceiling)
    if w2s is None or weak is None or ceiling is None or ceiling == weak:
        return None
    return (w2s - weak) / (ceiling - weak)


def run_pgr(row: Dict[str, Any], anchor: Dict[str, Any]) -> Optional[float]:
    """One run's PGR as the anchor computes it: the report's ``pgr`` (accuracy) or, for ``pgr_from=auroc``, from
    the row's ``auroc_weak``/``auroc_ceiling``/``auroc_w2s`` (None where the row has no AUROC)."""
    if anchor["pgr_from"] == "accuracy":
        return _float(row.get("pgr"))
    return _gap_ratio(row.get("auroc_w2s"), row.get("auroc_weak"), row.get("auroc_ceiling"))


def pooled_pgrs(group: List[Dict[str, Any]], anchor: Dict[str, Any]) -> List[tuple]:
    """(seed, weak, strong, PGR) of each run as openai/weak-to-strong's plotting notebook computes it for
    ``averaging=seed_mean_baselines``: each model's weak and ceiling accuracy (AUROC for ``pgr_from=auroc``)
    averaged over seeds (one value per model and seed), the run's own w2s figure against them, and only the pairs
    whose strong model is the more accurate (averaged) for ``population=strong_more_accurate``. Otherwise each
    run's own PGR (:func:`run_pgr`)."""
    if anchor["averaging"] != "seed_mean_baselines":
        out = [(r["seed"], r["weak"], r["strong"], run_pgr(r, anchor)) for r in group]
        return [o for o in out if o[3] is not None]
    m = "acc" if anchor["pgr_from"] == "accuracy" else "auroc"
    per: Dict[str, Dict[tuple, List[float]]] = {"weak": {}, "ceiling": {}}
    for r in group:
        for side, model in (("weak", r["weak"]), ("ceiling", r["strong"])):
            v = _float(r.get(f"{m}_{side}"))
            if v is not None:
                per[side].setdefault((model, r["seed"]), []).append(v)
    mean: Dict[str, Dict[str, float]] = {"weak": {}, "ceiling": {}}
    for side, vals in per.items():
        by_model: Dict[str, List[float]] = {}
        for (model, _seed), v in vals.items():
            by_model.setdefault(model, []).append(statistics.fmean(v))  # one value per model and seed
        mean[side] = {model: statistics.fmean(v) for model, v in by_model.items()}
    out = []
    for r in group:
        weak, ceiling = mean["weak"].get(r["weak"]), mean["ceiling"].get(r["strong"])
        if weak is None or ceiling is None:
            continue
        if anchor["population"] == "strong_more_accurate" and not ceiling > weak:
            continue
        pgr = _gap_ratio(r.get(f"{m}_w2s"), weak, ceiling)
        if pgr is not None:
            out.append((r["seed"], r["weak"], r["strong"], pgr))
    return out


def _compare_median(anchor: Dict[str, Any], rows: List[Dict[str, Any]], settings: Sequence[str]) -> List[Dict]:
    from w2sg.results.stats import MIN_SEEDS, median_ci

    out = []
    for group in _by_settings(_matching(rows, anchor, [anchor["loss"]]), settings).values():
        runs = pooled_pgrs(group, anchor)
        per_seed: Dict[Any, List[float]] = {}
        for seed, _w, _s, pgr in runs:
            per_seed.setdefault(seed, []).append(pgr)
        seed_medians = [statistics.median(v) for v in per_seed.values()]
        ci = median_ci(seed_medians)
        pooled = anchor["pooling"] == "pairs_and_seeds"
        ours = statistics.median([p for *_, p in runs]) if pooled and runs else ci["value"]
        pairs = {(w, s) for _seed, w, s, _p in runs}
        present = {r["weak"] for r in group} | {r["strong"] for r in group}
        absent = [m for m in anchor["models"] if m not in present]
        uneven = len({len(v) for v in per_seed.values()}) > 1
        level = ci["ci_level"]
        detail = (f"{len(pairs)} pair(s): {', '.join(f'{w}->{s}' for w, s in sorted(pairs))}"
                  + (f"; {len(group) - len(runs)} run(s) without a PGR as the anchor defines it"
                     if len(runs) < len(group) else "")
                  + ("; seeds have different numbers of pairs (an incomplete sweep?)" if uneven else "")
                  + (f"; ours pools {len(runs)} PGRs over pairs and seeds (seed-averaged baselines: "
                     f"{anchor['averaging'] == 'seed_mean_baselines'}); CI of the per-seed medians" if pooled else "")
                  + (f"; CI coverage {level:.4g}" if level is not None else "")
                  + (f"; {len(per_seed)} seed(s): no CI (needs {MIN_SEEDS})" if len(per_seed) < MIN_SEEDS else ""))
        verdict = median_verdict(anchor["value"], ci["ci_low"], ci["ci_high"])
        if anchor["value"] is not None and absent:
            verdict = "not comparable"
            detail += f"; population differs: no rows of {', '.join(absent)} (theirs pools them)"
        if not runs:
            verdict = "not comparable" if anchor["value"] is not None else verdict
            detail += f"; no run has the {anchor['pgr_from']} figures the anchor's PGR needs"
        row = _base(anchor, _settings_label(group[0], settings))
        row.update(ours=ours, ci_low=ci["ci_low"], ci_high=ci["ci_high"], ci_level=level,
                   n_seeds=len(per_seed), n_runs=len(runs), verdict=verdict, detail=detail)
        out.append(row)
    return out


def wins_verdict(theirs: float, low: Optional[float], high: Optional[float], n_units: int) -> str:
    """The verdict of a cross-task share against our exact CI of it (see the module docstring)."""
    if n_units < MIN_UNITS or low is None or high is None:
        return "no CI"
    if high - low > WIDE_SHARE:
        return "inconclusive"
    return "reproduced" if low <= theirs <= high else "differs"


def _compare_wins(anchor: Dict[str, Any], rows: List[Dict[str, Any]], settings: Sequence[str]) -> List[Dict]:
    from scipy.stats import binomtest, wilcoxon

    from w2sg.results.stats import paired_comparison

    a, b = anchor["baseline"], anchor["loss"]
    shared = [c for c in settings if not c.startswith("loss.")]  # a loss's own parameters differ between the two
    own = [c for c in settings if c.startswith("loss.")]
    groups = []
    for group in _by_settings(_matching(rows, anchor, [a, b]), shared).values():
        base = [r for r in group if r["loss"] == a]
        groups += [base + variant for variant in _by_settings([r for r in group if r["loss"] == b], own).values()]
    out = []
    for group in groups:
        units: Dict[tuple, List[float]] = {}
        for r in group:
            pgr = run_pgr(r, anchor)
            if pgr is not None:
                units.setdefault((r["task"], r["weak"], r["strong"], r["loss"]), []).append(pgr)
        if not units:
            row = _base(anchor, _settings_label(group[-1], settings))
            row.update(ours=None, ci_low=None, ci_high=None, n_seeds=len({r["seed"] for r in group}),
                       n_runs=0, verdict="not comparable",
                       detail=f"no run has the {anchor['pgr_from']} figures the anchor's PGR needs")
            out.append(row)
            continue
        medians = [{"task": t, "weak": w, "strong": s, "loss": loss, "pgr": statistics.median(v)}
                   for (t, w, s, loss), v in units.items()]
        if {m["loss"] for m in medians} != {a, b}:
            continue  # only one of the two losses ran with these settings: nothing to pair
        comp = paired_comparison(medians, a, b, keys=["task", "weak", "strong"])
        d = comp["pairs"]["diff"].to_numpy()
        n, wins = len(d), int((d > 0).sum())
        if n == 0:
            continue
        low = high = level = None
        if n >= MIN_UNITS:
            ci = binomtest(wins, n).proportion_ci(confidence_level=0.95, method="exact")
            level = 0.95
            low, high = float(ci.low), float(ci.high)
        nz = d[d != 0]
        one_sided = float(wilcoxon(nz, alternative="greater").pvalue) if len(nz) >= 2 else None
        tasks = sorted({m["task"] for m in medians})
        row = _base(anchor, _settings_label(group[-1], settings))  # the last row is one of `loss`'s
        row.update(ours=wins / n, ci_low=low, ci_high=high, ci_level=level,
                   n_seeds=len({r["seed"] for r in group}),
                   n_runs=sum(len(v) for v in units.values()),
                   verdict=wins_verdict(anchor["value"], low, high, n), our_p=one_sided,
                   our_wilcoxon_p_two_sided=comp["wilcoxon_p"], our_sign_p=comp["sign_p"],
                   detail=(f"{b} beats {a} on {wins} of {n} (task, pair) units over {len(tasks)} task(s) "
                           f"(theirs: {anchor['count']} of {anchor['n']}); {comp['n_ties']} tie(s)"
                           + (f", {comp['n_unpaired']} unit(s) with only one loss" if comp["n_unpaired"] else "")
                           + (f"; {comp['note']}" if comp["note"] else "")))
        out.append(row)
    return out


def compare(rows: List[Dict[str, Any]], settings: Optional[Sequence[str]] = None,
            anchors: Optional[List[Dict[str, Any]]] = None) -> List[Dict[str, Any]]:
    """One comparison row (``COLUMNS``) per anchor and group of settings that the report's rows cover.

    ``rows``: the report's rows (w2sg.results.collect.collect); ``settings``: the columns that tell experiments apart
    (default: every setting column of the rows); ``anchors``: default :func:`load`."""
    anchors = load() if anchors is None else anchors
    settings = sorted({c for r in rows for c in r if is_setting(c)}) if settings is None else list(settings)
    out: List[Dict[str, Any]] = []
    for anchor in anchors:
        out += (_compare_wins if anchor["kind"] == "wins" else _compare_median)(anchor, rows, settings)
    return out


def covered(anchor: Dict[str, Any], rows: List[Dict[str, Any]]) -> bool:
    """Whether any row matches the anchor (its task, loss or losses, and models)."""
    losses = [anchor["loss"]] + ([anchor["baseline"]] if anchor["kind"] == "wins" else [])
    return bool(_matching(rows, anchor, losses))


# --- output -----------------------------------------------------------------------------------------------

def write(path: Path, compared: List[Dict[str, Any]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in compared:
            w.writerow({c: r.get(c) for c in COLUMNS})
    return Path(path)


def _fmt(v: Optional[float], share: bool = False) -> str:
    if v is None:
        return "n/a"
    return f"{v:.0%}" if share else f"{v:.2f}"


def lines(compared: List[Dict[str, Any]]) -> List[str]:
    """Ours next to theirs, one line per comparison, for the terminal."""
    if not compared:
        return []
    out = ["anchors: ours [CI (coverage): over seeds for a median, 95% over data sets for a share] vs published "
           "(checked against its source: verified yes/no), with a verdict (docs/results.md 'Reproduction packs'):"]
    for r in compared:
        share = r["kind"] == "wins"
        level = f" ({r['ci_level']:.3g})" if r.get("ci_level") is not None else ""
        ci = f" [{_fmt(r['ci_low'], share)}, {_fmt(r['ci_high'], share)}]{level}" if r["ci_low"] is not None else ""
        checked = f"verified {r.get('verified') or 'no'}, PGR from {r.get('pgr_from') or 'accuracy'}"
        settings = f" {r['settings']}" if r["settings"] else ""
        if share:
            what = f"{r['loss']} beats {r['baseline']} on"
            p = lambda v: "n/a" if v is None else f"{v:.2g}"  # noqa: E731
            ps = f"; one-sided Wilcoxon p ours {p(r['our_p'])} vs theirs {p(r['their_p'])}"
            out.append(f"  {what} {_fmt(r['ours'], True)}{ci} of data sets vs {r['source']} {_fmt(r['theirs'], True)}"
                       f" ({checked}){settings} ({r['n_seeds']} seeds){ps}: {r['verdict']} ({r['detail']})")
        else:
            out.append(f"  {r['task']:<16} {r['loss']:<8} median PGR {_fmt(r['ours'])}{ci} vs {r['source']} "
                       f"{_fmt(r['theirs'])} ({checked}){settings} ({r['n_seeds']} seeds, {r['n_runs']} runs): {r['verdict']}")
    return out
