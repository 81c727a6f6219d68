"""``w2sg status``: what the store holds, or which stages of a run or sweep are done and which are missing.

    w2sg status [--kind K] [--role R] [--model M] [--task T] [--seed N] [--loss L] [--state S]
                                                                   every stage in the store, filtered
    w2sg status [--plan] <overrides>                               the stages of that run (same filters)
    w2sg status -m <overrides incl. sweep=<name>>                   the stages of every run of that sweep

Kind: what a stage computes (train, labels, features, lm). Role: its part in the experiment (weak, ceiling,
w2s, link, labels, features, lm). State: done, missing (plans only), running (a process holds its lock),
interrupted (a checkpoint and no process: a rerun resumes it), invalid (stored by an older format or broken).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

from w2sg.core.errors import W2SGError

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose(overrides: Iterable[str] = (), with_hydra: bool = False, conf_dir: Path = CONF_DIR):
    """The config a run with these overrides gets (Hydra's compose API), without running anything."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from w2sg.app.config import register

    register()
    with initialize_config_dir(str(conf_dir), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides), return_hydra_config=with_hydra)


def expand_sweep(overrides: List[str]) -> List[List[str]]:
    """The override list of every job of ``w2sg -m <overrides>``, as Hydra's basic sweeper expands them."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from omegaconf import OmegaConf

    cfg = compose([o for o in overrides if _is_group_choice(o)], with_hydra=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params) if cfg.hydra.sweeper.params else {}
    given = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    combined = [f"{k}={v}" for k, v in params.items() if k not in given] + list(overrides)
    from hydra.core.override_parser.overrides_parser import OverridesParser

    batches = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(combined), None)
    return [list(job) for batch in batches for job in batch]


def _is_group_choice(override: str) -> bool:
    key = override.split("=", 1)[0]
    return key in ("sweep", "experiment") or "," not in override


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


KINDS = ("train", "labels", "features", "lm")  # what a stage computes
ROLES = ("weak", "ceiling", "w2s", "link", "labels", "features", "lm")  # its part in the experiment
STATES = ("done", "missing", "running", "interrupted", "invalid")


def role_of(kind: str, label: str) -> str:
    """A stage's role from its kind and label, as ``w2sg.core.graph.Stage.role`` gives it (without importing it)."""
    if kind in ("features", "lm"):
        return kind
    prefix = label.split(":")[0]
    return "labels" if prefix.endswith("labels") else prefix.rstrip("0123456789")


def _one_of(name: str, valid: Iterable[str]):
    """An argparse type: the value if valid, else an error listing the valid values (and the option a value of
    the other filter belongs to: ``--kind w2s`` -> use ``--role w2s``)."""
    def check(value: str) -> str:
        if value in valid:
            return value
        other = {"kind": ("role", ROLES), "role": ("kind", KINDS)}[name]
        hint = f"; {value!r} is a {other[0]}: use --{other[0]} {value}" if value in other[1] else ""
        raise argparse.ArgumentTypeError(f"unknown {name} {value!r}; valid: {', '.join(valid)}{hint}")

    return check


def _row(key: str, state: str, info: Dict[str, Any], metric: str = "", age: str = "") -> Dict[str, Any]:
    kind, label = info.get("kind") or "?", info.get("label") or "?"
    seed, loss = info.get("seed"), info.get("loss")
    return {"key": key, "state": state, "kind": kind, "role": role_of(kind, label) if label != "?" else "?",
            "label": label, "model": info.get("model") or "?", "task": info.get("task") or "?",
            "seed": "" if seed is None else str(seed), "loss": loss or "", "metric": metric, "age": age}


def _metric(acc: Any) -> str:
    return f"acc={acc:.4f}" if isinstance(acc, (int, float)) and not isinstance(acc, bool) else ""


def _read_json(path: str) -> Any:
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        return None


def _done_row(store, key: str, now: float) -> Dict[str, Any]:
    """A stored stage's row from its DONE marker alone; stages stored before the marker held a summary (or
    broken ones) are read in full."""
    from w2sg.core.store import FORMAT, summary

    path = f"{store.root}/stages/{key}"
    marker = _read_json(f"{path}/DONE")
    if not (isinstance(marker, dict) and marker.get("format") == FORMAT):
        state = store.status(key)
        meta = _read_json(f"{path}/meta.json")
        metrics = _read_json(f"{path}/metrics.json") if state == "done" else None
        marker = summary(meta, metrics or {}) if isinstance(meta, dict) else {}
        if state != "done":
            return _row(key, "invalid", marker)
    created = marker.get("created")
    return _row(key, "done", marker, _metric(marker.get("acc")),
                _age(now - created) if isinstance(created, (int, float)) else "")


