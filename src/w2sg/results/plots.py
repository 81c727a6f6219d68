"""Every plot of a report, as PNG files (matplotlib, Agg backend):

* :func:`strong_size_curves`: median PGR vs strong-model size (bars: min-max over seeds) and accuracy vs strong
  size (``pgr_vs_strong_size[_<task>].png``, ``accuracy_vs_strong_size[_<task>].png``), from ``summary.csv``'s rows;
* :func:`plot_ci`: a metric with its CIs over seeds as error bars, labelled with their coverage
  (``pgr_ci[_<task>].png``), from ``summary_ci.csv``'s rows;
* :func:`misfit_vs_gain`: the student's misfit to its teacher vs its gain (``misfit_vs_gain.png``; the
  quantities are defined in w2sg.results.diagnostics; gain ~ misfit holds under Charikar et al.'s realisability
  assumption, and the figure says so);
* :func:`chain_vs_direct`: bootstrap chain vs direct w2s accuracy (``chain_vs_direct.png``).

matplotlib and pandas are imported inside the functions, when a plot is drawn.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from w2sg.core.errors import W2SGError
from w2sg.results.collect import is_setting


def _pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def strong_size_curves(summary: List[Dict[str, Any]], out: Path, curves: Optional[Dict[str, List[str]]] = None) -> List[Path]:
    """PGR vs strong size (one curve per weak model, loss and setting; bars: min-max over seeds) and accuracy vs
    strong size (ceiling, w2s, weak), one pair of PNGs per task. ``summary``: the rows of ``summary.csv``
    (w2sg.results.stats.spread_view). ``curves``, if given, gets each file's legend labels."""
    plt = _pyplot()
    from matplotlib.ticker import NullFormatter

    def size_axis(ax, sizes) -> None:
        """Log scale with a tick at each strong-model size (in millions of parameters)."""
        ax.set_xscale("log")
        ticks = sorted({x / 1e6 for x in sizes})
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{t:.3g}" for t in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("strong model parameters (M)")

    written = []

    def finish(fig, ax, sizes, ylabel: str, title: str, name: str) -> None:
        """Axes, legend, save, remember the curves drawn."""
        size_axis(ax, sizes)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=120)
        if curves is not None:
            curves[path.name] = ax.get_legend_handles_labels()[1]
        plt.close(fig)
        written.append(path)

    settings = sorted({c for s in summary for c in s if is_setting(c)})

    def curve_of(s: Dict[str, Any]) -> Tuple:
        return (s["weak"], s["loss"], *(json.dumps(s.get(c)) for c in settings))

    def setting_label(s: Dict[str, Any]) -> str:
        return "".join(f", {c}={s.get(c)}" for c in settings)

    for task in sorted({s["task"] for s in summary}):
        ts = [s for s in summary if s["task"] == task]
        suffix = "" if len({s["task"] for s in summary}) == 1 else f"_{task}"
        fig, ax = plt.subplots(figsize=(6, 4.2))
        for curve in sorted({curve_of(s) for s in ts}, key=str):
            pts = sorted((s for s in ts if curve_of(s) == curve and s["pgr_median"] is not None),
                         key=lambda s: s["strong_params"])
            if not pts:
                continue
            x = [p["strong_params"] / 1e6 for p in pts]
            y = [p["pgr_median"] for p in pts]
            err = [[p["pgr_median"] - p["pgr_min"] for p in pts], [p["pgr_max"] - p["pgr_median"] for p in pts]]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3,
                        label=f"weak={pts[0]['weak']}, loss={pts[0]['loss']}{setting_label(pts[0])}")
        ax.axhline(0, color="grey", lw=0.8)
        finish(fig, ax, [s["strong_params"] for s in ts], "PGR (median over seeds; bars: min-max)",
               f"Performance gap recovered: {task}", f"pgr_vs_strong_size{suffix}.png")

        fig, ax = plt.subplots(figsize=(6, 4.2))
        ceiling_settings = [c for c in settings if not c.startswith(("weak_", "loss.", "generative.weak"))]
        for setting in sorted({tuple(json.dumps(s.get(c)) for c in ceiling_settings) for s in ts}):
            cs = [s for s in ts if tuple(json.dumps(s.get(c)) for c in ceiling_settings) == setting]
            ceil = sorted({(s["strong_params"], s["acc_ceiling_median"]) for s in cs})
            label = "".join(f", {c}={cs[0].get(c)}" for c in ceiling_settings)
            ax.plot([c[0] / 1e6 for c in ceil], [c[1] for c in ceil], "k-s", alpha=1 if not label else 0.6,
                    label=f"ceiling (strong on ground truth){label}")
        for curve in sorted({curve_of(s) for s in ts}, key=str):
            pts = sorted((s for s in ts if curve_of(s) == curve), key=lambda s: s["strong_params"])
            line, = ax.plot([p["strong_params"] / 1e6 for p in pts], [p["acc_w2s_median"] for p in pts], "-o",
                            label=f"w2s from {pts[0]['weak']} ({pts[0]['loss']}{setting_label(pts[0])})")
            ax.axhline(pts[0]["acc_weak_median"], color=line.get_color(), ls=":", lw=1)
        finish(fig, ax, [s["strong_params"] for s in ts], "test accuracy (median over seeds)",
               f"Accuracy: {task} (dotted: weak model)", f"accuracy_vs_strong_size{suffix}.png")
    return written


