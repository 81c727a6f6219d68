"""Content fingerprints of local files and directories, so stage keys follow what a stage reads, not where.

A file's fingerprint is the SHA-256 of its bytes. Hashing a model's weights on every ``w2sg`` or
``w2sg status`` call would be slow, so each result is cached under ``<store>/fingerprints/`` by
(absolute path, size, mtime_ns, inode, ctime_ns). Size and mtime alone can survive an edit (``cp -p``,
``rsync -a`` and ``touch`` restore them), but a write always moves the change time (ctime), which no tool can set
back, and a replaced file has a new inode; so any rewrite is hashed again. One small JSON file per path, written
atomically, so concurrent processes never see a half-written entry. The cache is
an optimisation only: when it cannot be written (a read-only store) files are hashed without it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Tuple

from w2sg.core.paths import resolve_path

Ident = Tuple[str, int, int, int, int]  # (path, size, mtime_ns, inode, ctime_ns)
_MEMO: Dict[Ident, str] = {}  # ident -> sha256, for this process
_CHUNK = 1 << 20


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def file_fingerprint(path: str | os.PathLike, cache_dir: Optional[str | os.PathLike] = None) -> str:
    """SHA-256 of a file's bytes, cached by (absolute path, size, mtime_ns, inode, ctime_ns) in memory and under
    ``cache_dir``: ctime moves on every write and cannot be set back, so an edit that keeps size and mtime is seen."""
    p = Path(path).expanduser().resolve()
    st = p.stat()
    ident: Ident = (str(p), st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
    if ident in _MEMO:
        return _MEMO[ident]
    entry = Path(cache_dir).expanduser() / (hashlib.sha256(str(p).encode()).hexdigest()[:32] + ".json") \
        if cache_dir is not None else None
    digest = _read_cached(entry, ident)
    if digest is None:
        digest = _sha256(p)
        _write_cached(entry, ident, digest)
    _MEMO[ident] = digest
    return digest


_FIELDS = ("path", "size", "mtime_ns", "ino", "ctime_ns")


def _read_cached(entry: Optional[Path], ident: Ident) -> Optional[str]:
    if entry is None:
        return None
    try:
        cached = json.loads(entry.read_text())
    except (OSError, ValueError):
        return None
    if tuple(cached.get(f) for f in _FIELDS) == ident:  # entries of older versions (no ino/ctime) never match
        return cached.get("sha256")
    return None


def _write_cached(entry: Optional[Path], ident: Ident, digest: str) -> None:
    if entry is None:
        return
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f"{entry.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**dict(zip(_FIELDS, ident)), "sha256": digest}))
        os.replace(tmp, entry)
    except OSError:
        pass  # a read-only or missing store: hash again next time


def files_fingerprint(files: Iterable[Tuple[str, str | os.PathLike]], cache_dir: Optional[str | os.PathLike] = None
                      ) -> str:
    """One SHA-256 over (name, file fingerprint) pairs: a directory's content, independent of where it lies."""
    h = hashlib.sha256()
    for name, path in sorted(files, key=lambda item: item[0]):
        h.update(f"{name}\0{file_fingerprint(path, cache_dir)}\n".encode())
    return h.hexdigest()


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".h5", ".msgpack", ".ckpt", ".pt", ".pth", ".onnx", ".gguf")


def model_source(cfg: Any, cache_dir: Optional[str] = None) -> str:
    """What a model is built from, for stage keys: a content hash for a local directory, else the hub id.

    A local (or ``pkg://``) directory is keyed by the bytes of its files (weights, config, tokenizer; not
    hidden files or *.md), so changed weights get new keys and the same files at another path reuse stages.
    A randomly initialised model reads no weights, so only its other files count. Hub ids are keyed by name
    (the hub revision is whatever the local cache holds). A GGUF file (converted once, w2sg.core.paths) is keyed by
    its bytes, so a new package version under the same file name gets new keys."""
    path = Path(resolve_path(cfg.path)).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf" and cfg.random_init is None:
        return "sha256:" + files_fingerprint([(path.name, path)], cache_dir)
    if not path.is_dir():
        return str(cfg.path)
    files = [(f.name, f) for f in path.iterdir()
             if f.is_file() and not f.name.startswith(".") and not f.name.endswith(".md")
             and not (cfg.random_init is not None and f.name.endswith(WEIGHT_SUFFIXES))]
    return "sha256:" + files_fingerprint(files, cache_dir)


def data_fingerprints(cfg: Any, cache_dir: Optional[str] = None) -> Dict[str, str]:
    """{split: content hash} of the task's local data files (a file, a directory or a glob pattern; pkg:// too).

    Stage keys use these instead of the paths (see w2sg.core.graph.task_spec); URLs are kept as they are."""
    import glob

    from w2sg.core.errors import W2SGError

    out: Dict[str, str] = {}
    for split, spec in vars(cfg.data_files).items():
        if spec is None:
            continue
        path = resolve_path(str(spec))
        if "://" in path:
            out[split] = path
            continue
        p = Path(path).expanduser()
        if p.is_file():
            out[split] = "sha256:" + file_fingerprint(p, cache_dir)
            continue
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else \
            sorted(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
        if not files:
            raise W2SGError(f"task {cfg.name!r}: data file {path!r} (task.data_files.{split}) does not exist")
        out[split] = "sha256:" + files_fingerprint([(f"{i}:{f.name}", f) for i, f in enumerate(files)], cache_dir)
    return out
