"""Sweep reports: one table row per (task, weak, strong, loss, seed), median PGR over seeds, PGR curves.

    w2sg report <sweep dir | run dir | store dir> [--out DIR]

writes ``results.csv`` (one row per run), ``summary.csv`` (median and spread over seeds) and PNG plots:
PGR vs strong-model size, one curve per weak model and loss, and accuracy (weak / w2s / ceiling) vs strong
size. It runs at the end of every multirun too (a Hydra callback), which also logs the same table and curves
to one W&B run for the sweep.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.experimental.callback import Callback

COLUMNS = ["task", "weak", "weak_params", "strong", "strong_params", "loss", "seed",
           "acc_weak", "acc_ceiling", "acc_w2s", "pgr"]
GROUP = ["task", "weak", "weak_params", "strong", "strong_params", "loss"]


def _row(m: Dict[str, Any]) -> Dict[str, Any]:
    return {"task": m["task"], "weak": m["weak"]["model"], "weak_params": m["weak"]["params"],
            "strong": m["strong"]["model"], "strong_params": m["strong"]["params"], "loss": m["loss"],
            "seed": m["seed"], "acc_weak": m["acc"]["weak"], "acc_ceiling": m["acc"]["ceiling"],
            "acc_w2s": m["acc"]["w2s"], "pgr": m["pgr"]}


def rows_from_runs(root: Path) -> List[Dict[str, Any]]:
    """Rows from the metrics.json of every run under a sweep (or run) folder; one per distinct experiment."""
    rows: Dict[tuple, Dict[str, Any]] = {}
    for path in sorted(root.glob("**/metrics.json")):
        if "stages" in path.parts:  # a store's own per-stage files
            continue
        metrics = json.loads(path.read_text())
        if metrics.get("subset"):  # a run of only some stages (stages=[...], e.g. a launcher's shared-stage job)
            continue
        row = _row(metrics)
        rows[tuple(row[c] for c in GROUP + ["seed"])] = row
    return list(rows.values())


def chain_rows(root: Path) -> List[Dict[str, Any]]:
    """Bootstrap chain vs direct, one row per chain run (task, chain, loss, seed) under a sweep or run folder."""
    rows: Dict[tuple, Dict[str, Any]] = {}
    for path in sorted(root.glob("**/metrics.json")):
        m = json.loads(path.read_text())
        if "chain" not in m or m.get("subset"):
            continue
        ch = m["chain"]
        row = {"task": m["task"], "chain": ch["name"], "loss": m["loss"], "seed": m["seed"],
               "acc_weak": m["acc"]["weak"], "acc_ceiling": m["acc"]["ceiling"], "acc_direct": ch["direct"]["acc"],
               "acc_chain": ch["end_to_end"]["acc"], "pgr_direct": ch["direct"]["pgr"],
               "pgr_chain": ch["end_to_end"]["pgr"], "chain_minus_direct": ch["bootstrap_minus_direct"]}
        rows[tuple(row[c] for c in ("task", "chain", "loss", "seed"))] = row
    return sorted(rows.values(), key=lambda r: (r["task"], r["chain"], r["loss"], r["seed"]))


def _median(vals: List[Any]) -> Optional[float]:
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def loss_summary(rows: List[Dict[str, Any]], summary: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per task and loss: median PGR over every pair and seed, and the median PGR at the largest gap.

    The largest gap is the (weak, strong) pair whose median ceiling - weak accuracy is largest."""
    out = []
    for task in sorted({r["task"] for r in rows}):
        ts = [s for s in summary if s["task"] == task and s["acc_ceiling_median"] is not None]
        gap = max(ts, key=lambda s: s["acc_ceiling_median"] - s["acc_weak_median"]) if ts else None
        for loss in sorted({r["loss"] for r in rows if r["task"] == task}):
            rs = [r for r in rows if r["task"] == task and r["loss"] == loss]
            at_gap = [r for r in rs if gap and (r["weak"], r["strong"]) == (gap["weak"], gap["strong"])]
            out.append({"task": task, "loss": loss, "n_runs": len(rs), "pgr_median": _median([r["pgr"] for r in rs]),
                        "pgr_positive_share": (sum(r["pgr"] > 0 for r in rs if r["pgr"] is not None)
                                               / max(1, sum(r["pgr"] is not None for r in rs))),
                        "largest_gap_pair": f"{gap['weak']}->{gap['strong']}" if gap else None,
                        "largest_gap": (gap["acc_ceiling_median"] - gap["acc_weak_median"]) if gap else None,
                        "pgr_median_at_largest_gap": _median([r["pgr"] for r in at_gap])})
    return out