def plot_ci(summary: Any, out: Union[str, Path], metric: str = "pgr", stat: str = "median",
            x: str = "strong_params", curve: Sequence[str] = ("weak", "loss"), title: Optional[str] = None) -> Path:
    """Error-bar plot of :func:`w2sg.results.stats.summarize_ci`'s output (``summary_ci.csv``): ``metric`` vs ``x``, one curve per ``curve`` values.

    Bars are the CIs over seeds, labelled with the coverage their ``<metric>_ci_level`` column gives (for the
    median, order-statistic intervals: 0.9375 with 5 seeds); a point without a CI (too few seeds) is drawn hollow
    without a bar. ``x`` of strong_params / weak_params is drawn on a log scale in millions."""
    import pandas as pd

    plt = _pyplot()
    df = summary.copy() if isinstance(summary, pd.DataFrame) else pd.DataFrame(list(summary))
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
    bars = ci_label(df, metric)
    ax.set_ylabel(f"{metric} ({stat} over seeds; bars: {bars})", fontsize=8)
    ax.set_title(title or f"{metric}: {bars} over seeds (hollow: too few seeds for a CI)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(out)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def ci_label(summary: Any, metric: str) -> str:
    """What a summary's CIs of ``metric`` are: their coverage (one value, or the range over groups)."""
    col = f"{metric}_ci_level"
    levels = sorted({round(float(v), 4) for v in summary[col].dropna()}) if col in summary.columns else []
    if not levels:
        return "CI" if col in summary.columns else "CI (coverage not recorded)"
    span = f"{levels[0]:.1%}" if len(levels) == 1 else f"{levels[0]:.1%}-{levels[-1]:.1%}"
    return f"CI (coverage {span})"


def misfit_vs_gain(rows: Any, out: Union[str, Path]) -> Path:
    """Misfit vs gain, one point per run: squared misfit to the training targets (transfer set) vs Brier gain, the
    same misfit measured against the weak model on the test set (where the rows have ``misfit_sq_test``) vs Brier
    gain (the theory's y = x line drawn on both), and hard disagreement with the training targets vs PGR and vs
    accuracy gain. ``rows``: a DataFrame or row dicts with the columns of :func:`w2sg.results.diagnostics.row`
    (and ``pgr``, ``loss`` where present). The title carries the caveat: gain ~ misfit holds under Charikar et
    al.'s realisability assumption."""
    from w2sg.results.diagnostics import REALISABILITY

    import pandas as pd

    plt = _pyplot()
    df = rows.copy() if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    needed = ["misfit_sq", "gain_sq", "misfit_disagreement", "gain_acc"]
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise W2SGError(f"diagnostics plot: no column(s) {missing}; pass rows with diagnostics.row(metrics) columns")
    df = df.dropna(subset=needed)
    panels = [("misfit_sq", "gain_sq", "misfit (mean squared distance to its training targets, transfer set)",
               "gain in Brier score over the weak model (test)")]
    if "misfit_sq_test" in df.columns and df["misfit_sq_test"].notna().any():
        panels.append(("misfit_sq_test", "gain_sq", "misfit (mean squared distance to the weak model, test set)",
                       "gain in Brier score over the weak model (test)"))
    if "pgr" in df.columns:
        panels.append(("misfit_disagreement", "pgr", "disagreement with its training targets (transfer set)",
                       "PGR (test)"))
    panels.append(("misfit_disagreement", "gain_acc", "disagreement with its training targets (transfer set)",
                   "accuracy gain over the weak model (test)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.3 * len(panels), 4))
    hue = "loss" if "loss" in df.columns else None
    for ax, (x, y, xl, yl) in zip(np.atleast_1d(axes), panels):
        groups = df.groupby(hue, sort=True) if hue else [("runs", df)]
        for name, g in groups:
            g = g.dropna(subset=[x, y])
            ax.scatter(g[x].astype(float), g[y].astype(float), s=18, label=str(name))
        if y == "gain_sq" and df[x].notna().any():
            top = float(max(df[x].max(), df[y].max(), 0.0))
            ax.plot([0, top], [0, top], "k--", lw=0.8, label="gain = misfit")
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_xlabel(xl, fontsize=8)
        ax.set_ylabel(yl, fontsize=8)
        ax.legend(fontsize=7)
    fig.suptitle(f"Misfit vs gain: {REALISABILITY}", fontsize=9)
    fig.tight_layout()
    path = Path(out)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def chain_vs_direct(chains: List[Dict[str, Any]], out: Path) -> Path:
    """Bootstrap chain vs direct: median test accuracy per loss (bars: min-max over seeds), weak and ceiling."""
    plt = _pyplot()
    settings = sorted({c for r in chains for c in r if is_setting(c)})

    def group_of(r: Dict[str, Any]) -> Tuple:
        return (r["task"], r["chain"], r["loss"], *(json.dumps(r.get(c)) for c in settings))

    groups = sorted({group_of(r) for r in chains})
    fig, ax = plt.subplots(figsize=(6, 4.2))
    width = 0.38
    for j, (kind, col) in enumerate((("direct", "acc_direct"), ("bootstrap chain", "acc_chain"))):
        meds, lo, hi = [], [], []
        for g in groups:
            vals = [r[col] for r in chains if group_of(r) == g]
            med = statistics.median(vals)
            meds.append(med)
            lo.append(med - min(vals))
            hi.append(max(vals) - med)
        xs = [i + (j - 0.5) * width for i in range(len(groups))]
        ax.bar(xs, meds, width, yerr=[lo, hi], capsize=3, label=kind)
    for i, g in enumerate(groups):
        rs = [r for r in chains if group_of(r) == g]
        for col, style in (("acc_weak", ":"), ("acc_ceiling", "--")):
            ax.hlines(statistics.median(r[col] for r in rs), i - 0.45, i + 0.45, colors="k", linestyles=style, lw=1)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{g[1]}\n{g[2]}" + "".join(f"\n{c}={v}" for c, v in zip(settings, g[3:])) for g in groups],
                       fontsize=8)
    accs = [r[c] for r in chains for c in ("acc_weak", "acc_ceiling", "acc_direct", "acc_chain")]
    ax.set_ylim(min(accs) - 0.03, max(accs) + 0.03)
    ax.set_ylabel("test accuracy (median over seeds)")
    ax.set_title("Bootstrap chain vs direct (dotted: weak, dashed: ceiling)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "chain_vs_direct.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
