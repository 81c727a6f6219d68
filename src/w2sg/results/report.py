"""Sweep reports: one table row per experiment, median PGR over seeds, PGR curves.

    w2sg report <sweep dir | run dir | store dir> [--out DIR]

writes ``results.csv`` (one row per experiment: task, weak, strong, loss, every setting that differs between
the experiments reported, seed), ``summary.csv`` (median and spread over seeds only) and PNG plots: PGR vs
strong-model size, one curve per weak model, loss and setting, and accuracy (weak / w2s / ceiling) vs strong
size. It runs at the end of every multirun too (a Hydra callback), which also logs the same table and curves
to one W&B run for that sweep invocation.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import statistics
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from w2sg.results import anchors, diagnostics, stats

log = logging.getLogger("w2sg.results.report")

BASE = ["task", "weak", "weak_params", "strong", "strong_params", "loss"]
METRICS = ["acc_weak", "acc_ceiling", "acc_w2s", "pgr"]
# where a setting belongs: a column is kept when it varies among rows of the same owner (its model, task or
# loss; the whole table for training and generative settings), so a model's own path or a task's template
# do not show up merely because several models or tasks are reported
OWNERS = {"task.": ["task"], "weak_model.": ["weak"], "weak_train.": ["weak"], "strong_model.": ["strong"],
          "loss.": ["loss"]}
GROUP = BASE  # the fixed part of a summary group; the varying settings (see settings_columns) join it


# --- an experiment's settings -----------------------------------------------------------------------------

def _flatten(prefix: str, value: Any, out: Dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}", v, out)
    elif isinstance(value, (list, tuple)):
        out[prefix] = json.dumps(value)
    else:
        out[prefix] = value


def _lm_spec(node: Any, spec_of: Callable[[Any], Dict], inputs_of: Callable[[Any], Dict]) -> Optional[Dict]:
    """The generative finetuning a stage starts from (directly, or through its probe features); None if none."""
    inputs = inputs_of(node)
    if "init" in inputs:
        return spec_of(inputs["init"])
    if "features" in inputs:
        return _lm_spec(inputs["features"], spec_of, inputs_of)
    return None


def experiment_settings(weak: Any, w2s: Any, spec_of: Callable[[Any], Dict],
                        inputs_of: Callable[[Any], Dict]) -> Dict[str, Any]:
    """Every setting that can change an experiment's result, flat (``train.lr``, ``task.n_train``, ...).

    Read from the specs of its weak and w2s stages (the ceiling's follow from the w2s stage's), given as nodes
    of a stage graph: Stage objects in a run, stage keys in a store. Names, sizes and the seed are columns of
    their own."""
    ws, ss = spec_of(weak), spec_of(w2s)
    out: Dict[str, Any] = {}
    _flatten("task", ss["task"], out)
    _flatten("train", ss["train"], out)
    out["weak_train.lr"] = ws["train"]["lr"]  # the weak model's (its own default when train.lr is null)
    _flatten("loss", {k: v for k, v in ss["loss"].items() if k != "name"}, out)
    _flatten("weak_model", ws["model"], out)
    _flatten("strong_model", ss["model"], out)
    exts = {**ws.get("extensions", {}), **ss.get("extensions", {})}  # versions of users' code the stages ran
    if exts:
        _flatten("extensions", exts, out)
    for side, node in (("weak", weak), ("strong", w2s)):
        lm = _lm_spec(node, spec_of, inputs_of)
        if lm is None:
            out[f"generative.{side}"] = "none"
        else:
            _flatten(f"generative.{side}", lm["generative"], out)
    return out


def settings_of_stages(stages: Dict[str, Any]) -> Dict[str, Any]:
    """experiment_settings of a run's planned stages (w2sg.core.plan.plan)."""
    return experiment_settings(stages["weak"], stages["w2s"], lambda s: s.spec, lambda s: s.inputs)


# --- rows -------------------------------------------------------------------------------------------------

def _row(m: Dict[str, Any]) -> Dict[str, Any]:
    return {"task": m["task"], "weak": m["weak"]["model"], "weak_params": m["weak"]["params"],
            "strong": m["strong"]["model"], "strong_params": m["strong"]["params"], "loss": m["loss"],
            "seed": m["seed"], "acc_weak": m["acc"]["weak"], "acc_ceiling": m["acc"]["ceiling"],
            "acc_w2s": m["acc"]["w2s"], "pgr": m["pgr"]}


