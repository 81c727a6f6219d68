"""``w2sg status``: what the store holds, or which stages of a run or sweep are done and which are missing.

    w2sg status [--kind K] [--role R] [--model M] [--task T] [--seed N] [--loss L] [--state S]
                                                                   every stage in the store, filtered
    w2sg status [--plan] <overrides>                               the stages of that run (same filters)
    w2sg status -m <overrides incl. sweep=<name>>                   the stages of every run of that sweep
    w2sg status -m --runs <overrides incl. sweep=<name>>            one line per run of that sweep: its
                                                                   overrides and how many of its stages are
                                                                   done, running, interrupted and missing

Kind: what a stage computes (train, labels, transform, features, lm). Role: its part in the experiment (weak,
ceiling, w2s, link, s2s, labels, transform, features, lm). State: done, missing (plans only), running (a process
holds its lock), interrupted (a checkpoint and no process: a rerun resumes it), stopped (started, stopped before
its first checkpoint: a rerun starts it afresh), invalid (stored by an older format), damaged (its files differ
from what was stored: a rerun sets it aside into the store's damaged/ folder and computes it again). With --runs the filters choose the stages counted (--state: the runs with a stage in that state),
the overrides all runs share are printed once above the table, and MISSING counts invalid stages too (a run
computes them again).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence

from w2sg.app.config import compose, default_store_dir, expand_sweep
from w2sg.core.errors import W2SGError

def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


KINDS = ("train", "labels", "transform", "features", "lm")  # what a stage computes
ROLES = ("weak", "ceiling", "w2s", "link", "s2s", "labels", "transform", "features", "lm")  # its part in the experiment
STATES = ("done", "missing", "running", "interrupted", "stopped", "invalid", "damaged")


def role_of(kind: str, label: str) -> str:
    """The role of a stage stored before stages recorded theirs, from its kind and label (the label's prefix:
    ``weak:m`` -> weak, ``ceiling2:m`` -> ceiling, ``s2s1:m`` -> s2s, ``weak_labels:m`` -> labels)."""
    if kind in ("features", "lm", "transform"):
        return kind
    prefix = label.split(":")[0]
    return "labels" if prefix.endswith("labels") else prefix.rstrip("0123456789")


def _name(value: Any) -> str:
    """A kind or role as text, whether a plain string or an enum member."""
    return str(getattr(value, "value", value))


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
    """A listed stage's row from its summary (DONE marker or partial marker). Its role is the one it was stored
    with; stages stored before roles were recorded get theirs from their label (role_of)."""
    kind, label = info.get("kind") or "?", info.get("label") or "?"
    seed, loss, role = info.get("seed"), info.get("loss"), info.get("role")
    if not role:
        role = role_of(kind, label) if label != "?" else "?"
    return {"key": key, "state": state, "kind": kind, "role": role, "label": label, "model": info.get("model") or "?",
            "task": info.get("task") or "?", "seed": "" if seed is None else str(seed), "loss": loss or "",
            "metric": metric, "age": age}


def _metric(acc: Any) -> str:
    return f"acc={acc:.4f}" if isinstance(acc, (int, float)) and not isinstance(acc, bool) else ""


def stage_rows(store, summaries: Optional[Iterable[Dict[str, Any]]] = None) -> Iterable[Dict[str, Any]]:
    """One row per stage the store knows: stored (done or invalid), being computed (running: its lock is held),
    or stopped with a checkpoint to resume from (interrupted). Reads one small file per stored stage (through
    Store.stage_summaries, or the ``summaries`` it gave already)."""
    now = time.time()
    for found in store.stage_summaries() if summaries is None else summaries:
        if found["state"] != "done":
            yield _row(found["key"], found["state"].split(":")[0], found, found["state"].partition(": ")[2][:60])
            continue
        created = found.get("created")
        yield _row(found["key"], "done", found, _metric(found.get("acc")),
                   _age(now - created) if isinstance(created, (int, float)) else "")
    for stage in store.unfinished():
        info = stage.marker or {"kind": "train"}  # a checkpoint from before partial markers
        state = "running" if stage.running else "interrupted" if stage.checkpoint is not None else "stopped"
        yield _row(stage.key, state, info,
                   "checkpoint" if stage.checkpoint is not None else "",
                   _age(now - stage.started) if stage.started is not None else "")


def plan_rows(store, overrides: List[str]) -> List[Dict[str, Any]]:
    from w2sg.app.config import resolve
    from w2sg.core.plan import plan

    cfg = resolve(compose(overrides))
    rows = []
    named = list(plan(cfg).values())
    seen = {stage.key for stage in named}
    for stage in named:  # stored features (probe) and generatively finetuned weights are stages too (at any depth)
        for dep in stage.inputs.values():
            if _name(dep.kind) in ("features", "lm") and dep.key not in seen:
                seen.add(dep.key)
                named.append(dep)
    for stage in named:
        state = store.status(stage.key).split(":")[0]
        if state != "done" and store.is_running(stage.key):
            state = "running"
        elif state == "missing" and store.has_partial(stage.key):
            state = "interrupted"
        elif state == "missing" and (store.root / "partial" / stage.key / "stage.json").exists():
            state = "stopped"
        loss = stage.spec.get("loss")
        rows.append({"key": stage.key, "state": state, "kind": _name(stage.kind), "role": _name(stage.role),
                     "label": stage.label,
                     "model": stage.model.name, "task": cfg.task.name, "seed": str(stage.spec.get("seed", "")),
                     "loss": loss["name"] if isinstance(loss, dict) else "", "metric": "", "age": ""})
    return rows


def render(rows: Sequence[Dict[str, Any]], columns: Sequence[str]) -> str:
    """An aligned table: a header of the column names, one line per row (keys cut to 12 characters)."""
    cols = [[c.upper()] + [r[c][:12] for r in rows] if c == "key" else [c.upper()] + [str(r[c]) for r in rows]
            for c in columns]
    widths = [max(map(len, col)) for col in cols]
    line = "  ".join([f"{{:<{w}}}" for w in widths[:-1]] + ["{}"])
    return "\n".join(line.format(*cells).rstrip() for cells in zip(*cols))


def store_size_line(store, summaries: Optional[Iterable[Dict[str, Any]]] = None) -> str:
    """The store's size on disk, the part that is weights, and how many stages' weights were freed (w2sg gc);
    ``summaries``: the stages' summaries already read (Store.stage_summaries), not to read them twice."""
    from w2sg.core.store import human_bytes

    sizes = store.sizes(summaries)
    freed = f"; weights of {sizes['freed']} stages freed" if sizes["freed"] else ""
    line = (f"store size: {human_bytes(sizes['total'])}, of which weights {human_bytes(sizes['weights'])}{freed} "
            "(w2sg gc frees the weights no stage still needs)")
    left = store.leftovers()
    if left:
        line += (f"\n{len(left)} temporary files of stopped runs ({human_bytes(sum(n for _, n in left))}, e.g. "
                 f"{left[0][0]}): w2sg gc removes them")
    damaged = store.damaged()
    if damaged:
        line += (f"\n{len(damaged)} damaged stages, checkpoints or feature chunks set aside in {store.root / 'damaged'} "
                 f"({human_bytes(sum(n for _, n in damaged))}): recomputed where needed; delete them once looked at")
    return line


