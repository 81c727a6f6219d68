"""Sweep reports: one table row per experiment, median PGR over seeds, PGR curves.

    w2sg report <sweep dir | run dir | store dir> [--out DIR]

writes ``results.csv`` (one row per experiment: task, weak, strong, loss, every setting that differs between
the experiments reported, seed), ``summary.csv`` (median and spread over seeds only) and PNG plots: PGR vs
strong-model size, one curve per weak model, loss and setting, and accuracy (weak / w2s / ceiling) vs strong
size; also ``summary_ci.csv`` (median over seeds with its exact order-statistic CI and that CI's coverage),
``loss_comparisons.csv`` (paired tests of every two losses), ``loss_summary.csv``, ``chains.csv`` and
``anchors.csv`` where they apply. A store's report covers the experiments runs recorded in it (one per run that
finished, with every stage still stored): the same rows as the report of those runs' folders; its files go to
``--out`` or else to a new folder ``w2sg-report-<store>-<time>`` in the current directory, never into the store. It runs at the
end of every multirun too (the Hydra callback in w2sg.app.callback), which also logs the same table and curves
to one W&B run for that sweep.

This module writes the files (:func:`write_report`) and is the ``w2sg report`` command (:func:`main`); the rows
come from w2sg.results.collect, the numbers from w2sg.results.stats, the pictures from w2sg.results.plots.
"""

from __future__ import annotations

import argparse
import csv
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from w2sg.results import anchors, collect, plots, stats
from w2sg.results.collect import BASE, METRICS, is_setting

log = logging.getLogger(__name__)

GROUP = BASE  # the fixed part of a summary group; the varying settings (see collect.settings_columns) join it


def write_csv(path: Path, rows: List[Dict[str, Any]], columns: List[str]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c) for c in columns})


def write_stats(rows: Union[List[Dict[str, Any]], Any], out: Union[str, Path], seed: int = 0,
                settings: Sequence[str] = (), summary: Any = None) -> List[Path]:
    """The report's statistics files: ``summary_ci.csv`` (per group, median over seeds with CIs, their coverage,
    and warnings),
    ``loss_comparisons.csv`` (every two losses, paired on PGR, when the results have two or more),
    ``pgr_ci[_<task>].png`` (error bars), and ``misfit_vs_gain.png`` when the rows carry diagnostics columns.
    ``settings``: the columns that tell experiments apart besides models, task and loss (the report's setting
    columns): groups and pairs are never formed across different settings. ``summary``: the rows'
    :func:`w2sg.results.stats.summarize` by GROUP + settings, when already computed."""
    from itertools import combinations

    import pandas as pd

    df, out = (rows.copy() if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))), Path(out)
    written: List[Path] = []
    if df.empty:
        return written
    settings = [c for c in settings if c in df.columns]
    for c in settings:  # settings may hold lists or dicts: group and pair on their text
        df[c] = df[c].map(stats.hashable)
    if summary is None:
        summary = stats.summarize(df, group=GROUP + settings, seed=seed)
    ci = stats.ci_view(summary)
    ci.to_csv(out / "summary_ci.csv", index=False)
    written.append(out / "summary_ci.csv")
    losses = sorted(df["loss"].dropna().unique().tolist(), key=str) if "loss" in df.columns else []
    if len(losses) >= 2:
        # pairs: equal in everything but the loss and its own parameters
        keys = [c for c in GROUP + settings + ["seed"] if c != "loss" and not c.startswith("loss.")]
        comps = [stats.comparison_row(stats.paired_comparison(df, a, b, keys=keys, seed=seed))
                 for a, b in combinations(losses, 2)]
        pd.DataFrame(comps).to_csv(out / "loss_comparisons.csv", index=False)
        written.append(out / "loss_comparisons.csv")
    tasks = sorted(ci["task"].unique().tolist(), key=str) if "task" in ci.columns else [None]
    for task in tasks:
        part = ci if task is None else ci[ci["task"] == task]
        suffix = "" if len(tasks) == 1 else f"_{task}"
        written.append(plots.plot_ci(part, out / f"pgr_ci{suffix}.png",
                                     title=f"PGR: {task}, {plots.ci_label(part, 'pgr')} over seeds" if task else None))
    if {"misfit_sq", "gain_sq"} <= set(df.columns) and df["misfit_sq"].notna().any():
        written.append(plots.misfit_vs_gain(df, out / "misfit_vs_gain.png"))
    return written


def default_out(source: Path) -> Path:
    """Where a report goes without ``--out``: a sweep or run folder's own folder; a store's, never the store (shared,
    perhaps read-only) but a new folder ``w2sg-report-<store name>-<time>`` in the current directory."""
    source = Path(source)
    if not (source / "stages").is_dir():
        return source
    base = Path.cwd() / f"w2sg-report-{source.resolve().name}-{time.strftime('%Y%m%d-%H%M%S')}"
    out, n = base, 1
    while out.exists():
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def write_report(source: Path, out: Optional[Path] = None) -> Dict[str, Any]:
    """Every report file of a sweep folder, run folder or store (see the module's docstring) into ``out``
    (default: :func:`default_out`). Returns the rows, summaries, chains, anchors, files written and plotted curves.
    An output folder that cannot be written is a W2SGError naming it."""
    found = collect.experiments(Path(source))
    rows = collect.table(found, source)
    out = Path(out) if out else default_out(source)
    try:
        return _write_files(found, rows, out)
    except OSError as e:
        from w2sg.core.errors import W2SGError

        raise W2SGError(f"cannot write the report into {out}: {e.strerror or e}"
                        f"{f' ({e.filename})' if e.filename else ''}; pass --out <a folder you can write>") from e


