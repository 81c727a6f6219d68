"""Reading finished experiments into report rows: one row per experiment (task, models, loss, seed, accuracies,
PGR, its CI over test examples, diagnostics, and the settings that tell the experiments reported apart).

Two sources, one row format:

* a sweep or run folder: the ``metrics.json`` every finished run writes (:func:`rows_from_runs`);
* a store: the experiment records runs write into it (``<store>/experiments/<id>.json``, the same metrics, see
  :meth:`w2sg.core.store.Store.record_experiment`), each used only while every stage it names is still stored
  (:func:`rows_from_store`). A store's w2s stages that no record names (stored before runs recorded their
  experiments, or by ``stages=[...]`` runs) are counted in a warning, not guessed into experiments.

Runs of the same experiment (the same w2s and ceiling stages) give one row, the newest. Also here: an
experiment's settings as runs record them (:func:`experiment_settings`, from its stages' specs), which of them
a report shows (:func:`settings_columns`), bootstrap-chain rows (:func:`chain_rows`) and the results table's
columns (:func:`result_columns`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from w2sg.results import diagnostics, stats

log = logging.getLogger(__name__)

BASE = list(stats.GROUP)
METRICS = list(stats.METRICS)
# where a setting belongs: a column is kept when it varies among rows of the same owner (its model, task or
# loss; the whole table for training and generative settings), so a model's own path or a task's template
# do not show up merely because several models or tasks are reported
OWNERS = {"task.": ["task"], "weak_model.": ["weak"], "weak_train.": ["weak"], "strong_model.": ["strong"],
          "loss.": ["loss"]}

Found = List[Tuple[str, Dict[str, Any]]]  # (where it was read, for messages; a run's metrics), oldest first
NO_RECORD_FIX = "rerun their experiments: every stage is reused, and the run records the experiment"


def is_setting(column: str) -> bool:
    """Whether a row's column is a setting (``train.lr``, ``task.n_train``, ...; ``settings`` for unrecorded ones)."""
    return "." in column or column == "settings"


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
    of a stage graph (``spec_of`` and ``inputs_of`` read a node). Names, sizes and the seed are columns of
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
    """experiment_settings of a run's planned stages (w2sg.core.plan.plan): what its metrics.json records."""
    return experiment_settings(stages["weak"], stages["w2s"], lambda s: s.spec, lambda s: s.inputs)


# --- finished experiments: from runs' metrics.json or a store's records ------------------------------------

def run_metrics(root: Path) -> Found:
    """The metrics.json of every finished run under a folder (not a store's per-stage files, not stages= runs),
    oldest first."""
    out = []
    for path in sorted(Path(root).glob("**/metrics.json")):
        if (path.parent / "meta.json").exists():  # a stage of a store found under the folder
            continue
        metrics = json.loads(path.read_text())
        if not isinstance(metrics, dict) or "stages" not in metrics or "task" not in metrics:
            continue
        if metrics.get("subset"):  # a run of only some stages (stages=[...], e.g. a launcher's shared-stage job)
            continue
        out.append((path, metrics))
    return [(str(path.parent), m) for path, m in sorted(out, key=lambda f: f[0].stat().st_mtime)]


def _w2s_stages(store: Any) -> List[str]:
    """Keys of the store's finished w2s stages (a strong model trained on the weak labels of an experiment)."""
    keys = []
    for path in sorted((store.root / "stages").iterdir()):
        if store.status(path.name) != "done":
            continue
        meta = json.loads((path / "meta.json").read_text())
        if meta.get("kind") == "train" and str(meta.get("label", "")).startswith("w2s:"):
            keys.append(path.name)
    return keys