def stage_rows(store) -> Iterable[Dict[str, Any]]:
    """One row per stage the store knows: stored (done or invalid), being computed (running: its lock is held),
    or stopped with a checkpoint to resume from (interrupted). Reads one small file per stored stage."""
    now = time.time()
    stored = sorted(os.listdir(store.root / "stages"))
    for key in stored:
        yield _done_row(store, key, now)
    done = set(stored)
    for key in sorted(os.listdir(store.root / "partial")):
        if key in done:
            continue
        path = store.root / "partial" / key
        checkpoint = path / "checkpoint.pt"
        running = store.is_running(key)
        if not running and not checkpoint.exists():
            continue  # a computation that failed before its first checkpoint: nothing to resume, simply missing
        info = _read_json(str(path / "stage.json")) or {"kind": "train"}  # a checkpoint from before stage.json
        started = info.get("created") if isinstance(info.get("created"), (int, float)) else None
        if started is None and checkpoint.exists():
            started = checkpoint.stat().st_mtime
        yield _row(key, "running" if running else "interrupted", info, "checkpoint" if checkpoint.exists() else "",
                   _age(now - started) if started is not None else "")


def plan_rows(store, overrides: List[str]) -> List[Dict[str, Any]]:
    from w2sg.core.plan import plan

    from w2sg.app.config import resolve

    cfg = resolve(compose(overrides))
    rows = []
    named = list(plan(cfg).values())
    seen = {stage.key for stage in named}
    for stage in named:  # stored features (probe) and generatively finetuned weights are stages too (at any depth)
        for dep in stage.inputs.values():
            if dep.kind in ("features", "lm") and dep.key not in seen:
                seen.add(dep.key)
                named.append(dep)
    for stage in named:
        state = store.status(stage.key).split(":")[0]
        if state != "done" and store.is_running(stage.key):
            state = "running"
        elif state == "missing" and store.has_partial(stage.key):
            state = "interrupted"
        loss = stage.spec.get("loss")
        rows.append({"key": stage.key, "state": state, "kind": stage.kind, "role": stage.role, "label": stage.label,
                     "model": stage.model.name, "task": cfg.task.name, "seed": str(stage.spec.get("seed", "")),
                     "loss": loss["name"] if isinstance(loss, dict) else "", "metric": "", "age": ""})
    return rows


def default_store_dir() -> str:
    """The store a run without overrides uses (``store_dir`` of the primary config: env W2SG_STORE or the
    default), read from config.yaml alone: composing the whole config would take longer than listing the store."""
    from omegaconf import OmegaConf

    return str(OmegaConf.load(CONF_DIR / "config.yaml").store_dir)


def render(rows: List[Dict[str, Any]], columns: List[str]) -> str:
    cells = [[c.upper() for c in columns]] + [[str(r[c])[:12] if c == "key" else str(r[c]) for c in columns]
                                               for r in rows]
    widths = [max(map(len, col)) for col in zip(*cells)]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells)


def store_size_line(store) -> str:
    """The store's size on disk, the part that is weights, and how many stages' weights were freed (w2sg gc)."""
    from w2sg.core.store import human_bytes

    sizes = store.sizes()
    freed = f"; weights of {sizes['freed']} stages freed" if sizes["freed"] else ""
    return (f"store size: {human_bytes(sizes['total'])}, of which weights {human_bytes(sizes['weights'])}{freed} "
            "(w2sg gc frees the weights no stage still needs)")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="w2sg status", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--multirun", action="store_true", help="expand the overrides as a sweep")
    parser.add_argument("--plan", action="store_true", help="show the stages of the run the overrides describe")
    parser.add_argument("--kind", type=_one_of("kind", KINDS), metavar="{" + ",".join(KINDS) + "}",
                        help="filter by what a stage computes")
    parser.add_argument("--role", type=_one_of("role", ROLES), metavar="{" + ",".join(ROLES) + "}",
                        help="filter by a stage's part in the experiment")
    parser.add_argument("--model", help="filter by model name")
    parser.add_argument("--task", help="filter by task")
    parser.add_argument("--seed", help="filter by seed")
    parser.add_argument("--loss", help="filter by loss (training stages)")
    parser.add_argument("--state", choices=STATES, help="filter by state")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for a run or sweep")
    args = parser.parse_args(argv)

    from w2sg.core.store import Store

    try:
        if args.multirun or args.plan or args.overrides:
            jobs = expand_sweep(args.overrides) if args.multirun else [args.overrides]
            store = Store(compose(jobs[0]).store_dir)
            rows, seen = [], set()
            for job in jobs:
                for row in plan_rows(store, job):
                    if row["key"] not in seen:  # stages shared by several jobs are listed once
                        seen.add(row["key"])
                        rows.append(row)
            columns = ["key", "kind", "role", "label", "task", "seed", "loss", "state"]
        else:
            store = Store(default_store_dir())
            rows = list(stage_rows(store))
            columns = ["key", "kind", "role", "label", "task", "seed", "loss", "state", "metric", "age"]
    except W2SGError as e:
        print(f"w2sg: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # Hydra's compose errors: bad override or option, already worded for users
        print(f"w2sg status: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    for attr in ("kind", "role", "model", "task", "seed", "loss", "state"):
        value = getattr(args, attr)
        if value:
            rows = [r for r in rows if r[attr] == value]
    print(render(rows, columns))
    counts: Dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    print(f"\n{len(rows)} stages: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + f"  (store: {store.root})")
    print(store_size_line(store))
    return 0
