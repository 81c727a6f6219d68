"""Published figures ("anchors") next to ours: which rows of a report reproduce them, with a verdict per row.

The anchors live beside the reproduction sweeps, in ``sweeps/anchors/*.csv`` (installed with the package as
``w2sg/conf/sweep/anchors/``), one row per published figure:

``source, sweep, kind, task, loss, baseline, models, metric, statistic, value, count, n, p_value, test, verified,
note``. ``models`` is the model family the figure was measured on (``|``-separated config names); ``verified``
says whether the figure was checked against its source (``no``: as documented in the issue that asked for it).

Two kinds of anchor, each matched to the report's rows (one per experiment and seed) of its ``models`` whose weak
model is smaller than the strong one (``weak_params < strong_params``) and with a PGR:

* ``median``: the median PGR of one task and loss over the models' pairs and seeds (openai/weak-to-strong).
  Ours, per group of settings (the report's setting columns): for each seed, the median PGR over the pairs run
  with that seed; then the median of those over seeds, with the percentile bootstrap CI over seeds of
  :func:`w2sg.results.stats.summarize_ci` (95%, 10000 resamples; with one pair this is ``summary_ci.csv``'s
  ``pgr_ci_low``/``pgr_ci_high``). Verdicts, in this order:

  - ``no anchor figure``: the source gives no number for this row (ours is still shown);
  - ``no CI``: fewer than 3 seeds (no CI over seeds);
  - ``too noisy``: our CI is wider than 1 (``w2sg.results.stats.WIDE_PGR``: it spans "no gain" to "gap closed");
  - ``reproduced``: the anchor lies inside our CI (ends included);
  - ``differs``: it lies outside.

* ``wins``: a cross-task count, ``loss`` beating ``baseline`` on ``count`` of ``n`` data sets (EleutherAI/w2s).
  Ours, per group of settings: the median PGR over seeds of every (task, weak, strong) unit run with both losses;
  the share of units where ``loss``'s median is higher (ties count as not higher), with its exact
  (Clopper-Pearson) 95% CI, and beside it our paired tests (:func:`w2sg.results.stats.paired_comparison` on the units:
  two-sided Wilcoxon and sign test; plus the one-sided Wilcoxon signed-rank p of ``loss > baseline``, the test
  the anchor reports). Verdicts: ``no CI`` with fewer than 3 units; ``too noisy`` when the share's CI is wider
  than 0.5 (it cannot tell "wins most" from "loses most"); ``reproduced`` when their share ``count / n`` lies
  inside our CI; ``differs`` otherwise.

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
KINDS = ("median", "wins")
MIN_UNITS = 3  # fewer data sets than this: no CI for a cross-task share
WIDE_SHARE = 0.5  # a share's CI wider than this cannot tell "wins most" from "loses most"
VERDICTS = ("reproduced", "differs", "too noisy", "no CI", "no anchor figure", "not covered")
COLUMNS = ["source", "sweep", "kind", "task", "loss", "baseline", "models", "settings", "metric", "statistic",
           "theirs", "ours", "ci_low", "ci_high", "n_seeds", "n_runs", "verdict", "their_p", "our_p",
           "our_wilcoxon_p_two_sided", "our_sign_p", "detail", "verified", "note"]


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
    a: Dict[str, Any] = {k: (raw[k] or "").strip() for k in FIELDS}
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
            and (anchor["kind"] == "wins" or r.get("task") == anchor["task"]) and r.get("pgr") is not None]


def _by_settings(rows: List[Dict[str, Any]], settings: Sequence[str]) -> Dict[str, List[Dict[str, Any]]]:
    groups: Dict[str, List[Dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(json.dumps([r.get(c) for c in settings], default=str), []).append(r)
    return groups


def _base(anchor: Dict[str, Any], settings_label: str) -> Dict[str, Any]:
    row = {k: anchor[k] for k in ("source", "sweep", "kind", "task", "loss", "baseline", "metric", "statistic",
                                  "verified", "note")}
    row.update(models="|".join(anchor["models"]), settings=settings_label, theirs=anchor["value"],
               their_p=anchor["p_value"])
    return row


def median_verdict(theirs: Optional[float], low: Optional[float], high: Optional[float],
                   wide: Optional[float] = None) -> str:
    """The verdict of a figure against our CI (see the module docstring); ``wide``: default ``stats.WIDE_PGR``."""
    from w2sg.results.stats import WIDE_PGR

    wide = WIDE_PGR if wide is None else wide
    if theirs is None:
        return "no anchor figure"
    if low is None or high is None:
        return "no CI"
    if high - low > wide:
        return "too noisy"
    return "reproduced" if low <= theirs <= high else "differs"


def _float(v: Any) -> Optional[float]:
    """A number from a pandas cell; None for a missing one (None or NaN)."""
    return None if v is None or v != v else float(v)


def _compare_median(anchor: Dict[str, Any], rows: List[Dict[str, Any]], settings: Sequence[str]) -> List[Dict]:
    from w2sg.results.stats import MIN_SEEDS, summarize_ci

    out = []
    for group in _by_settings(_matching(rows, anchor, [anchor["loss"]]), settings).values():
        per_seed: Dict[Any, List[float]] = {}
        for r in group:
            per_seed.setdefault(r["seed"], []).append(r["pgr"])
        table = [{"seed": s, "pgr": statistics.median(v)} for s, v in per_seed.items()]
        ci = summarize_ci(table, group=[], metrics=["pgr"]).iloc[0]
        low, high = _float(ci["pgr_ci_low"]), _float(ci["pgr_ci_high"])
        pairs = {(r["weak"], r["strong"]) for r in group}
        uneven = len({len(v) for v in per_seed.values()}) > 1
        detail = (f"{len(pairs)} pair(s): {', '.join(f'{w}->{s}' for w, s in sorted(pairs))}"
                  + ("; seeds have different numbers of pairs (an incomplete sweep?)" if uneven else "")
                  + (f"; {len(per_seed)} seed(s): no CI (needs {MIN_SEEDS})" if len(per_seed) < MIN_SEEDS else ""))
        row = _base(anchor, _settings_label(group[0], settings))
        row.update(ours=float(ci["pgr_median"]), ci_low=low, ci_high=high, n_seeds=len(per_seed),
                   n_runs=len(group), verdict=median_verdict(anchor["value"], low, high), detail=detail)
        out.append(row)
    return out


def wins_verdict(theirs: float, low: Optional[float], high: Optional[float], n_units: int) -> str:
    """The verdict of a cross-task share against our exact CI of it (see the module docstring)."""
    if n_units < MIN_UNITS or low is None or high is None:
        return "no CI"
    if high - low > WIDE_SHARE:
        return "too noisy"
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
            units.setdefault((r["task"], r["weak"], r["strong"], r["loss"]), []).append(r["pgr"])
        medians = [{"task": t, "weak": w, "strong": s, "loss": loss, "pgr": statistics.median(v)}
                   for (t, w, s, loss), v in units.items()]
        if {m["loss"] for m in medians} != {a, b}:
            continue  # only one of the two losses ran with these settings: nothing to pair
        comp = paired_comparison(medians, a, b, keys=["task", "weak", "strong"])
        d = comp["pairs"]["diff"].to_numpy()
        n, wins = len(d), int((d > 0).sum())
        if n == 0:
            continue
        low = high = None
        if n >= MIN_UNITS:
            ci = binomtest(wins, n).proportion_ci(confidence_level=0.95, method="exact")
            low, high = float(ci.low), float(ci.high)
        nz = d[d != 0]
        one_sided = float(wilcoxon(nz, alternative="greater").pvalue) if len(nz) >= 2 else None
        tasks = sorted({m["task"] for m in medians})
        row = _base(anchor, _settings_label(group[-1], settings))  # the last row is one of `loss`'s
        row.update(ours=wins / n, ci_low=low, ci_high=high,
                   n_seeds=len({r["seed"] for r in group}), n_runs=len(group),
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
    out = ["anchors: ours [95% CI: over seeds for a median, over data sets for a share] vs published, with a "
           "verdict (README 'Reproduction packs'):"]
    for r in compared:
        share = r["kind"] == "wins"
        ci = f" [{_fmt(r['ci_low'], share)}, {_fmt(r['ci_high'], share)}]" if r["ci_low"] is not None else ""
        settings = f" {r['settings']}" if r["settings"] else ""
        if share:
            what = f"{r['loss']} beats {r['baseline']} on"
            p = lambda v: "n/a" if v is None else f"{v:.2g}"  # noqa: E731
            ps = f"; one-sided Wilcoxon p ours {p(r['our_p'])} vs theirs {p(r['their_p'])}"
            out.append(f"  {what} {_fmt(r['ours'], True)}{ci} of data sets vs {r['source']} {_fmt(r['theirs'], True)}"
                       f"{settings} ({r['n_seeds']} seeds){ps}: {r['verdict']} ({r['detail']})")
        else:
            out.append(f"  {r['task']:<16} {r['loss']:<8} median PGR {_fmt(r['ours'])}{ci} vs {r['source']} "
                       f"{_fmt(r['theirs'])}{settings} ({r['n_seeds']} seeds, {r['n_runs']} runs): {r['verdict']}")
    return out