def store_metrics(root: Path) -> Found:
    """The experiments recorded in a store whose stages are all still stored, oldest record first.

    Warns (with counts) about records naming a stage the store no longer holds as done (skipped), and about w2s
    stages that no record names (stores written before runs recorded their experiments)."""
    from w2sg.core.store import Store, experiment_id

    store = Store(root)
    out: Found = []
    stale = 0
    recorded = set()  # stage keys some record names (even one skipped: its w2s stage has a record)
    for metrics in store.experiments():
        keys = [s["key"] for s in metrics["stages"].values()]
        recorded.update(keys)
        if any(store.status(k) != "done" for k in keys):
            stale += 1
            continue
        out.append((f"experiment record {experiment_id(keys)}", metrics))
    if stale:
        log.warning("%d experiment record(s) in %s name stages the store no longer holds (removed or invalid); "
                    "skipped (rerun those experiments to store their stages again)", stale, root)
    unrecorded = [k for k in _w2s_stages(store) if k not in recorded]
    if unrecorded:
        log.warning("%d w2s stage(s) in %s belong to no recorded experiment (stored before runs recorded their "
                    "experiments in the store, or by stages=[...] runs), so the report leaves them out; to report "
                    "them, %s", len(unrecorded), root, NO_RECORD_FIX)
    return out


def experiments(path: Path) -> Found:
    """The finished experiments of a sweep or run folder (its runs' metrics.json) or of a store (its records)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    return store_metrics(path) if (path / "stages").is_dir() else run_metrics(path)


# --- rows -------------------------------------------------------------------------------------------------

def _row(m: Dict[str, Any]) -> Dict[str, Any]:
    return {"task": m["task"], "weak": m["weak"]["model"], "weak_params": m["weak"]["params"],
            "strong": m["strong"]["model"], "strong_params": m["strong"]["params"], "loss": m["loss"],
            "seed": m["seed"], "acc_weak": m["acc"]["weak"], "acc_ceiling": m["acc"]["ceiling"],
            "acc_w2s": m["acc"]["w2s"], "pgr": m["pgr"],
            # AUROCs: anchors whose PGR is computed from ROC AUC (EleutherAI/w2s) compare on them
            **{f"auroc_{k}": (m.get("auroc") or {}).get(k) for k in ("weak", "ceiling", "w2s")}}


ENSEMBLE = ("acc_ensemble", "pgr_vs_ensemble")  # labels=ensemble: the supervisor's accuracy and PGR against it


def ensemble_columns(m: Dict[str, Any]) -> Dict[str, Any]:
    """A labels=ensemble run's ensemble accuracy and PGR against it (``pgr`` is against the weak model); None for
    other runs."""
    e = m.get("ensemble") or {}
    return {"acc_ensemble": e.get("acc"), "pgr_vs_ensemble": e.get("pgr")}


def _one_per_experiment(found: List[Tuple[str, Tuple, Dict[str, Any]]], what: str) -> List[Dict[str, Any]]:
    """Runs of the same experiment (same ``ident``, found oldest first) give one row: the newest, saying so if
    their numbers differ."""
    latest: Dict[Tuple, Tuple[str, Dict[str, Any]]] = {}
    for where, ident, row in found:
        if ident in latest:
            old_where, old = latest[ident]
            if any(old[c] != row[c] for c in row if c.startswith(("acc", "pgr"))):
                log.warning("%s and %s are the same %s (same stage keys) with different results (recomputed?); "
                            "reporting the newer, %s", old_where, where, what, where)
        latest[ident] = (where, row)
    return [row for _, row in latest.values()]


def rows_of(found: Found, source: Any) -> List[Dict[str, Any]]:
    """One row per distinct experiment (same w2s and ceiling stages) of finished experiments' metrics."""
    rows, legacy = [], 0
    for where, metrics in found:
        row = {**_row(metrics), **ensemble_columns(metrics), **stats.ci_columns(metrics), **diagnostics.row(metrics)}
        stages = metrics["stages"]
        row["w2s_key"] = stages["w2s"]["key"][:12]
        if "settings" in metrics:
            row.update(metrics["settings"])
        else:  # written before runs recorded their settings: cannot tell which runs differ only by seed
            legacy += 1
            row["settings"] = f"unrecorded ({row['w2s_key']})"
        rows.append((where, (stages["w2s"]["key"], stages["ceiling"]["key"]), row))
    if legacy:
        log.warning("%d run(s) under %s predate recorded settings: each is its own row, not grouped over seeds "
                    "(rerun them with this w2sg to record their settings; every stage is reused)", legacy, source)
    return _one_per_experiment(rows, "experiment")


