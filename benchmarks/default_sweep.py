"""What researchers wait for: one default run, the 5-seed default sweep, and a probe grid, each on a fresh store.

Runs the real ``w2sg`` entrypoint (a subprocess each, as a user types it, W&B offline) and prints:
  - one default run (``w2sg``) and ``w2sg -m seed=0,1,2,3,4``, each on a fresh store, with their ratio
    (target: the sweep at most 2x one run, and under 2 minutes on the 2-core machine);
  - a probe grid of 2 weak x 2 strong models x 3 seeds on a fresh store: how many texts each model's encoder
    encoded, against the distinct texts of the pool (target: each model's texts encoded once);
  - the time a probe head takes to fit (the fastest of the grid's heads, read from the stored stages).

    python benchmarks/default_sweep.py            # the default's sizes (7,000 texts); about 6 minutes here
    python benchmarks/default_sweep.py --quick    # 700 texts (task.n_train=400 task.n_test=300)
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


def w2sg(args: list, cwd: Path, store: Path) -> float:
    """Wall seconds of one ``python -m w2sg`` call into ``store``."""
    env = dict(os.environ, W2SG_STORE=str(store), WANDB_MODE="offline", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "w2sg", *args, "progress=false"], cwd=cwd, env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"w2sg {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def stages(store: Path, kind: str) -> list:
    return [(p.parent, json.loads(p.read_text())) for p in (store / "stages").glob("*/meta.json")
            if json.loads(p.read_text())["kind"] == kind]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="700 texts instead of the default's 7,000")
    args = ap.parse_args()
    sizes = ["task.n_train=400", "task.n_test=300"] if args.quick else []
    with tempfile.TemporaryDirectory(prefix="w2sg-bench-") as tmp:
        root = Path(tmp)
        one = w2sg(sizes, root, root / "one")
        five = w2sg(["-m", "seed=0,1,2,3,4", *sizes], root, root / "five")
        print(f"default   one run {one:6.1f} s   5 seeds {five:6.1f} s   ratio {five / one:.2f}x "
              f"(target <= 2x, and the 5 seeds under 120 s)")

        from w2sg.core.store import Store

        grid = root / "grid"
        w2sg(["-m", "weak=minilm_l1,minilm_l2", "strong=minilm_l3,minilm_l6", "seed=0,1,2", "logger=none", *sizes],
             root, grid)
        store = Store(grid)
        encoders = stages(grid, "features")
        pool = json.loads(next(iter(sorted((root / "multirun").glob("**/metrics.json")))).read_text())
        sizes_used = pool["task_sizes"]
        lines = []
        for path, meta in sorted(encoders, key=lambda e: e[1]["model_name"]):
            bank = store.feature_bank(meta["key"])
            chunks = len(list(bank.path.glob("*.npz")))
            lines.append(f"{meta['model_name']} {len(bank)} texts in {chunks} encoding pass{'es' * (chunks != 1)}")
        print(f"grid      2 weak x 2 strong x 3 seeds ({sizes_used['n_train'] + sizes_used['n_test']} examples a "
              f"seed, one pool): " + "; ".join(lines) + " (target: one pass per model)")
        heads = [json.loads((p / "meta.json").read_text())["seconds"] for p, m in stages(grid, "train")]
        print(f"heads     {len(heads)} probe heads fitted (with their test predictions): fastest {min(heads):.2f} s, "
              f"median {sorted(heads)[len(heads) // 2]:.2f} s (target < 1 s)")


if __name__ == "__main__":
    main()
