"""``w2sg gc``: free the stored weights no stage still needs, and say how many bytes that frees.

    w2sg gc [--dry-run] [--store DIR]

It also removes the temporary files that processes stopped while writing left behind (a stage being written, a
checkpoint being saved: killed, or out of disk space), once no process holds their stage's lock.

A trained model's weights are needed until every stage that reads them is stored: a weak model's weights
are read by its labels stage, a chain link's by the next link's labels. Once that stage is stored (and no process
is computing another reader), the weights are freed; the stage keeps its metrics and predictions, so results,
reports and reruns are unchanged, and a later stage that needs the weights trains it again (same seed, checked
against the stored predictions). Weights nothing has read yet (ceiling and w2s models, which a later run may use
as teachers) and generatively finetuned backbones are kept. ``store.keep_weights`` applies the same rule after
every run (``needed``, the default).
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="w2sg gc", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="list what would be freed, free nothing")
    parser.add_argument("--store", help="the store (default: W2SG_STORE / store_dir of the config)")
    args = parser.parse_args(argv)

    from w2sg.app.config import default_store_dir
    from w2sg.core.errors import W2SGError
    from w2sg.core.store import Store, human_bytes

    try:
        store = Store(args.store or default_store_dir())
    except W2SGError as e:
        print(f"w2sg: error: {e}", file=sys.stderr)
        return 2
    before = store.sizes()
    left = store.leftovers()  # first: on a full disk they may be what fills it
    if args.dry_run:
        removed, removed_bytes = len(left), sum(n for _, n in left)
    else:
        removed, removed_bytes = store.remove_leftovers()
    if removed:
        print(f"{'would remove' if args.dry_run else 'removed'} {removed} temporary files of stopped runs "
              f"({human_bytes(removed_bytes)})")
    freed = count = 0
    for key, label, size in store.collectable():
        done = size if args.dry_run else store.free_weights(key, "w2sg gc")
        if done:
            print(f"{'would free' if args.dry_run else 'freed'} {human_bytes(done):>9}  {key[:12]}  {label}")
            freed, count = freed + done, count + 1
    verb = "would free" if args.dry_run else "freed"
    print(f"{verb} {human_bytes(freed)} ({freed} bytes) of weights of {count} stages; store {store.root}: "
          f"{human_bytes(before['total'] - (0 if args.dry_run else freed + removed_bytes))} in all, "
          f"{human_bytes(before['weights'] - (0 if args.dry_run else freed))} of weights")
    return 0
