"""Paths in configs: ``pkg://<package>/<sub path>`` names files shipped inside an installed Python package.

Kept free of heavy imports (torch), so stage keys and ``w2sg status`` stay fast."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from w2sg.core.errors import W2SGError

PKG_SCHEME = "pkg://"


def resolve_path(spec: str) -> str:
    """Turn ``pkg://<package>[/<sub path>]`` into a directory inside that installed package.

    The package is located without importing it, so packages whose code is broken still serve their files.
    Any other value (hub id, local directory) is returned unchanged.
    """
    if not spec.startswith(PKG_SCHEME):
        return spec
    package, _, sub = spec[len(PKG_SCHEME) :].partition("/")
    found = importlib.util.find_spec(package)
    if found is None or found.origin is None:
        raise W2SGError(f"{spec!r}: Python package {package!r} is not installed (pip install {package.replace('_', '-')})")
    path = Path(found.origin).parent / sub
    if not path.exists():
        raise W2SGError(f"{spec!r}: {path} does not exist in the installed package {package!r}")
    return str(path)


def check_model_path(cfg: Any) -> None:
    """Fail early, with the path, when a model is neither a local directory nor (offline) a cached hub id."""
    if cfg.random_init is not None:
        return
    path = resolve_path(cfg.path)
    if Path(path).is_dir():
        return
    looks_local = path.startswith((".", "/", "~")) or path.count("/") > 1
    if looks_local:
        raise W2SGError(f"model {cfg.name!r}: path {path!r} does not exist")
    # A hub id: transformers raises its own error when it is neither cached nor reachable.