def rows_from_store(root: Path) -> List[Dict[str, Any]]:
    """Rows rebuilt from a store alone: each w2s stage, its weak model (through its labels) and its ceiling."""
    from w2sg.metrics import pgr
    from w2sg.store import Store

    store = Store(root)
    stages: Dict[str, Dict[str, Any]] = {}
    for path in (root / "stages").iterdir():
        if store.status(path.name) == "done":
            meta = json.loads((path / "meta.json").read_text())
            meta["metrics"] = json.loads((path / "metrics.json").read_text())
            stages[path.name] = meta

    def gt_key(spec: Dict[str, Any]) -> str:
        return json.dumps({k: spec[k] for k in ("model", "task", "train", "seed")}, sort_keys=True)

    ceilings = {gt_key(m["spec"]): m for m in stages.values()
                if m["kind"] == "train" and m["spec"]["labels"] == "ground_truth"}
    rows = []
    for m in stages.values():
        if m["kind"] != "train" or m["spec"]["labels"] != "weak":
            continue
        labels = stages.get(m["inputs"]["labels"])
        weak = stages.get(labels["inputs"]["model"]) if labels else None
        ceiling = ceilings.get(gt_key(m["spec"]))
        if weak is None or ceiling is None or weak["spec"]["labels"] != "ground_truth":
            continue  # a chain link (its teacher is not a ground-truth model) or an incomplete experiment
        acc = {"weak": weak["metrics"]["acc"], "ceiling": ceiling["metrics"]["acc"], "w2s": m["metrics"]["acc"]}
        rows.append({"task": m.get("task_name", m["spec"]["task"]["dataset"]), "weak": weak["model_name"],
                     "weak_params": weak["metrics"]["params"], "strong": m["model_name"],
                     "strong_params": m["metrics"]["params"], "loss": m["spec"]["loss"]["name"],
                     "seed": m["spec"]["seed"], "acc_weak": acc["weak"], "acc_ceiling": acc["ceiling"],
                     "acc_w2s": acc["w2s"], "pgr": pgr(acc["weak"], acc["w2s"], acc["ceiling"])[0]})
    return rows