def _write_files(found: Any, rows: List[Dict[str, Any]], out: Path) -> Dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    columns = collect.result_columns(rows)
    settings = [c for c in columns if is_setting(c)]
    full = stats.summarize(rows, group=GROUP + settings) if rows else None
    summary = stats.spread_view(full, rows) if rows else []  # raises for experiments no setting tells apart
    write_csv(out / "results.csv", rows, columns)
    spread = [f"{c}_{s}" for c in METRICS for s in ("median", "min", "max")]
    write_csv(out / "summary.csv", summary, GROUP + settings + ["n_seeds", "n_seeds_run"] + spread)
    files = [out / "results.csv", out / "summary.csv"]
    losses = stats.loss_summary(rows, summary, settings)
    if losses:
        write_csv(out / "loss_summary.csv", losses, list(losses[0]))
        files.append(out / "loss_summary.csv")
    chains = collect.chain_rows(found)
    if chains:
        write_csv(out / "chains.csv", chains, list(chains[0]))
        files.append(out / "chains.csv")
    files += write_stats(rows, out, settings=settings, summary=full)  # CIs, paired loss comparisons, diagnostics
    compared = anchors.compare(rows, settings)  # published figures these rows reproduce (or not)
    if compared:
        files.append(anchors.write(out / "anchors.csv", compared))
    curves: Dict[str, List[str]] = {}
    pngs = plots.strong_size_curves(summary, out, curves) if rows else []
    if chains:
        pngs.append(plots.chain_vs_direct(chains, out))
    return {"rows": rows, "summary": summary, "losses": losses, "chains": chains, "files": files + pngs,
            "curves": curves, "anchors": compared}


def _fmt(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _undefined(s: Dict[str, Any]) -> str:
    """Seeds of a summary row whose PGR is undefined (n_seeds counts those with one)."""
    missing = s.get("n_seeds_run", s["n_seeds"]) - s["n_seeds"]
    return f" (+{missing} without a PGR)" if missing else ""


def _settings_text(row: Dict[str, Any]) -> str:
    return "".join(f" {c}={v}" for c, v in row.items() if is_setting(c))


def print_report(report: Dict[str, Any]) -> None:
    """The summary lines of a report: per experiment, per loss, per chain, the anchors, the files written."""
    for s in report["summary"]:
        print(f"{s['task']:<16} {s['weak']:>14} -> {s['strong']:<14} {s['loss']:<8}{_settings_text(s)} "
              f"seeds={s['n_seeds']}{_undefined(s)}  acc weak {s['acc_weak_median']:.3f} w2s {s['acc_w2s_median']:.3f} "
              f"ceiling {s['acc_ceiling_median']:.3f}  PGR {_fmt(s['pgr_median'])}")
    for ls in report["losses"]:
        print(f"{ls['task']:<16} loss {ls['loss']:<8}{_settings_text(ls)} median PGR {_fmt(ls['pgr_median'])} over "
              f"{ls['n_runs']} runs ({ls['pgr_positive_share']:.0%} > 0); at the largest gap "
              f"({ls['largest_gap_pair']}, {_fmt(ls['largest_gap'])}): {_fmt(ls['pgr_median_at_largest_gap'])}")
    chain_settings = sorted({c for r in report["chains"] for c in r if is_setting(c)})
    for rs in stats.groups(report["chains"], ["task", "chain", "loss"] + chain_settings).values():
        print(f"{rs[0]['task']:<16} chain {rs[0]['chain']} ({rs[0]['loss']}{_settings_text(rs[0])}, {len(rs)} seeds): "
              f"median acc chain {statistics.median(r['acc_chain'] for r in rs):.3f} vs direct "
              f"{statistics.median(r['acc_direct'] for r in rs):.3f}; chain - direct per seed "
              + " ".join(f"{r['chain_minus_direct']:+.3f}" for r in rs))
    for line in anchors.lines(report["anchors"]):
        print(line)
    print("wrote " + ", ".join(str(p) for p in report["files"]))


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="w2sg report", description=__doc__.split("\n\nThis module")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", help="a sweep folder (multirun/...), a run folder, or a store folder")
    ap.add_argument("--out", help="where to write the CSVs and PNGs (default: a sweep or run folder itself; for a "
                                  "store, a new folder w2sg-report-<store>-<time> in the current directory)")
    args = ap.parse_args(argv)
    from w2sg.core.errors import W2SGError

    logging.basicConfig(level=logging.WARNING, format="w2sg report: %(message)s")
    try:
        report = write_report(Path(args.source), Path(args.out) if args.out else None)
    except (FileNotFoundError, ValueError, W2SGError) as e:
        print(f"w2sg report: {e}", file=sys.stderr)
        return 2
    if not report["rows"] and not report["chains"]:
        print(f"w2sg report: no finished experiments under {args.source}", file=sys.stderr)
        return 1
    print_report(report)
    return 0
