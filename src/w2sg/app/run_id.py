"""A per-process id for run and sweep folders: ``${w2sg.run_id:}`` in ``hydra.run.dir`` / ``hydra.sweep.dir``.

Two runs started in the same second would otherwise share ``outputs/<date>/<time>/`` and overwrite each other's
metrics.json. The id is drawn once per process; Hydra caches the resolved value with the config, so a sweep's
jobs (in this process, or unpickled in a Slurm job) all see the sweep folder their launcher created.

``register`` runs where a config is composed: when Hydra imports its plugins (hydra_plugins.w2sg_launcher, before
any composition, and in a Slurm job unpickling its launcher) and in w2sg.app.config.compose; not on importing
``w2sg``, which stays free of OmegaConf so that ``w2sg status`` starts fast.
"""

from __future__ import annotations

import secrets
from typing import Optional

_ID: Optional[str] = None


def run_id() -> str:
    """Six random hex digits, the same for the whole process."""
    global _ID
    if _ID is None:
        _ID = secrets.token_hex(3)
    return _ID


def register() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("w2sg.run_id"):
        OmegaConf.register_new_resolver("w2sg.run_id", run_id, use_cache=True)
