"""Submission time of a large sweep on the local Slurm: how long until the first job reaches Slurm, and in all.

Runs `w2sg -m experiment=smoke 'seed=range(0,N)' launcher=slurm_local hydra.launcher.wait=false logger=none`
(N = 1000; --quick: 100) against
  - an empty store (nothing to plan against: every job is submitted), and
  - a store that holds stages (each job is planned: its stage keys computed to see whether all are stored),
then cancels the submitted jobs (by their Slurm ids) so that none runs. It prints the seconds before the first
submission (from the launcher's "Submitting ..." log line) and the total, checks that the array carries
`hydra.launcher.array_parallelism` (Slurm's ArrayTaskThrottle) and that no empty report was written, and, as a
baseline measured in the same run, the time of `sbatch --array=0-(N-1)%4 --hold --wrap true` (Slurm's own cost
of one array of that size). Needs the local Slurm: `sudo bash launchers/local-slurm/setup.sh`.

    python benchmarks/sweep_submit.py [--quick] [--jobs N]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]")


def stamp(line: str) -> float:
    return datetime.strptime(STAMP.match(line).group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def cancel(ids: set) -> None:
    if ids:
        subprocess.run(["scancel", *sorted(ids)], check=False)


def seed_store(store: Path) -> None:
    """A store holding one finished stage, so that the launcher plans every job against it."""
    from w2sg.core.store import Store

    Store(store).compute("0" * 24, {"kind": "train", "label": "unrelated"}, lambda out: out.write_json("metrics.json", {}))


def submit(n: int, root: Path, store: str) -> dict:
    cwd = root / store
    cwd.mkdir()
    if store == "stored":
        seed_store(cwd / "store")
    env = dict(os.environ, W2SG_STORE=str(cwd / "store"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               WANDB_MODE="disabled")
    cmd = [sys.executable, "-m", "w2sg", "-m", "experiment=smoke", f"seed=range(0,{n})", "launcher=slurm_local",
           "hydra.launcher.wait=false", "logger=none", f"hydra.sweep.dir={cwd / 'sweep'}"]
    start = time.time()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    total = time.time() - start
    out = proc.stdout + proc.stderr
    arrays = set(re.findall(r"Slurm job (\d+)_\d+", out))
    try:
        if proc.returncode != 0:
            sys.exit(f"{store}: w2sg failed ({proc.returncode}):\n{out[-4000:]}")
        first = next(stamp(ln) for ln in out.splitlines() if "Submitting" in ln and STAMP.match(ln))
        jobs = len(re.findall(r"Slurm job \d+_\d+", out))
        assert jobs == n, f"{store}: {jobs} of {n} jobs submitted"
        shown = subprocess.run(["scontrol", "show", "job", sorted(arrays)[0]], capture_output=True, text=True).stdout
        throttle = re.search(r"ArrayTaskThrottle=(\d+)", shown)
        reports = [p.name for p in (cwd / "sweep").glob("*.csv")]
        assert not reports, f"{store}: reports written although nothing ran: {reports}"
        return {"store": store, "jobs": jobs, "before_first": first - start, "total": total,
                "throttle": throttle.group(1) if throttle else "?"}
    finally:
        cancel(arrays)


def baseline(n: int) -> float:
    start = time.time()
    out = subprocess.run(["sbatch", "--parsable", f"--array=0-{n - 1}%4", "--hold", "--partition=debug",
                          "--wrap", "true"], capture_output=True, text=True, check=True).stdout
    seconds = time.time() - start
    cancel({out.strip().split(";")[0]})
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--quick", action="store_true", help="100 jobs")
    args = ap.parse_args()
    n = 100 if args.quick else args.jobs
    if shutil.which("sbatch") is None:
        sys.exit("no sbatch on PATH: start the local Slurm first (sudo bash launchers/local-slurm/setup.sh)")
    root = Path(tempfile.mkdtemp(prefix="w2sg-submit-"))
    print(f"sbatch of one {n}-task array (baseline): {baseline(n):.2f} s")
    for store in ("empty", "stored"):
        r = submit(n, root, store)
        print(f"{r['store']:>6} store: {r['jobs']} jobs, {r['before_first']:.1f} s before the first submission, "
              f"{r['total']:.1f} s in all (array throttle {r['throttle']})")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
