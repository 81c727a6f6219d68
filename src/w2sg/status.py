"""``w2sg status``: what the store holds, or which stages of a run or sweep are done and which are missing.

    w2sg status [--kind K] [--model M] [--task T] [--state S]      every stage in the store, filtered
    w2sg status [--plan] <overrides>                               the stages of that run
    w2sg status -m <overrides incl. sweep=<name>>                   the stages of every run of that sweep
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

from w2sg.errors import W2SGError

CONF_DIR = Path(__file__).resolve().parent / "conf"


def compose(overrides: Iterable[str] = (), with_hydra: bool = False, conf_dir: Path = CONF_DIR):
    """The config a run with these overrides gets (Hydra's compose API), without running anything."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from w2sg.schema import register

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


def _lock_held(store, key: str) -> bool:
    from filelock import Timeout

    lock = store.lock(key)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return True
    lock.release()
    return False


def stage_rows(store) -> Iterable[Dict[str, Any]]:
    """One row per stage the store knows: finished, invalid, or unfinished with a checkpoint."""
    now = time.time()
    for path in sorted((store.root / "stages").iterdir()):
        key = path.name
        state = store.status(key)
        row = {"key": key, "state": "done" if state == "done" else "invalid", "kind": "?", "label": "?",
               "model": "?", "task": "?", "metric": "", "age": ""}
        try:
            meta = json.loads((path / "meta.json").read_text())
            row.update(kind=meta.get("kind", "?"), label=meta.get("label", "?"), model=meta.get("model_name", "?"),
                       task=meta.get("task_name", "?"), age=_age(now - meta.get("created", now)))
        except (OSError, ValueError):
            pass
        if state == "done":
            acc = json.loads((path / "metrics.json").read_text()).get("acc")
            row["metric"] = f"acc={acc:.4f}" if isinstance(acc, (int, float)) else ""
        yield row
    for path in sorted((store.root / "partial").iterdir()):
        key = path.name
        if (store.root / "stages" / key).exists() or not (path / "checkpoint.pt").exists():
            continue
        held = _lock_held(store, key)
        yield {"key": key, "state": "running" if held else "interrupted", "kind": "train", "label": "", "model": "",
               "task": "", "metric": "checkpoint", "age": _age(now - (path / "checkpoint.pt").stat().st_mtime)}


def plan_rows(store, overrides: List[str]) -> List[Dict[str, Any]]:
    from w2sg.experiment import plan

    cfg = compose(overrides)
    rows = []
    named = list(plan(cfg).items())
    seen = {stage.key for _, stage in named}
    for _, stage in list(named):  # stored features (probe) and generatively finetuned weights are stages too
        for dep in stage.inputs.values():
            if dep.kind in ("features", "lm") and dep.key not in seen:
                seen.add(dep.key)
                named.append((dep.kind, dep))
    for name, stage in named:
        state = store.status(stage.key)
        if state == "missing" and store.has_partial(stage.key):
            state = "running" if _lock_held(store, stage.key) else "interrupted"
        rows.append({"key": stage.key, "state": state.split(":")[0], "kind": name, "label": stage.label,
                     "model": stage.model.name, "task": cfg.task.name, "metric": "", "age": ""})
    return rows


def render(rows: List[Dict[str, Any]], columns: List[str]) -> str:
    cells = [[c.upper() for c in columns]] + [[str(r[c])[:12] if c == "key" else str(r[c]) for c in columns]
                                               for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="w2sg status", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--multirun", action="store_true", help="expand the overrides as a sweep")
    parser.add_argument("--plan", action="store_true", help="show the stages of the run the overrides describe")
    parser.add_argument("--kind", help="filter: train, labels, features or lm (store listing), or a stage name (plans)")
    parser.add_argument("--model", help="filter by model name")
    parser.add_argument("--task", help="filter by task")
    parser.add_argument("--state", help="filter: done, missing, running, interrupted, invalid")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for a run or sweep")
    args = parser.parse_args(argv)

    from w2sg.store import Store

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
            columns = ["key", "kind", "label", "task", "state"]
        else:
            store = Store(compose([]).store_dir)
            rows = list(stage_rows(store))
            columns = ["key", "kind", "label", "task", "state", "metric", "age"]
    except W2SGError as e:
        print(f"w2sg: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # Hydra's compose errors: bad override or option, already worded for users
        print(f"w2sg status: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    for attr in ("kind", "model", "task", "state"):
        value = getattr(args, attr)
        if value:
            rows = [r for r in rows if r[attr] == value]
    print(render(rows, columns))
    counts: Dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    print(f"\n{len(rows)} stages: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + f"  (store: {store.root})")
    return 0
