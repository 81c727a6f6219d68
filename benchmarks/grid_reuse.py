"""Stage reuse on a weak x strong grid: trainings executed vs the naive 3-per-pair count, cold and rerun.

Runs every weak < strong pair of the given models through the real `w2sg -m` entrypoint into a fresh store,
then runs the same commands again, and prints the counts and wall times as ratios.

    python benchmarks/grid_reuse.py             # MiniLM 1,2,3 layers x 2,3,6 layers, 200 examples, 1 epoch
    python benchmarks/grid_reuse.py --quick     # tiny random models (seconds; for CI)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def sweep(weak: str, strongs: list[str], settings: list[str], cwd: Path, env: dict) -> None:
    cmd = [sys.executable, "-m", "w2sg", "-m", f"weak={weak}", f"strong={','.join(strongs)}", *settings]
    subprocess.run(cmd, cwd=cwd, env=env, check=True, capture_output=True, text=True)


def trainings(cwd: Path) -> tuple[int, int]:
    """(trainings executed, runs) over every metrics.json under cwd/multirun."""
    runs = [json.loads(p.read_text()) for p in (cwd / "multirun").glob("**/metrics.json")]
    executed = sum(1 for m in runs for name, s in m["stages"].items() if name != "weak_labels" and not s["reused"])
    return executed, len(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny random models instead of MiniLM")
    args = ap.parse_args()
    if args.quick:
        weak, strong = ["tiny_random", "tiny_random_l2", "tiny_random_l3"], ["tiny_random_l2", "tiny_random_l3", "tiny_random_l4"]
        order = ["tiny_random", "tiny_random_l2", "tiny_random_l3", "tiny_random_l4"]
        settings = ["train.epochs=1", "task.n_train=64", "task.n_test=32"]
    else:
        weak, strong = ["minilm_l1", "minilm_l2", "minilm_l3"], ["minilm_l2", "minilm_l3", "minilm_l6"]
        order = ["minilm_l1", "minilm_l2", "minilm_l3", "minilm_l6"]
        settings = ["train.epochs=1", "task.n_train=200", "task.n_test=200"]
    settings.append("progress=false")
    plan = [(w, [s for s in strong if order.index(s) > order.index(w)]) for w in weak]
    pairs = sum(len(s) for _, s in plan)
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, W2SG_STORE=str(Path(tmp) / "store"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
        times = {}
        for phase in ("cold", "rerun"):
            cwd = Path(tmp) / phase
            cwd.mkdir()
            start = time.time()
            for w, ss in plan:
                sweep(w, ss, settings, cwd, env)
            times[phase] = time.time() - start
            executed, runs = trainings(cwd)
            assert runs == pairs, (runs, pairs)
            print(f"{phase:5s}: {runs} pairs, {executed} trainings executed "
                  f"(naive 3 per pair: {3 * pairs}; ratio {executed / (3 * pairs):.2f}), wall {times[phase]:.1f}s")
        distinct = len(set(weak) | set(strong))
        print(f"expected from cold: {distinct} distinct weak/ceiling models + {pairs} w2s = {distinct + pairs} "
              f"(N + M + pairs = {len(weak) + len(strong) + pairs}; a model that is both weak and strong trains once)")
        print(f"rerun / cold wall time: {times['rerun'] / times['cold']:.3f}")


if __name__ == "__main__":
    main()