FILTERS = ("kind", "role", "model", "task", "seed", "loss")  # stage filters; --state is one too


def _filtered(rows: List[Dict[str, Any]], args: argparse.Namespace, names: Sequence[str]) -> List[Dict[str, Any]]:
    """The rows whose values equal those of the filter options given (of ``names``)."""
    for name in names:
        value = getattr(args, name)
        if value:
            rows = [r for r in rows if r[name] == value]
    return rows


def run_rows(jobs: List[List[str]], stages: List[List[Dict[str, Any]]]) -> tuple[List[str], List[Dict[str, Any]]]:
    """The overrides every job of a sweep shares, and one row per job (``stages``: each job's stage rows): its
    number, the overrides that tell it apart, and how many of its stages are done, running, interrupted and
    missing (missing, stopped, invalid or damaged: the job would compute them)."""
    common = [o for o in jobs[0] if all(o in job for job in jobs[1:])]
    rows = []
    for i, (job, found) in enumerate(zip(jobs, stages)):
        counts = {state: sum(r["state"] == state for r in found) for state in STATES}
        rows.append({"job": str(i), "stages": str(len(found)), "done": str(counts["done"]),
                     "running": str(counts["running"]), "interrupted": str(counts["interrupted"]),
                     "missing": str(counts["missing"] + counts["stopped"] + counts["invalid"] + counts["damaged"]),
                     "overrides": " ".join(o for o in job if o not in common), "counts": counts})
    return common, rows