def _run_metrics(root: Path) -> List[Tuple[Path, Dict[str, Any]]]:
    """The metrics.json of every finished run under a folder (not a store's per-stage files, not stages= runs)."""
    out = []
    for path in sorted(root.glob("**/metrics.json")):
        if (path.parent / "meta.json").exists():  # a stage of a store found under the folder
            continue
        metrics = json.loads(path.read_text())
        if not isinstance(metrics, dict) or "stages" not in metrics or "task" not in metrics:
            continue
        if metrics.get("subset"):  # a run of only some stages (stages=[...], e.g. a launcher's shared-stage job)
            continue
        out.append((path, metrics))
    return out


def _one_per_experiment(found: List[Tuple[Path, Tuple, Dict[str, Any]]], what: str) -> List[Dict[str, Any]]:
    """Runs of the same experiment (same stage keys) give one row: the newest, saying so if their numbers differ."""
    latest: Dict[Tuple, Tuple[Path, Dict[str, Any]]] = {}
    for path, ident, row in sorted(found, key=lambda f: f[0].stat().st_mtime):
        if ident in latest:
            old_path, old = latest[ident]
            if any(old[c] != row[c] for c in row if c.startswith(("acc", "pgr"))):
                log.warning("%s and %s are the same %s (same stage keys) with different results (recomputed?); "
                            "reporting the newer, %s", old_path.parent, path.parent, what, path.parent)
        latest[ident] = (path, row)
    return [row for _, row in latest.values()]


def rows_from_runs(root: Path) -> List[Dict[str, Any]]:
    """Rows from the metrics.json of every run under a sweep (or run) folder; one per distinct experiment."""
    found, legacy = [], 0
    for path, metrics in _run_metrics(Path(root)):
        row = {**_row(metrics), **stats.ci_columns(metrics), **diagnostics.row(metrics)}
        stages = metrics["stages"]
        row["w2s_key"] = stages["w2s"]["key"][:12]
        if "settings" in metrics:
            row.update(metrics["settings"])
        else:  # written before runs recorded their settings: cannot tell which runs differ only by seed
            legacy += 1
            row["settings"] = f"unrecorded ({row['w2s_key']})"
        found.append((path, (stages["w2s"]["key"], stages["ceiling"]["key"]), row))
    if legacy:
        log.warning("%d run(s) under %s predate recorded settings: each is its own row, not grouped over seeds "
                    "(rerun them with this w2sg to record their settings; every stage is reused)", legacy, root)
    return _one_per_experiment(found, "experiment")


def chain_rows(root: Path) -> List[Dict[str, Any]]:
    """Bootstrap chain vs direct, one row per chain experiment (task, chain, loss, settings, seed)."""
    found = []
    for path, m in _run_metrics(Path(root)):
        if "chain" not in m:
            continue
        ch = m["chain"]
        row = {"task": m["task"], "chain": ch["name"], "loss": m["loss"], **m.get("settings", {}), "seed": m["seed"],
               "acc_weak": m["acc"]["weak"], "acc_ceiling": m["acc"]["ceiling"], "acc_direct": ch["direct"]["acc"],
               "acc_chain": ch["end_to_end"]["acc"], "pgr_direct": ch["direct"]["pgr"],
               "pgr_chain": ch["end_to_end"]["pgr"], "chain_minus_direct": ch["bootstrap_minus_direct"]}
        ident = tuple(sorted(s["key"] for s in m["stages"].values())) or (str(path),)
        found.append((path, ident, row))
    rows = _one_per_experiment(found, "chain experiment")
    keep = ["task", "chain", "loss"] + settings_columns(rows, owners={"task.": ["task"], "loss.": ["loss"]})
    rows = [{k: v for k, v in r.items() if k in keep or not _is_setting(k)} for r in rows]
    return sorted(rows, key=lambda r: tuple(str(r.get(c)) for c in keep + ["seed"]))


def _is_setting(column: str) -> bool:
    return "." in column or column == "settings"