def collect(path: Path) -> List[Dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    rows = rows_from_store(path) if (path / "stages").is_dir() else rows_from_runs(path)
    return sorted(rows, key=lambda r: tuple(str(r[c]) for c in ("task", "weak_params", "strong_params", "loss", "seed")))


def summarize(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Median over seeds (as the paper reports median PGR), with min and max as the spread."""
    groups: Dict[tuple, List[Dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[tuple(r[c] for c in GROUP)].append(r)
    out = []
    for key, rs in groups.items():
        s = dict(zip(GROUP, key))
        s["n_seeds"] = len(rs)
        for col in ("acc_weak", "acc_ceiling", "acc_w2s", "pgr"):
            vals = [r[col] for r in rs if r[col] is not None]
            s[f"{col}_median"] = statistics.median(vals) if vals else None
            s[f"{col}_min"] = min(vals) if vals else None
            s[f"{col}_max"] = max(vals) if vals else None
        out.append(s)
    return out


def write_csv(path: Path, rows: List[Dict[str, Any]], columns: List[str]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c) for c in columns})


def plot(summary: List[Dict[str, Any]], out: Path, curves: Optional[Dict[str, List[str]]] = None) -> List[Path]:
    """PGR vs strong size (one curve per weak model and loss) and accuracy vs strong size, one pair per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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

    for task in sorted({s["task"] for s in summary}):
        ts = [s for s in summary if s["task"] == task]
        suffix = "" if len({s["task"] for s in summary}) == 1 else f"_{task}"
        fig, ax = plt.subplots(figsize=(6, 4.2))
        for (weak, loss) in sorted({(s["weak"], s["loss"]) for s in ts}, key=str):
            pts = sorted((s for s in ts if (s["weak"], s["loss"]) == (weak, loss) and s["pgr_median"] is not None),
                         key=lambda s: s["strong_params"])
            if not pts:
                continue
            x = [p["strong_params"] / 1e6 for p in pts]
            y = [p["pgr_median"] for p in pts]
            err = [[p["pgr_median"] - p["pgr_min"] for p in pts], [p["pgr_max"] - p["pgr_median"] for p in pts]]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=f"weak={weak}, loss={loss}")
        ax.axhline(0, color="grey", lw=0.8)
        finish(fig, ax, [s["strong_params"] for s in ts], "PGR (median over seeds; bars: min-max)",
               f"Performance gap recovered: {task}", f"pgr_vs_strong_size{suffix}.png")

        fig, ax = plt.subplots(figsize=(6, 4.2))
        ceil = sorted({(s["strong_params"], s["acc_ceiling_median"]) for s in ts})
        ax.plot([c[0] / 1e6 for c in ceil], [c[1] for c in ceil], "k-s", label="ceiling (strong on ground truth)")
        for (weak, loss) in sorted({(s["weak"], s["loss"]) for s in ts}, key=str):
            pts = sorted((s for s in ts if (s["weak"], s["loss"]) == (weak, loss)), key=lambda s: s["strong_params"])
            line, = ax.plot([p["strong_params"] / 1e6 for p in pts], [p["acc_w2s_median"] for p in pts], "-o",
                            label=f"w2s from {weak} ({loss})")
            ax.axhline(pts[0]["acc_weak_median"], color=line.get_color(), ls=":", lw=1)
        finish(fig, ax, [s["strong_params"] for s in ts], "test accuracy (median over seeds)",
               f"Accuracy: {task} (dotted: weak model)", f"accuracy_vs_strong_size{suffix}.png")
    return written


def write_report(source: Path, out: Optional[Path] = None) -> Dict[str, Any]:
    rows = collect(source)
    out = Path(out or source)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(rows)
    write_csv(out / "results.csv", rows, COLUMNS)
    stats = [f"{c}_{s}" for c in ("acc_weak", "acc_ceiling", "acc_w2s", "pgr") for s in ("median", "min", "max")]
    write_csv(out / "summary.csv", summary, GROUP + ["n_seeds"] + stats)
    files = [out / "results.csv", out / "summary.csv"]
    losses = loss_summary(rows, summary)
    if losses:
        write_csv(out / "loss_summary.csv", losses, list(losses[0]))
        files.append(out / "loss_summary.csv")
    chains = chain_rows(Path(source)) if not (Path(source) / "stages").is_dir() else []
    if chains:
        write_csv(out / "chains.csv", chains, list(chains[0]))
        files.append(out / "chains.csv")
    curves: Dict[str, List[str]] = {}
    pngs = plot(summary, out, curves) if rows else []
    if chains:
        pngs.append(plot_chains(chains, out))
    return {"rows": rows, "summary": summary, "losses": losses, "chains": chains, "files": files + pngs,
            "curves": curves}


def plot_chains(chains: List[Dict[str, Any]], out: Path) -> Path:
    """Bootstrap chain vs direct: median test accuracy per loss (bars: min-max over seeds), weak and ceiling."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["task"], r["chain"], r["loss"]) for r in chains})
    fig, ax = plt.subplots(figsize=(6, 4.2))
    width = 0.38
    for j, (kind, col) in enumerate((("direct", "acc_direct"), ("bootstrap chain", "acc_chain"))):
        meds, lo, hi = [], [], []
        for g in groups:
            vals = [r[col] for r in chains if (r["task"], r["chain"], r["loss"]) == g]
            med = statistics.median(vals)
            meds.append(med)
            lo.append(med - min(vals))
            hi.append(max(vals) - med)
        xs = [i + (j - 0.5) * width for i in range(len(groups))]
        ax.bar(xs, meds, width, yerr=[lo, hi], capsize=3, label=kind)
    for i, g in enumerate(groups):
        rs = [r for r in chains if (r["task"], r["chain"], r["loss"]) == g]
        for col, style in (("acc_weak", ":"), ("acc_ceiling", "--")):
            ax.hlines(statistics.median(r[col] for r in rs), i - 0.45, i + 0.45, colors="k", linestyles=style, lw=1)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{c}\n{loss}" for _, c, loss in groups], fontsize=8)
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


def log_sweep_to_wandb(logger_cfg: Any, group: str, report: Dict[str, Any]) -> None:
    """One W&B run for the sweep: the results table and the PGR / accuracy curves (as line plots and PNGs)."""
    import hashlib

    import wandb

    from w2sg.tracking import Tracker

    tracker = Tracker(logger_cfg, group)
    if not tracker.enabled or not report["rows"]:
        return
    run_id = "sweep-" + hashlib.sha256(group.encode()).hexdigest()[:16]
    with tracker.stage_run(run_id, f"sweep {group}", "sweep_summary", {"sweep": group}) as run:
        def log_all() -> None:
            table = wandb.Table(columns=COLUMNS, data=[[r[c] for c in COLUMNS] for r in report["rows"]])
            summary_cols = list(report["summary"][0].keys())
            summ = wandb.Table(columns=summary_cols, data=[[s[c] for c in summary_cols] for s in report["summary"]])
            run._run.log({
                "results": table, "summary": summ,
                "pgr_vs_strong_size": wandb.plot.line(summ, "strong_params", "pgr_median", stroke="weak",
                                                      title="median PGR vs strong size (per weak model)"),
                "pgr_vs_strong_size_by_loss": wandb.plot.line(summ, "strong_params", "pgr_median", stroke="loss",
                                                              title="median PGR vs strong size (per loss)"),
                "w2s_acc_vs_strong_size": wandb.plot.line(summ, "strong_params", "acc_w2s_median", stroke="weak",
                                                          title="w2s accuracy vs strong size"),
                **{f"png/{p.stem}": wandb.Image(str(p)) for p in report["files"] if p.suffix == ".png"},
            })

        if run._run is not None:
            tracker._call(log_all)


class ReportCallback(Callback):
    """Hydra callback: when a multirun ends, write the local report into the sweep folder and log it to W&B."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        import logging

        log = logging.getLogger("w2sg.report")
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            report = write_report(sweep_dir)
        except Exception as e:  # a report must never hide the sweep's own results
            log.warning("report for %s failed: %s", sweep_dir, e)
            return
        log.info("report: %s", ", ".join(str(p) for p in report["files"]))
        choices = config.hydra.runtime.choices
        group = str(choices.get("sweep") or "/".join(sweep_dir.parts[-2:]))
        try:
            log_sweep_to_wandb(config.logger, group, report)
        except Exception as e:
            log.warning("W&B sweep summary failed (%s); the local report is complete", e)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="w2sg report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", help="a sweep folder (multirun/...), a run folder, or a store folder")
    ap.add_argument("--out", help="where to write the CSVs and PNGs (default: the source folder)")
    args = ap.parse_args(argv)
    try:
        report = write_report(Path(args.source), Path(args.out) if args.out else None)
    except FileNotFoundError as e:
        print(f"w2sg report: {e}", file=sys.stderr)
        return 2
    if not report["rows"] and not report["chains"]:
        print(f"w2sg report: no finished experiments under {args.source}", file=sys.stderr)
        return 1
    for s in report["summary"]:
        p = s["pgr_median"]
        print(f"{s['task']:<16} {s['weak']:>14} -> {s['strong']:<14} {s['loss']:<8} seeds={s['n_seeds']}  "
              f"acc weak {s['acc_weak_median']:.3f} w2s {s['acc_w2s_median']:.3f} ceiling {s['acc_ceiling_median']:.3f}"
              f"  PGR {'n/a' if p is None else f'{p:.3f}'}")
    for ls in report["losses"]:
        fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        print(f"{ls['task']:<16} loss {ls['loss']:<8} median PGR {fmt(ls['pgr_median'])} over {ls['n_runs']} runs "
              f"({ls['pgr_positive_share']:.0%} > 0); at the largest gap ({ls['largest_gap_pair']}, "
              f"{fmt(ls['largest_gap'])}): {fmt(ls['pgr_median_at_largest_gap'])}")
    for task, chain, loss in sorted({(r["task"], r["chain"], r["loss"]) for r in report["chains"]}):
        rs = [r for r in report["chains"] if (r["task"], r["chain"], r["loss"]) == (task, chain, loss)]
        print(f"{task:<16} chain {chain} ({loss}, {len(rs)} seeds): median acc chain "
              f"{statistics.median(r['acc_chain'] for r in rs):.3f} vs direct "
              f"{statistics.median(r['acc_direct'] for r in rs):.3f}; chain - direct per seed "
              + " ".join(f"{r['chain_minus_direct']:+.3f}" for r in rs))
    print("wrote " + ", ".join(str(p) for p in report["files"]))
    return 0