def _runs_line(rows: List[Dict[str, Any]]) -> str:
    complete = sum(r["counts"]["done"] == int(r["stages"]) for r in rows)
    untouched = sum(r["counts"]["done"] + r["counts"]["running"] + r["counts"]["interrupted"] == 0
                    and int(r["stages"]) > 0 for r in rows)
    started = len(rows) - complete - untouched
    return f"{len(rows)} runs: {complete} complete, {started} partly done, {untouched} not started"


def input_error(e: Exception, prog: str) -> int:
    """Print a subcommand's error over the user's input (ours: W2SGError; Hydra's compose errors: a bad override
    or option, already worded for users) and return the exit status 2."""
    if isinstance(e, W2SGError):
        print(f"w2sg: error: {e}", file=sys.stderr)
    else:
        print(f"{prog}: {type(e).__name__}: {e}", file=sys.stderr)
    return 2


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="w2sg status", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--multirun", action="store_true", help="expand the overrides as a sweep")
    parser.add_argument("--plan", action="store_true", help="show the stages of the run the overrides describe")
    parser.add_argument("--runs", action="store_true",
                        help="one line per run (job of the sweep with -m): its overrides and how many of its stages "
                             "are done, running, interrupted and missing")
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
    if args.runs and not (args.multirun or args.plan or args.overrides):
        parser.error("--runs lists the runs of a sweep: give its overrides, e.g. w2sg status -m --runs sweep=<name>")

    from w2sg.core.store import Store

    summaries = None
    try:
        if args.multirun or args.plan or args.overrides:
            jobs = expand_sweep(args.overrides) if args.multirun else [args.overrides]
            store = Store(compose(jobs[0]).store_dir)
            planned = [plan_rows(store, job) for job in jobs]
            rows, seen = [], set()
            for row in (row for found in planned for row in found):
                if row["key"] not in seen:  # stages shared by several jobs are listed once
                    seen.add(row["key"])
                    rows.append(row)
            columns = ["key", "kind", "role", "label", "task", "seed", "loss", "state"]
        else:
            store = Store(default_store_dir())
            summaries = list(store.stage_summaries())
            rows = list(stage_rows(store, summaries))
            columns = ["key", "kind", "role", "label", "task", "seed", "loss", "state", "metric", "age"]
    except Exception as e:
        return input_error(e, "w2sg status")
    if args.runs:
        common, runs = run_rows(jobs, [_filtered(found, args, FILTERS) for found in planned])
        runs = [r for r in runs if not args.state or r["counts"][args.state]]
        if common:
            print(f"overrides of every run: {' '.join(common)}")
        print(render(runs, ["job", "stages", "done", "running", "interrupted", "missing", "overrides"]))
        print(f"\n{_runs_line(runs)}  (store: {store.root})")
        return 0
    rows = _filtered(rows, args, FILTERS + ("state",))
    print(render(rows, columns))
    counts: Dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    print(f"\n{len(rows)} stages: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + f"  (store: {store.root})")
    print(store_size_line(store, summaries))
    return 0