def settings_columns(rows: List[Dict[str, Any]], owners: Optional[Dict[str, List[str]]] = None) -> List[str]:
    """The settings that tell experiments apart: those that vary among rows of the same owner (see OWNERS)."""
    import pandas as pd

    owners = OWNERS if owners is None else owners
    cols = sorted({c for r in rows for c in r if _is_setting(c)})
    if not rows or not cols:
        return []
    df = pd.DataFrame([{c: json.dumps(r.get(c)) for c in cols + BASE} for r in rows])
    keep = []
    for c in cols:
        by = next((o for prefix, o in owners.items() if c.startswith(prefix)), [])
        counts = df.groupby(by)[c].nunique() if by else pd.Series([df[c].nunique()])
        if counts.max() > 1:
            keep.append(c)
    return keep


def _spread(rows: List[Dict[str, Any]], cols: List[str]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for col in cols:
        vals = [r[col] for r in rows if r.get(col) is not None]
        out[f"{col}_median"] = statistics.median(vals) if vals else None
        out[f"{col}_min"] = min(vals) if vals else None
        out[f"{col}_max"] = max(vals) if vals else None
    return out


def _groups(rows: List[Dict[str, Any]], by: List[str]) -> Dict[Tuple, List[Dict[str, Any]]]:
    """Rows grouped by the values of some columns (in first-seen order)."""
    groups: Dict[Tuple, List[Dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(json.dumps(r.get(c)) for c in by), []).append(r)
    return groups


def _median(vals: List[Any]) -> Optional[float]:
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def loss_summary(rows: List[Dict[str, Any]], summary: List[Dict[str, Any]],
                 settings: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    """Per task, loss and setting: median PGR over every pair and seed, and the median PGR at the largest gap.

    The largest gap is the (weak, strong) pair whose median ceiling - weak accuracy is largest."""
    settings = [c for c in (settings or []) if not c.startswith(("weak_model.", "weak_train.", "strong_model."))]
    out = []
    for _, rs_task in sorted(_groups(rows, ["task"] + settings).items()):
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


def _ceiling_match(spec: Dict[str, Any], inputs: Dict[str, str]) -> str:
    """What a w2s stage and its ceiling share: the strong model, task, seed, training settings (but which labels
    validate, which only w2s stages have) and the inputs other than labels (probe features, generative init)."""
    train = {k: v for k, v in spec["train"].items() if k != "val_labels"}
    return json.dumps({"model": spec["model"], "task": spec["task"], "train": train, "seed": spec["seed"],
                       "inputs": {k: v for k, v in inputs.items() if k != "labels"}}, sort_keys=True)


def rows_from_store(root: Path) -> List[Dict[str, Any]]:
    """Rows rebuilt from a store alone: each w2s stage, its weak model (through its labels) and its ceiling."""
    from w2sg.core.store import Store
    from w2sg.ml.metrics import pgr

    store = Store(root)
    stages: Dict[str, Dict[str, Any]] = {}
    for path in (root / "stages").iterdir():
        if store.status(path.name) == "done":
            meta = json.loads((path / "meta.json").read_text())
            meta["metrics"] = json.loads((path / "metrics.json").read_text())
            stages[path.name] = meta

    ceilings = {_ceiling_match(m["spec"], m["inputs"]): m for m in stages.values()
                if m["kind"] == "train" and m["spec"]["labels"] == "ground_truth"}
    rows = []
    for key, m in stages.items():
        if m["kind"] != "train" or m["spec"]["labels"] != "weak":
            continue
        labels = stages.get(m["inputs"]["labels"])
        weak_key = labels["inputs"].get("model") if labels else None  # none for a transform stage (w2sg.ml.methods)
        weak = stages.get(weak_key) if weak_key else None
        ceiling = ceilings.get(_ceiling_match(m["spec"], m["inputs"]))
        if weak is None or ceiling is None or weak["spec"]["labels"] != "ground_truth":
            continue  # a chain link (its teacher is not a ground-truth model) or an incomplete experiment
        acc = {"weak": weak["metrics"]["acc"], "ceiling": ceiling["metrics"]["acc"], "w2s": m["metrics"]["acc"]}
        rows.append({"task": m.get("task_name", m["spec"]["task"]["dataset"]), "weak": weak["model_name"],
                     "weak_params": weak["metrics"]["params"], "strong": m["model_name"],
                     "strong_params": m["metrics"]["params"], "loss": m["spec"]["loss"]["name"],
                     "seed": m["spec"]["seed"], "acc_weak": acc["weak"], "acc_ceiling": acc["ceiling"],
                     "acc_w2s": acc["w2s"], "pgr": pgr(acc["weak"], acc["w2s"], acc["ceiling"])[0],
                     "w2s_key": key[:12],
                     **experiment_settings(weak_key, key, lambda k: stages[k]["spec"], lambda k: stages[k]["inputs"])})
    return rows


def collect(path: Path) -> List[Dict[str, Any]]:
    """One row per experiment, with the settings that tell the experiments found apart (and no others)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    rows = rows_from_store(path) if (path / "stages").is_dir() else rows_from_runs(path)
    keep = settings_columns(rows)
    rows = [{k: v for k, v in r.items() if k in keep or not _is_setting(k)} for r in rows]
    return sorted(rows, key=lambda r: tuple(str(r.get(c)) for c in
                                            ["task", "weak_params", "strong_params", "loss"] + keep + ["seed"]))


def summarize(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Median over seeds only (as the paper reports median PGR), with min and max as the spread."""
    by = GROUP + sorted({c for r in rows for c in r if _is_setting(c)})
    out = []
    for rs in _groups(rows, by).values():
        seeds = [r["seed"] for r in rs]
        if len(set(seeds)) < len(seeds):  # two experiments that no recorded setting tells apart
            raise ValueError(f"{len(seeds) - len(set(seeds))} experiment(s) of {rs[0]['weak']} -> "
                             f"{rs[0]['strong']} share a seed and every recorded setting "
                             f"(w2s stages {', '.join(r['w2s_key'] for r in rs)}); report their folders separately")
        s = {c: rs[0].get(c) for c in by}
        s["n_seeds"] = len(rs)
        s.update(_spread(rs, METRICS))
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

    settings = sorted({c for s in summary for c in s if _is_setting(c)})

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


def result_columns(rows: List[Dict[str, Any]]) -> List[str]:
    """results.csv: who, the settings that differ, seed, numbers, and the w2s stage key (to find it in a store)."""
    settings = sorted({c for r in rows for c in r if _is_setting(c)})
    extra = [c for c in [*stats.ci_columns({}), *diagnostics.KEYS] if any(r.get(c) is not None for r in rows)]
    return BASE + settings + ["seed"] + METRICS + extra + ["w2s_key"]


def write_report(source: Path, out: Optional[Path] = None) -> Dict[str, Any]:
    rows = collect(source)
    out = Path(out or source)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(rows)
    columns = result_columns(rows)
    write_csv(out / "results.csv", rows, columns)
    spread = [f"{c}_{s}" for c in METRICS for s in ("median", "min", "max")]
    settings = [c for c in columns if _is_setting(c)]
    write_csv(out / "summary.csv", summary, GROUP + settings + ["n_seeds"] + spread)
    files = [out / "results.csv", out / "summary.csv"]
    losses = loss_summary(rows, summary, settings)
    if losses:
        write_csv(out / "loss_summary.csv", losses, list(losses[0]))
        files.append(out / "loss_summary.csv")
    chains = chain_rows(Path(source)) if not (Path(source) / "stages").is_dir() else []
    if chains:
        write_csv(out / "chains.csv", chains, list(chains[0]))
        files.append(out / "chains.csv")
    files += stats.write_stats(rows, out, settings=settings)  # CIs, paired loss comparisons, diagnostics
    compared = anchors.compare(rows, settings)  # published figures these rows reproduce (or not)
    if compared:
        files.append(anchors.write(out / "anchors.csv", compared))
    curves: Dict[str, List[str]] = {}
    pngs = plot(summary, out, curves) if rows else []
    if chains:
        pngs.append(plot_chains(chains, out))
    return {"rows": rows, "summary": summary, "losses": losses, "chains": chains, "files": files + pngs,
            "curves": curves, "anchors": compared}


def plot_chains(chains: List[Dict[str, Any]], out: Path) -> Path:
    """Bootstrap chain vs direct: median test accuracy per loss (bars: min-max over seeds), weak and ceiling."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = sorted({c for r in chains for c in r if _is_setting(c)})

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


def log_sweep_to_wandb(logger_cfg: Any, group: str, report: Dict[str, Any], sweep_dir: Path) -> None:
    """One W&B run per sweep invocation (its id from the sweep folder; grouped by the sweep's name): the results
    table and the PGR / accuracy curves (as line plots and PNGs)."""
    import wandb

    from w2sg.run.tracking import Tracker

    tracker = Tracker(logger_cfg, group)
    if not tracker.enabled or not report["rows"]:
        return
    where = str(Path(sweep_dir).resolve())
    run_id = "sweep-" + hashlib.sha256(where.encode()).hexdigest()[:16]
    config = {"sweep": group, "sweep_dir": where}
    with tracker.stage_run(run_id, f"sweep {group} ({Path(sweep_dir).name})", "sweep_summary", config) as run:
        def log_all() -> None:
            columns = result_columns(report["rows"])
            table = wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in report["rows"]])
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
        sweep_dir = Path(config.hydra.sweep.dir)
        if not OmegaConf.select(config, "hydra.launcher.wait", default=True) and \
                next(sweep_dir.glob("**/metrics.json"), None) is None:  # submitted, nothing finished yet
            log.info("no report yet: the jobs were submitted without waiting (hydra.launcher.wait=false); "
                     "`w2sg report %s` once they finish, or rerun the same command to collect them", sweep_dir)
            return
        try:
            report = write_report(sweep_dir)
        except Exception as e:  # a report must never hide the sweep's own results
            log.warning("report for %s failed: %s", sweep_dir, e)
            return
        log.info("report: %s", ", ".join(str(p) for p in report["files"]))
        for line in anchors.lines(report["anchors"]):
            log.info(line)
        choices = config.hydra.runtime.choices
        group = str(choices.get("sweep") or "/".join(sweep_dir.parts[-2:]))
        try:
            log_sweep_to_wandb(config.logger, group, report, sweep_dir)
        except Exception as e:
            log.warning("W&B sweep summary failed (%s); the local report is complete", e)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="w2sg report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", help="a sweep folder (multirun/...), a run folder, or a store folder")
    ap.add_argument("--out", help="where to write the CSVs and PNGs (default: the source folder)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="w2sg report: %(message)s")
    try:
        report = write_report(Path(args.source), Path(args.out) if args.out else None)
    except (FileNotFoundError, ValueError) as e:
        print(f"w2sg report: {e}", file=sys.stderr)
        return 2
    if not report["rows"] and not report["chains"]:
        print(f"w2sg report: no finished experiments under {args.source}", file=sys.stderr)
        return 1
    for s in report["summary"]:
        p = s["pgr_median"]
        settings = "".join(f" {c}={v}" for c, v in s.items() if _is_setting(c))
        print(f"{s['task']:<16} {s['weak']:>14} -> {s['strong']:<14} {s['loss']:<8}{settings} seeds={s['n_seeds']}  "
              f"acc weak {s['acc_weak_median']:.3f} w2s {s['acc_w2s_median']:.3f} ceiling {s['acc_ceiling_median']:.3f}"
              f"  PGR {'n/a' if p is None else f'{p:.3f}'}")
    for ls in report["losses"]:
        fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        settings = "".join(f" {c}={v}" for c, v in ls.items() if _is_setting(c))
        print(f"{ls['task']:<16} loss {ls['loss']:<8}{settings} median PGR {fmt(ls['pgr_median'])} over "
              f"{ls['n_runs']} runs ({ls['pgr_positive_share']:.0%} > 0); at the largest gap "
              f"({ls['largest_gap_pair']}, {fmt(ls['largest_gap'])}): {fmt(ls['pgr_median_at_largest_gap'])}")
    for rs in _groups(report["chains"], ["task", "chain", "loss"]
                      + sorted({c for r in report["chains"] for c in r if _is_setting(c)})).values():
        settings = "".join(f" {c}={v}" for c, v in rs[0].items() if _is_setting(c))
        print(f"{rs[0]['task']:<16} chain {rs[0]['chain']} ({rs[0]['loss']}{settings}, {len(rs)} seeds): median acc "
              f"chain {statistics.median(r['acc_chain'] for r in rs):.3f} vs direct "
              f"{statistics.median(r['acc_direct'] for r in rs):.3f}; chain - direct per seed "
              + " ".join(f"{r['chain_minus_direct']:+.3f}" for r in rs))
    for line in anchors.lines(report["anchors"]):
        print(line)
    print("wrote " + ", ".join(str(p) for p in report["files"]))
    return 0
