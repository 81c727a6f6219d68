"""The ``w2sg`` command, and the one place its subcommands are dispatched: a subcommand (status, report, gc, sync,
prefetch) starts without importing Hydra or OmegaConf, so ``w2sg status`` over a large store answers in well under a
second; anything else is a run or a sweep (w2sg.app.cli.main, which imports Hydra).
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {"status": "w2sg.app.status", "report": "w2sg.results.report", "gc": "w2sg.app.gc", "sync": "w2sg.app.sync",
               "prefetch": "w2sg.app.prefetch"}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in SUBCOMMANDS:
        sys.exit(importlib.import_module(SUBCOMMANDS[sys.argv[1]]).main(sys.argv[2:]))
    from w2sg.app.cli import main as run

    run()
