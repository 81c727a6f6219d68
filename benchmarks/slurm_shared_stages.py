"""Shared stages under Slurm: store locks vs Slurm dependencies, wall time of the 2x2 tiny grid.

Runs `w2sg -m sweep=tiny_grid launcher=slurm_local` into a fresh store with
`hydra.launcher.shared_stages=lock` (every job submitted at once; a job needing a weak or ceiling model that
another job is training waits on its lock) and with `=dependency` (the 4 weak/ceiling stages as jobs first,
then the 4 w2s jobs with `afterok` dependencies), alternating which goes first (ABBA...), and prints the wall
time of each run, the trainings executed (each must be 2 weak + 2 ceiling + 4 w2s = 8, each stage once) and
the ratio dependency / lock. Needs the local Slurm (`sudo bash launchers/local-slurm/setup.sh`), idle.

    python benchmarks/slurm_shared_stages.py [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("lock", "dependency")


def trainings(cwd: Path) -> list[str]:
    """Keys of the trainings executed, from every metrics.json of the sweep (shared-stage jobs' too)."""
    runs = [json.loads(p.read_text()) for p in (cwd / "multirun").glob("**/metrics.json")]
    return [s["key"] for m in runs for name, s in m["stages"].items()
            if not name.endswith("labels") and not s["reused"]]


def slurm_states(output: str) -> dict[str, str]:
    ids = sorted(set(re.findall(r"Slurm job (\d+(?:_\d+)?)", output)))
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(ids)],
                         capture_output=True, text=True, check=True).stdout
    return dict(line.split("|") for line in out.strip().splitlines())


def run(variant: str, root: Path) -> tuple[float, int, int]:
    """One cold sweep: (wall seconds, trainings executed, Slurm jobs)."""
    cwd = root / variant
    cwd.mkdir()
    env = dict(os.environ, W2SG_STORE=str(cwd / "store"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               WANDB_MODE="disabled")
    cmd = [sys.executable, "-m", "w2sg", "-m", "sweep=tiny_grid", "launcher=slurm_local",
           f"hydra.launcher.shared_stages={variant}"]
    start = time.time()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.time() - start
    if proc.returncode != 0:
        sys.exit(f"{variant} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    keys = trainings(cwd)
    assert len(keys) == len(set(keys)) == 8, f"{variant}: trainings {keys} (want 8 distinct: each stage once)"
    states = slurm_states(proc.stdout + proc.stderr)
    assert set(states.values()) == {"COMPLETED"}, states
    return wall, len(keys), len(states)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2, help="runs of each variant (at least 2)")
    args = ap.parse_args()
    busy = subprocess.run(["squeue", "-h"], capture_output=True, text=True, check=True).stdout.strip()
    if busy:
        print(f"warning: the Slurm queue is not empty; timings include waiting for:\n{busy}", file=sys.stderr)
    walls: dict[str, list[float]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            (Path(tmp) / f"r{r}").mkdir()
            for variant in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):  # ABBA: drift hits both alike
                load = os.getloadavg()[0]
                wall, n, jobs = run(variant, Path(tmp) / f"r{r}")
                walls[variant].append(wall)
                print(f"repeat {r + 1}  {variant:10s}  wall {wall:6.1f}s  trainings {n}  Slurm jobs {jobs}  "
                      f"(load average before: {load:.2f})", flush=True)
    for v in VARIANTS:
        print(f"{v:10s}  median {statistics.median(walls[v]):6.1f}s  runs: "
              + ", ".join(f"{w:.1f}" for w in walls[v]))
    ratio = statistics.median(walls["dependency"]) / statistics.median(walls["lock"])
    print(f"dependency / lock wall time (medians): {ratio:.2f}  -> faster: {'dependency' if ratio < 1 else 'lock'}")


if __name__ == "__main__":
    main()
