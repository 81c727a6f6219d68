"""Small jobs packed: Slurm jobs and wall time of the 2x2 tiny grid with k experiments per Slurm job.

Runs `w2sg -m sweep=tiny_grid launcher=slurm_local hydra.launcher.experiments_per_job=k` into a fresh store for
each k (1: one job per experiment, one CPU each; k > 1: a pack of k experiments per job, each in its own process,
sharing the job's `--cpus` CPUs), and prints per k the Slurm jobs submitted, the wall time, the trainings executed
(each stage once: 2 weak + 2 ceiling + 4 w2s = 8) and the wall time against k = 1 measured in the same run. No
assertions on the times. Needs the local Slurm (`sudo bash launchers/local-slurm/setup.sh`), idle.

    python benchmarks/slurm_packing.py [--ks 1,2,4] [--cpus 2] [--repeats 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from slurm_shared_stages import slurm_states, trainings  # the shared-stages benchmark's readers of a sweep


def run(k: int, cpus: int, root: Path) -> tuple[float, int, int]:
    """One cold sweep with k experiments per job: (wall seconds, trainings executed, Slurm jobs)."""
    (root / f"k{k}").mkdir()
    overrides = [f"hydra.launcher.experiments_per_job={k}", f"hydra.launcher.cpus_per_task={1 if k == 1 else cpus}"]
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "w2sg", "-m", "sweep=tiny_grid", "launcher=slurm_local", *overrides],
                          cwd=root / f"k{k}", capture_output=True, text=True,
                          env=dict(os.environ, W2SG_STORE=str(root / f"k{k}" / "store"), HF_HUB_OFFLINE="1",
                                   HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled"))
    wall = time.time() - started
    if proc.returncode:
        sys.exit(f"k={k} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    keys, states = trainings(root / f"k{k}"), slurm_states(proc.stdout + proc.stderr)
    assert len(keys) == len(set(keys)) == 8 and set(states.values()) == {"COMPLETED"}, (k, keys, states)
    return wall, len(keys), len(states)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ks", default="1,2,4", help="experiments per job to compare (1 is the baseline)")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs per packed job (k = 1: one per job)")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each k (alternating the order)")
    args = ap.parse_args()
    ks = sorted({1, *(int(k) for k in args.ks.split(","))})
    busy = subprocess.run(["squeue", "-h"], capture_output=True, text=True, check=True).stdout.strip()
    if busy:
        print(f"warning: the Slurm queue is not empty; timings include waiting for:\n{busy}", file=sys.stderr)
    walls: dict[int, list[float]] = {k: [] for k in ks}
    jobs: dict[int, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            (Path(tmp) / f"r{r}").mkdir()
            for k in (ks if r % 2 == 0 else ks[::-1]):  # ABBA: drift hits every k alike
                load = os.getloadavg()[0]
                wall, n, jobs[k] = run(k, args.cpus, Path(tmp) / f"r{r}")
                walls[k].append(wall)
                print(f"repeat {r + 1}  k={k}  wall {wall:6.1f}s  trainings {n}  Slurm jobs {jobs[k]}  "
                      f"(load average before: {load:.2f})", flush=True)
    base = statistics.median(walls[1])
    for k in ks:
        wall = statistics.median(walls[k])
        print(f"k={k}  Slurm jobs {jobs[k]}  median wall {wall:6.1f}s  vs k=1: {wall / base:.2f}  runs: "
              + ", ".join(f"{w:.1f}" for w in walls[k]))


if __name__ == "__main__":
    main()