def rows_from_runs(root: Path) -> List[Dict[str, Any]]:
    """Rows from the metrics.json of every run under a sweep (or run) folder; one per distinct experiment."""
    return rows_of(run_metrics(Path(root)), root)


def rows_from_store(root: Path) -> List[Dict[str, Any]]:
    """Rows from the experiments recorded in a store (see :func:`store_metrics`); one per distinct experiment,
    as :func:`rows_from_runs` gives of the runs that recorded them."""
    return rows_of(store_metrics(Path(root)), root)


def settings_columns(rows: List[Dict[str, Any]], owners: Optional[Dict[str, List[str]]] = None) -> List[str]:
    """The settings that tell experiments apart: those that vary among rows of the same owner (see OWNERS)."""
    import pandas as pd

    owners = OWNERS if owners is None else owners
    cols = sorted({c for r in rows for c in r if is_setting(c)})
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


def table(found: Found, source: Any) -> List[Dict[str, Any]]:
    """One row per experiment, with the settings that tell the experiments found apart (and no others), sorted."""
    rows = rows_of(found, source)
    keep = settings_columns(rows)
    rows = [{k: v for k, v in r.items() if k in keep or not is_setting(k)} for r in rows]
    return sorted(rows, key=lambda r: tuple(str(r.get(c)) for c in
                                            ["task", "weak_params", "strong_params", "loss"] + keep + ["seed"]))


def collect(path: Path) -> List[Dict[str, Any]]:
    """:func:`table` of a sweep folder, run folder or store."""
    return table(experiments(path), path)


def chain_rows(found: Found) -> List[Dict[str, Any]]:
    """Bootstrap chain vs direct, one row per chain experiment (task, chain, loss, settings, seed)."""
    rows = []
    for where, m in found:
        if "chain" not in m:
            continue
        ch = m["chain"]
        row = {"task": m["task"], "chain": ch["name"], "loss": m["loss"], **m.get("settings", {}), "seed": m["seed"],
               "acc_weak": m["acc"]["weak"], "acc_ceiling": m["acc"]["ceiling"], "acc_direct": ch["direct"]["acc"],
               "acc_chain": ch["end_to_end"]["acc"], "pgr_direct": ch["direct"]["pgr"],
               "pgr_chain": ch["end_to_end"]["pgr"], "chain_minus_direct": ch["bootstrap_minus_direct"]}
        ident = tuple(sorted(s["key"] for s in m["stages"].values())) or (where,)
        rows.append((where, ident, row))
    rows = _one_per_experiment(rows, "chain experiment")
    keep = ["task", "chain", "loss"] + settings_columns(rows, owners={"task.": ["task"], "loss.": ["loss"]})
    rows = [{k: v for k, v in r.items() if k in keep or not is_setting(k)} for r in rows]
    return sorted(rows, key=lambda r: tuple(str(r.get(c)) for c in keep + ["seed"]))


def result_columns(rows: List[Dict[str, Any]]) -> List[str]:
    """results.csv: who, the settings that differ, seed, numbers, and the w2s stage key (to find it in a store)."""
    settings = sorted({c for r in rows for c in r if is_setting(c)})
    extra = [c for c in [*ENSEMBLE, *stats.ci_columns({}), *diagnostics.KEYS]
             if any(r.get(c) is not None for r in rows)]
    return BASE + settings + ["seed"] + METRICS + extra + ["w2s_key"]
