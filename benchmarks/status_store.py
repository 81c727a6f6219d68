"""`w2sg status` (store view) over a large store: seconds, and the ratio to listing the store's folders alone.

Builds a synthetic store of N stages (default 10,000: trainings with realistic meta.json and metrics.json incl.
per-epoch history, and weak labels; written by Store.compute, as runs write them) in a temp dir, then times, best of --repeat runs each, in fresh processes:

- baseline: a Python process that lists stages/ and partial/ (interpreter start-up plus the listing);
- `w2sg status` on that store (each stage's DONE marker holds the summary the view prints);
- with --legacy also the same store as older versions wrote it (empty DONE markers: every stage's meta.json
  and metrics.json are read).

    python benchmarks/status_store.py                 # 10,000 stages
    python benchmarks/status_store.py --stages 2000 --legacy
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

TARGET_S = 1.0


def build(root: Path, n: int, legacy: bool) -> None:
    """n finished stages as Store.compute writes them (meta.json, metrics.json, the DONE marker, a lock file;
    legacy: an empty DONE marker, as older versions wrote it), plus one interrupted stage with a checkpoint.
    Written directly rather than through Store.compute, which takes ~10 times as long."""
    from w2sg.core.store import FORMAT, Store, done_marker

    store = Store(root)
    now = time.time()
    for i in range(n):
        key = f"{i:024x}"
        labels = i % 4 == 1
        kind, role = ("labels", "weak_labels") if labels else ("train", ("weak", "ceiling", "w2s")[i % 3])
        spec = {"model": {"path": "sentence-transformers/all-MiniLM-L6-v2", "num_layers": 1 + i % 6,
                          "pooling": "mean", "random_init": False},
                "task": {"dataset": "tweet_eval", "n_train": 2000, "n_test": 500}, "seed": i % 3}
        if not labels:
            spec.update(train={"epochs": 5, "lr": 5e-5, "batch_size": 32, "optimizer": "adamw"},
                        loss={"name": ("xent", "logconf", "product")[i % 3]})
        meta = {"kind": kind, "label": f"{role}:minilm_l{1 + i % 6}", "spec": spec, "inputs": {},
                "model_name": f"minilm_l{1 + i % 6}", "task_name": "tweet_sentiment", "format": FORMAT, "key": key,
                "created": now - i, "seconds": 12.5}
        metrics = {"acc": 0.5 + (i % 400) / 1000, "auroc": 0.6, "n_train": 1000, "n_test": 500,
                   "history": [{"epoch": e, "loss": 0.7 - e / 20, "train_acc": 0.6, "lr": 5e-5} for e in range(1, 6)],
                   "trained_params": 22_000_000, "params": 22_000_000, "resumed_from_step": 0}
        path = store.stage_path(key)
        path.mkdir()
        (path / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        (path / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        (path / "DONE").write_text("" if legacy else done_marker(path, meta, metrics))
        Path(store.lock(key).lock_file).touch()  # a computed stage leaves its (released) lock file
    store.checkpoint_path("f" * 24).write_bytes(b"0")


def best_of(cmd: list[str], env: dict, repeat: int) -> tuple[float, str]:
    times, out = [], ""
    for _ in range(repeat):
        start = time.perf_counter()
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
        times.append(time.perf_counter() - start)
    return min(times), out


def measure(root: Path, repeat: int) -> tuple[float, float, str]:
    env = dict(os.environ, W2SG_STORE=str(root))
    listing = "import os, sys; [os.listdir(os.path.join(sys.argv[1], d)) for d in ('stages', 'partial')]"
    base, _ = best_of([sys.executable, "-c", listing, str(root)], env, repeat)
    status, out = best_of([sys.executable, "-m", "w2sg", "status"], env, repeat)
    return base, status, out.strip().splitlines()[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--legacy", action="store_true", help="also time a store written with empty DONE markers")
    args = ap.parse_args()
    variants = [("summary in DONE", False)] + ([("legacy, empty DONE", True)] if args.legacy else [])
    with tempfile.TemporaryDirectory() as tmp:
        for name, legacy in variants:
            root = Path(tmp) / ("legacy" if legacy else "store")
            start = time.time()
            build(root, args.stages, legacy)
            built = time.time() - start
            base, status, last = measure(root, args.repeat)
            print(f"{name}: {args.stages} stages (built in {built:.1f}s) -> {last}")
            print(f"  baseline (list the folders): {base:.3f}s   w2sg status: {status:.3f}s   "
                  f"ratio {status / base:.1f}x   target under {TARGET_S:.1f}s: {'yes' if status < TARGET_S else 'NO'}")


if __name__ == "__main__":
    main()
