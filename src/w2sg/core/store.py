"""Content-addressed stage store shared by every run and sweep.

Layout under ``store_dir``::

    stages/<key>/      a finished stage: meta.json, metrics.json, arrays (.npy), weights, DONE; a train stage's
                       weights are model.safetensors (full finetune, in the compute dtype; probe: the head) or
                       adapter.safetensors (LoRA: the adapters and the head, rebuilt on the base model to load)
    tmp/               stages being written (renamed into stages/ when complete)
    partial/<key>/     stage.json (what is being computed, since when, by whom) and training checkpoints of
                       unfinished stages (a rerun resumes from them)
    locks/<key>.lock   held while a process computes that stage
    damaged/           stages, checkpoints and feature chunks that could not be read, set aside (moved, never
                       deleted) so that what they held is computed again; delete them once looked at
    experiments/<id>.json  each finished experiment's metrics.json (its stage keys by name): reports of a store
                       read these, so they pair stages as the experiments did
    fingerprints/      content hashes of local data and model files, by path, size, mtime, inode and ctime
    features/<encoder>/  probe features by text content (FeatureBank): chunks of (text hashes, feature rows) for
                       one encoder (a features stage's key: model, pooling, max_length, precision, init weights);
                       every seed, size and task reads its texts' rows here and encodes only texts not yet in it

A stage is written into tmp/ and renamed into place in one step after its DONE marker is written, so a
half-written stage is never taken as finished. The DONE marker holds a one-line summary of the stage (kind,
role, side, label, model, task, seed, loss, accuracy, time) and its size on disk (recorded again when its weights are freed
or restored), so ``w2sg status`` lists a large store by reading it alone. The marker records every file of the
stage with its size, and a CRC-32 of the small ones that are not weights; reuse checks them (``status``), so an
emptied, truncated or deleted file is found before anything reads it: the stage is reported as damaged, set aside
into damaged/ and computed again. ``Store`` is the one reader of this
layout: listings go through ``stage_summaries``, ``unfinished`` and ``sizes``, trainers through ``checkpoint_path``.
Weights are the bulk of a store. ``store.keep_weights`` (needed | all | none) frees a trained model's weights
once no stage needs them (a weak model's, once its labels are stored); ``w2sg gc`` does the same for the whole
store. A stage whose weights were freed keeps its metrics and predictions and a ``weights_freed.json`` note; a
later stage that needs the weights trains it again (w2sg.run.context.StageContext.restore_weights) and checks the
predictions match.

A stage is computed under its lock, locks/<key>.lock (w2sg.core.locks), so a second process needing the same
stage, on this node or another sharing the store, waits, then finds it done and reuses it; ``w2sg status`` shows a
stage whose lock is held as running. The lock needs no flock (Lustre and NFS often share none across nodes): its
file is created with O_EXCL and names its holder (host, pid, token) and a heartbeat the holder rewrites every few
seconds; a holder whose process is gone (same host) or whose heartbeat stood still for W2SG_LOCK_STALE_SECONDS
(default 60; judged by the waiter's own clock, not by comparing clocks) is taken over. What the store's
filesystem must give for this: atomic O_EXCL create and rename (local disks, NFSv3+, Lustre, GPFS), hard links
(to put back a lock file moved aside to check it), and a lock file's rewritten content visible to other nodes
within that timeout; ``w2sg status`` and ``w2sg gc`` judge another node's heartbeat against the local clock, so
for them the nodes' clocks should agree within the timeout.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

FORMAT = 1  # bump when the stored layout changes; older stages are then reported and recomputed
WEIGHT_FILES = ("model.safetensors", "adapter.safetensors")  # a train stage's trained weights
BACKBONE_FILE = "backbone.safetensors"  # an lm stage's generatively finetuned backbone (never freed)
FREED = "weights_freed.json"  # in a stage whose weights were freed: which files, how many bytes, when, why
KEEP_WEIGHTS = ("needed", "all", "none")  # store.keep_weights
CHECKPOINT = "checkpoint.pt"  # in partial/<key>/: the training checkpoint of an unfinished stage


@dataclass
class StageDir:
    """Read/write access to one stage's files."""

    path: Path

    def write_json(self, name: str, obj: Any) -> None:
        """Strict JSON: NaN and infinities (e.g. an AUROC of one class) are written as null."""
        text = json.dumps(_finite(obj), indent=2, sort_keys=True, default=_json_default, allow_nan=False)
        (self.path / name).write_text(text)

    def read_json(self, name: str) -> Any:
        try:
            return json.loads((self.path / name).read_text())
        except (OSError, ValueError) as e:
            raise self.damaged(name, e) from None

    def write_array(self, name: str, arr: Any) -> None:
        import numpy as np

        np.save(self.path / f"{name}.npy", np.asarray(arr))

    def read_array(self, name: str) -> Any:
        import numpy as np

        try:
            return np.load(self.path / f"{name}.npy")
        except (OSError, ValueError, EOFError) as e:
            raise self.damaged(f"{name}.npy", e) from None

    def damaged(self, name: str, error: BaseException) -> Exception:
        """The error for a file of this stage that cannot be read: a stored stage is set aside (damaged/), so a
        rerun computes it again; the message names the stage, the file and what to do."""
        from w2sg.core.errors import W2SGError

        where = f"{self.path / name}"
        if self.path.parent.name != "stages":  # a stage being written (tmp/): nothing stored to set aside
            return W2SGError(f"stage file {where} cannot be read ({type(error).__name__}: {error})")
        moved = set_aside(self.path)
        return W2SGError(f"stored stage {self.path.name} is damaged: {where} cannot be read ({type(error).__name__}: "
                         f"{error}); the stage was set aside in {moved} and is computed again by a rerun of the "
                         "same command")

    def file(self, name: str) -> Path:
        return self.path / name


def _finite(o: Any) -> Any:
    """``o`` with every non-finite float (Python or numpy) replaced by None, in nested dicts, lists and tuples."""
    import numpy as np  # here, not at the top: ``w2sg status`` reads the store without numpy

    if isinstance(o, (float, np.floating)):
        return float(o) if np.isfinite(float(o)) else None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def _json_default(o: Any) -> Any:
    import numpy as np  # here, not at the top: ``w2sg status`` reads the store without numpy

    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def summary(meta: Dict[str, Any], metrics: Dict[str, Any]) -> Dict[str, Any]:
    """What listings show of a stage (the DONE marker's content): its kind, label, model, task, seed, loss
    (training stages), headline accuracy and creation time."""
    spec = meta.get("spec") or {}
    loss = spec.get("loss")
    acc = metrics.get("acc")
    return {"format": FORMAT, "key": meta.get("key"), "kind": meta.get("kind"), "role": meta.get("role"),
            "side": meta.get("side"), "label": meta.get("label"),
            "model": meta.get("model_name"), "task": meta.get("task_name"), "seed": spec.get("seed"),
            "loss": loss.get("name") if isinstance(loss, dict) else None,
            "acc": acc if isinstance(acc, (int, float)) and math.isfinite(acc) else None,
            "created": meta.get("created")}


@dataclass(frozen=True)
class Unfinished:
    """A stage with a partial marker that is not stored (Store.unfinished): being computed or stopped."""

    key: str
    marker: Optional[Dict[str, Any]]  # partial/<key>/stage.json: summary, host, pid, inputs (None: unreadable)
    running: bool  # a process holds its lock
    checkpoint: Optional[float]  # modification time of its training checkpoint, None without one

    @property
    def started(self) -> Optional[float]:
        """When its computation started (the marker's time, else its checkpoint's)."""
        created = (self.marker or {}).get("created")
        return created if isinstance(created, (int, float)) else self.checkpoint


def _read_json(path: str) -> Tuple[Any, int]:
    """(content, bytes) of a small JSON file; content None when it is missing, unreadable or not JSON. Read with
    os.read: a listing reads one such file per stage, and io.open costs more."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None, 0
    try:
        chunks = [os.read(fd, 1 << 16)]
        while len(chunks[-1]) == 1 << 16:  # a regular file reads short only at its end
            chunks.append(os.read(fd, 1 << 16))
    except OSError:
        return None, 0
    finally:
        os.close(fd)
    raw = b"".join(chunks)
    try:
        return json.loads(raw.decode()), len(raw)
    except ValueError:  # incl. UnicodeDecodeError
        return None, len(raw)


def _tree_bytes(path: str) -> int:
    """Bytes of the files under ``path`` (a file or a folder, walked), skipping what is removed meanwhile."""
    total = 0
    try:
        if not os.path.isdir(path):
            return os.stat(path).st_size
        with os.scandir(path) as entries:
            for entry in entries:
                total += _tree_bytes(entry.path) if entry.is_dir(follow_symlinks=False) else \
                    entry.stat(follow_symlinks=False).st_size
    except OSError:
        pass  # removed while walking
    return total


CHECKSUM_MAX = 16 << 20  # files up to this size (but weights) get a CRC-32 in the DONE marker: cheap to verify


def _crc32(path: str) -> int:
    import zlib

    crc = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            crc = zlib.crc32(chunk, crc)
    return crc


def _stage_sizes(path: str | os.PathLike, records: bool = False) -> Dict[str, Any]:
    """The sizes a DONE marker records of its stage's folder: bytes of its files but the marker, the part that is
    weights, and whether its weights were freed; with ``records``, also ``files``: each file's path in the
    folder -> [bytes, CRC-32 (small files but weights) or None], which reuse verifies (Store.status)."""
    total = weights = 0
    freed = False
    files: Dict[str, List[Any]] = {}
    try:
        with os.scandir(path) as entries:
            for entry in entries:
                if entry.name == "DONE":
                    continue
                size = _tree_bytes(entry.path)
                total += size
                weight = entry.name in WEIGHT_FILES or entry.name == BACKBONE_FILE
                weights += size if weight else 0
                freed = freed or entry.name == FREED
                if records and entry.is_file(follow_symlinks=False):
                    files[entry.name] = [size, None if weight or size > CHECKSUM_MAX else _crc32(entry.path)]
                elif records:  # a folder (none is written today): its files by relative path, sizes only
                    for root, _dirs, names in os.walk(entry.path):
                        for name in names:
                            full = os.path.join(root, name)
                            files[os.path.relpath(full, path)] = [os.stat(full).st_size, None]
    except OSError:
        pass  # removed meanwhile (an invalid stage being recomputed)
    return {"bytes": total, "weight_bytes": weights, "freed": freed, **({"files": files} if records else {})}


def _verify_files(path: str, files: Any, checksums: bool) -> Optional[str]:
    """What is wrong with a stored stage's files against its marker's records (None: nothing; sizes always,
    CRC-32s with ``checksums``)."""
    if not isinstance(files, dict):
        return None  # stored before files were recorded: nothing to check against
    for name, record in files.items():
        full = os.path.join(path, name)
        try:
            size = os.stat(full).st_size
        except FileNotFoundError:
            return f"{name} is missing"
        except OSError as e:
            return f"{name} cannot be read ({e.strerror})"
        if size != record[0]:
            return f"{name} has {size} bytes, {record[0]} when stored"
        if checksums and record[1] is not None:
            try:
                if _crc32(full) != record[1]:
                    return f"{name} has changed since it was stored (CRC-32 differs)"
            except OSError as e:
                return f"{name} cannot be read ({e.strerror})"
    return None


def set_aside(path: str | os.PathLike) -> Path:
    """Move a damaged stage folder, checkpoint or feature chunk of a store into ``<store>/damaged/`` (a new name:
    nothing there is replaced) and return where it went. Found by the store folder above ``path`` (the parent of
    stages/, partial/ or features/); elsewhere it is renamed beside itself."""
    path = Path(path)
    root = next((p.parent for p in path.parents if p.name in ("stages", "partial", "features")), None)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"{path.name}.{stamp}.{uuid.uuid4().hex[:6]}"
    if root is None:
        target = path.with_name(f"{path.name}.damaged-{stamp}")
    else:
        target = root / "damaged" / (name if path.parent.name in ("stages",) else f"{path.parent.name}-{name}")
        target.parent.mkdir(exist_ok=True)
    os.replace(path, target)
    return target


def disk_full(error: BaseException, folder: str | os.PathLike, needed: Optional[int] = None) -> Optional[Exception]:
    """The error to raise instead of ``error`` when it was a write that ran out of disk space in ``folder`` (an
    OSError ENOSPC or EDQUOT, or a library's OSError or RuntimeError while the filesystem has less than ``needed``
    bytes, or 1 MiB, free: torch.save says "enforce fail at inline_container.cc", numpy "requested and ... written",
    safetensors "IoError"); None when it was something else. Call it before removing what the failed write left
    (the free space then is what the write met). The message names the folder, what is free and what is needed,
    and the ways out."""
    import errno

    from w2sg.core.errors import W2SGError

    folder = Path(folder)
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        free = None
    codes = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
    text = str(error)
    nearly_none = free is not None and free < max(needed or 0, 1 << 20)  # a write error with (almost) no room
    full = (isinstance(error, OSError) and error.errno in codes) or "No space left" in text or \
        "code: 28" in text or (isinstance(error, (OSError, RuntimeError)) and nearly_none)
    if not full:
        return None
    need = f", about {human_bytes(needed)} ({needed} bytes) needed" if needed else ""
    have = f"{human_bytes(free)} free" if free is not None else "free space unknown"
    return W2SGError(f"out of disk space writing into {folder} ({have}{need}); free space there (w2sg gc frees "
                     "stored weights no stage needs and temporary files of stopped runs) or point W2SG_STORE at a "
                     f"larger disk, then rerun the same command (the original error: {type(error).__name__}: "
                     f"{text[:200]})")


def _umask() -> int:
    """The process's umask, read without changing it where the OS tells it (Linux /proc), else set and restored."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: str | os.PathLike) -> None:
    """Give every file and folder under ``path`` (and ``path``) the mode an ordinary ``open``/``mkdir`` gives it
    under the umask. Some writers create private files (safetensors writes 0600) or folders (mkdtemp: 0700), so a
    store shared by a group could not read them."""
    mask = _umask()

    def file_mode(f: str) -> None:
        if not os.path.islink(f):
            os.chmod(f, (0o666 | (os.stat(f).st_mode & 0o111)) & ~mask)

    if not os.path.isdir(path):
        file_mode(os.fspath(path))
        return
    for root, _dirs, files in os.walk(path):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            file_mode(os.path.join(root, name))


def done_marker(path: str | os.PathLike, meta: Dict[str, Any], metrics: Dict[str, Any]) -> str:
    """The DONE marker Store.compute writes into the stage written at ``path``, once its other files are: the
    stage's summary, its sizes (Store.stage_summaries reads them) and its files' records (Store.status checks
    them)."""
    return json.dumps({**summary(meta, metrics), **_stage_sizes(path, records=True)}, default=_json_default)


class _Held:
    """A lock already acquired, released on leaving the ``with`` block."""

    def __init__(self, lock: Any):
        self.lock = lock

    def __enter__(self) -> Any:
        return self.lock

    def __exit__(self, *exc: Any) -> None:
        self.lock.release()


class Store:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser()
        try:
            for sub in ("stages", "tmp", "locks", "partial"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise self._unwritable(e) from None

    def _unwritable(self, e: OSError) -> Exception:
        from w2sg.core.errors import W2SGError

        return W2SGError(
            f"store {str(self.root)!r} cannot be created or written ({e.strerror or type(e).__name__}: "
            f"{e.filename or self.root}); point W2SG_STORE (or store_dir=) at a writable directory, "
            "e.g. W2SG_STORE=$HOME/.cache/w2sg/store")

    def scratch_dir(self, key: str, why: str) -> Path:
        """A new folder in tmp/ for work on a stage that is not its computation (e.g. retraining freed weights)."""
        path = self.root / "tmp" / f"{key}.{why}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        path.mkdir(parents=True)
        return path

    def check_writable(self) -> None:
        """Fail before any stage runs, naming the store and the way out, when stages cannot be written into it."""
        probe = self.root / "tmp" / f".write-test.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        try:
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise self._unwritable(e) from None

    def stage_path(self, key: str) -> Path:
        return self.root / "stages" / key

    def partial_dir(self, key: str) -> Path:
        path = self.root / "partial" / key
        path.mkdir(parents=True, exist_ok=True)
        return path

    def has_partial(self, key: str) -> bool:
        return (self.root / "partial" / key / CHECKPOINT).exists()

    def status(self, key: str) -> str:
        """'done', 'missing', 'invalid: <reason>' for a stage written by another format or without its marker, or
        'damaged: <reason>' for one whose files differ from what its marker records (sizes, CRC-32s) or whose
        metrics cannot be read."""
        path = self.stage_path(key)
        if not path.exists():
            return "missing"
        if not (path / "DONE").exists():
            return "invalid: no completion marker"
        try:
            meta = json.loads((path / "meta.json").read_text())
        except (OSError, ValueError) as e:
            return f"invalid: unreadable meta.json ({e})"
        if meta.get("format") != FORMAT:
            return f"invalid: stored with format {meta.get('format')}, this version reads format {FORMAT}"
        try:
            json.loads((path / "metrics.json").read_text())
        except (OSError, ValueError) as e:
            return f"damaged: unreadable metrics.json ({e})"
        marker, _ = _read_json(str(path / "DONE"))
        wrong = _verify_files(str(path), marker.get("files"), checksums=True) if isinstance(marker, dict) else None
        return f"damaged: {wrong}" if wrong else "done"

    def get(self, key: str) -> Optional[StageDir]:
        return StageDir(self.stage_path(key)) if self.status(key) == "done" else None

    def lock(self, key: str):
        """The lock of a stage (or of ``features-<encoder>``): a w2sg.core.locks.StoreLock, used as filelock's
        (``with``, ``acquire(timeout=...)`` raising ``filelock.Timeout``, ``release()``, ``lock_file``); it holds
        across the nodes sharing the store, and the thread holding it may take it again."""
        from w2sg.core.locks import StoreLock

        return StoreLock(self.root / "locks" / f"{key}.lock")

    def is_running(self, key: str) -> bool:
        """Whether a live process holds the stage's lock, i.e. is computing it now (any host sharing the store),
        read from its lock file (holder and heartbeat), never by taking the lock."""
        from w2sg.core.locks import is_held

        return is_held(self.root / "locks" / f"{key}.lock")

    def _mark_running(self, key: str, meta: Dict[str, Any]) -> None:
        """partial/<key>/stage.json: what the lock holder computes, so listings can name a running stage."""
        marker = {**summary({**meta, "key": key, "created": time.time()}, {}), "host": socket.gethostname(),
                  "pid": os.getpid(), "inputs": meta.get("inputs") or {}}  # inputs: whose weights it may read
        path = self.partial_dir(key) / "stage.json"
        tmp = path.with_name(f"stage.json.tmp{os.getpid()}")
        tmp.write_text(json.dumps(marker, default=str))
        os.replace(tmp, path)

    def compute(
        self,
        key: str,
        meta: Dict[str, Any],
        fn: Callable[[StageDir], None],
        on_invalid: Callable[[str], None] = lambda reason: None,
        force: bool = False,
    ) -> tuple[StageDir, bool]:
        """Return (stage, reused). Computes the stage with ``fn`` unless it is already done (or ``force``).

        Holds the stage's lock while checking and computing, so concurrent processes compute it once.
        """
        found = None if force else self.get(key)
        if found is not None:
            return found, True
        with self._acquire(key, meta):
            found = None if force else self.get(key)  # another process may have finished it while we waited
            if found is not None:
                return found, True
            state = self.status(key)
            if state.startswith("damaged"):
                on_invalid(f"{state}; set aside in {set_aside(self.stage_path(key))}")
            elif state != "missing":  # stored by another format, or recomputed on request (force)
                if state.startswith("invalid"):
                    on_invalid(state)
                shutil.rmtree(self.stage_path(key), ignore_errors=True)
            self._mark_running(key, meta)
            tmp = self.root / "tmp" / f"{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
            tmp.mkdir(parents=True)
            try:
                stage = StageDir(tmp)
                start = time.time()
                fn(stage)
                honour_umask(tmp)  # e.g. safetensors' 0600 weights: readable as the stage's other files
                full = {**meta, "format": FORMAT, "key": key, "created": time.time(), "seconds": time.time() - start}
                stage.write_json("meta.json", full)
                metrics = stage.read_json("metrics.json") if stage.file("metrics.json").exists() else {}
                (tmp / "DONE").write_text(done_marker(tmp, full, metrics))
                os.replace(tmp, self.stage_path(key))
                shutil.rmtree(self.root / "partial" / key, ignore_errors=True)
            except Exception as e:
                full_disk = disk_full(e, self.root / "tmp")
                shutil.rmtree(tmp, ignore_errors=True)  # at once: a full disk is not left fuller
                if full_disk is not None:
                    raise full_disk from None
                raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return StageDir(self.stage_path(key)), False

    def _acquire(self, key: str, meta: Dict[str, Any]):
        """The stage's lock, held; when another process holds it, say once which stage this run waits for and
        who computes it (its partial marker: host, pid, since when), then wait."""
        import logging

        from filelock import Timeout

        lock = self.lock(key)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            marker, _ = _read_json(str(self.root / "partial" / key / "stage.json"))
            who = ""
            if isinstance(marker, dict):
                since = marker.get("created")
                who = f" by {marker.get('host', '?')} pid {marker.get('pid', '?')}" + (
                    f" since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}"
                    if isinstance(since, (int, float)) else "")
            logging.getLogger(__name__).warning(
                "waiting for stage %s (%s): it is being computed%s (its lock %s is held); this run goes on once "
                "it is stored, and reuses it", meta.get("label") or "?", key[:12], who, lock.lock_file)
            lock.acquire()
        return _Held(lock)

    # --- enumeration: the one reader of the layout (w2sg status, w2sg gc, Runner's checkpoints) ------------

    def feature_bank(self, encoder: str) -> FeatureBank:
        """The features of one encoder (a features stage's key) by text content; its lock is ``lock(f"features-{encoder}")``."""
        return FeatureBank(self.root, encoder)

    def checkpoint_path(self, key: str) -> Path:
        """Where the training checkpoint of the unfinished stage ``key`` is saved (its partial folder is created,
        so a trainer can write it); a rerun resumes from it, and it is dropped once the stage is stored."""
        return self.partial_dir(key) / CHECKPOINT

    def has_stages(self) -> bool:
        """Whether any stage is stored (valid or not), without listing them."""
        with os.scandir(self.root / "stages") as entries:
            return next(entries, None) is not None

    def stage_summaries(self) -> Iterator[Dict[str, Any]]:
        """One summary per stored stage, in key order: the DONE marker's content (key, kind, label, model, task,
        seed, loss, acc, created; role and side where the stage was stored with them), with ``state`` ("done",
        or "invalid: <reason>" for a stage stored by another format or broken) and its size on disk: ``bytes``
        (all its files), ``weight_bytes`` (trained weights and finetuned backbones) and ``freed`` (its weights
        were freed). A stage stored by this version is read from its marker alone (one small file: listing a
        large store stays fast); older ones (an empty marker) and broken ones are read in full."""
        stages = str(self.root / "stages")
        for key in sorted(os.listdir(stages)):
            yield self._summary_of(key, f"{stages}/{key}")

    def _summary_of(self, key: str, path: str) -> Dict[str, Any]:
        marker, marker_bytes = _read_json(f"{path}/DONE")
        if not isinstance(marker, dict):
            marker = {}
        if marker.get("format") == FORMAT:
            wrong = _verify_files(path, marker.get("files"), checksums=False)  # sizes: one stat per file
            found = {**marker, "key": key, "state": f"damaged: {wrong}" if wrong else "done"}
            found.pop("files", None)
        else:  # stored before the DONE marker held a summary, or broken
            state = self.status(key)
            meta, _ = _read_json(f"{path}/meta.json")
            metrics, _ = _read_json(f"{path}/metrics.json") if state == "done" else (None, 0)
            found = {**(summary(meta, metrics if isinstance(metrics, dict) else {}) if isinstance(meta, dict) else {}),
                     "key": key, "state": state}
        if not isinstance(marker.get("bytes"), int):  # sizes not recorded in the marker: measured
            found.update(_stage_sizes(path))
        found["bytes"] += marker_bytes  # recorded sizes leave out the marker itself
        return found

    def _update_sizes(self, key: str) -> None:
        """Record a stored stage's sizes again in its DONE marker (replaced in one step), after its weight files
        were freed or restored; a marker without a summary (an older stage) is left as it is."""
        path = self.stage_path(key)
        marker, _ = _read_json(str(path / "DONE"))
        if not (isinstance(marker, dict) and marker.get("format") == FORMAT):
            return
        tmp = path / f".DONE.tmp{os.getpid()}"
        tmp.write_text(json.dumps({**marker, **_stage_sizes(path, records="files" in marker)},
                                  default=_json_default))
        os.replace(tmp, path / "DONE")

    def unfinished(self) -> Iterator[Unfinished]:
        """The stages with a partial marker that are not stored, in key order: being computed (their lock is
        held), stopped with a checkpoint to resume from, or stopped before their first one. Checks the locks
        of these stages alone."""
        for key in sorted(os.listdir(self.root / "partial")):
            if self.stage_path(key).exists():
                continue  # stored (its partial folder was left by a process stopped as it finished)
            path = self.root / "partial" / key
            marker, _ = _read_json(str(path / "stage.json"))
            try:
                checkpoint: Optional[float] = (path / CHECKPOINT).stat().st_mtime
            except OSError:
                checkpoint = None
            yield Unfinished(key, marker if isinstance(marker, dict) else None, self.is_running(key), checkpoint)

    def leftovers(self) -> List[Tuple[Path, int]]:
        """(path, bytes) of temporary files and folders left by processes that stopped while writing (killed, out of
        disk space): stages being written (tmp/), checkpoint and marker writes (partial/<key>/*.tmp<pid>) and
        feature chunks, whose stage's (or encoder's) lock no process holds. ``w2sg status`` reports them and
        ``w2sg gc`` removes them."""
        found: List[Tuple[Path, int]] = []

        def stale(lock_name: str, path: Path) -> None:
            if not self.is_running(lock_name):
                found.append((path, _tree_bytes(str(path))))

        for entry in sorted((self.root / "tmp").iterdir()):
            if entry.name.startswith(".write-test."):
                if time.time() - entry.stat().st_mtime > 60:
                    found.append((entry, _tree_bytes(str(entry))))
            else:
                stale(entry.name.split(".")[0], entry)
        for folder in sorted((self.root / "partial").iterdir()):
            for entry in sorted(folder.glob("*.tmp[0-9]*")):
                stale(folder.name, entry)
        features = self.root / "features"
        for folder in sorted(features.iterdir()) if features.is_dir() else []:
            for entry in sorted(folder.glob(".*.tmp[0-9]*")):
                stale(f"features-{folder.name}", entry)
        return found

    def remove_leftovers(self) -> Tuple[int, int]:
        """Remove :meth:`leftovers`; returns (how many, bytes)."""
        count = total = 0
        for path, size in self.leftovers():
            try:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            except FileNotFoundError:
                continue
            count, total = count + 1, total + size
        return count, total

    def damaged(self) -> List[Tuple[Path, int]]:
        """(path, bytes) of what was set aside in damaged/ (stages, checkpoints, feature chunks that could not be
        read); kept for a look, deleted by hand."""
        folder = self.root / "damaged"
        return [(p, _tree_bytes(str(p))) for p in sorted(folder.iterdir())] if folder.is_dir() else []

    # --- weights: retention and garbage collection -------------------------------------------------------

    def weight_files(self, key: str) -> List[Path]:
        """The stored weight files of a train stage (none once freed)."""
        return [p for p in (self.stage_path(key) / name for name in WEIGHT_FILES) if p.exists()]

    def weights_freed(self, key: str) -> Optional[Dict[str, Any]]:
        """The note of a stage whose weights were freed, else None."""
        path = self.stage_path(key) / FREED
        return json.loads(path.read_text()) if path.exists() else None

    def readers_running(self, key: str) -> List[str]:
        """Stages being computed now (their lock held) that take ``key`` as an input, e.g. its labels stage."""
        readers = []
        for other in os.listdir(self.root / "partial"):
            try:
                marker = json.loads((self.root / "partial" / other / "stage.json").read_text())
            except (OSError, ValueError):
                continue
            if key in (marker.get("inputs") or {}).values() and self.is_running(other):
                readers.append(other)
        return readers

    def free_weights(self, key: str, why: str) -> int:
        """Delete a stored train stage's weight files, leaving its metrics and predictions and a note (FREED);
        returns the bytes freed. Skipped (0) while another process holds its lock or reads its weights."""
        from filelock import Timeout

        lock = self.lock(key)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return 0
        try:
            files = self.weight_files(key)
            if self.status(key) != "done" or not files or self.readers_running(key):
                return 0
            size = sum(p.stat().st_size for p in files)
            for p in files:  # deleted first: on a full disk the note below has room once they are gone
                p.unlink()
            StageDir(self.stage_path(key)).write_json(
                FREED, {"files": [p.name for p in files], "bytes": size, "freed": time.time(), "why": why})
            self._update_sizes(key)
            return size
        finally:
            lock.release()

    def restore_weights(self, key: str, source: Path) -> None:
        """Put recomputed weight files (from ``source``, a stage written elsewhere) back into a freed stage."""
        for name in WEIGHT_FILES:
            if (source / name).exists():
                honour_umask(source / name)
                os.replace(source / name, self.stage_path(key) / name)
        (self.stage_path(key) / FREED).unlink(missing_ok=True)
        self._update_sizes(key)

    def collectable(self) -> List[Tuple[str, str, int]]:
        """(key, label, bytes) of every train stage whose weights no stage still needs, from the store alone: each
        stage that reads its weights (its labels stage) is stored, and none that reads them is being computed.
        Weights no stored stage has read (a ceiling or w2s model: a later run may use it as a teacher) are kept."""
        metas = {}
        for key in os.listdir(self.root / "stages"):
            try:
                metas[key] = json.loads((self.stage_path(key) / "meta.json").read_text())
            except (OSError, ValueError):
                continue
        read = {m["inputs"]["model"] for k, m in metas.items()
                if m.get("kind") == "labels" and (m.get("inputs") or {}).get("model") and self.status(k) == "done"}
        out = []
        for key in sorted(read):
            files = self.weight_files(key)
            if key in metas and files and not self.readers_running(key):
                out.append((key, metas[key].get("label") or "", sum(p.stat().st_size for p in files)))
        return out

    def sizes(self, summaries: Optional[Iterable[Dict[str, Any]]] = None) -> Dict[str, int]:
        """Bytes of the whole store, of its stored weights (trained models and finetuned backbones), and the number
        of stages whose weights were freed. Stored stages count as their DONE markers record them (read from the
        markers alone: ``summaries``, those stage_summaries gave already, saves reading them twice); the rest of
        the store (stages being written, checkpoints) is measured, but for locks/ (lock files: a few hundred bytes each)."""
        total = weights = freed = 0
        for found in self.stage_summaries() if summaries is None else summaries:
            total, weights, freed = total + found["bytes"], weights + found["weight_bytes"], freed + found["freed"]
        with os.scandir(self.root) as entries:
            total += sum(_tree_bytes(e.path) for e in entries if e.name not in ("stages", "locks"))
        return {"total": total, "weights": weights, "freed": freed}

    # --- experiments: which stages make up each experiment a run reported --------------------------------
    # experiments/<id>.json: a finished run's metrics.json (its stage keys under "stages", its settings,
    # accuracies and PGR), written when the run ends, so that a report of the store alone pairs its stages as
    # the runs did (w2sg.results.collect.rows_from_store) instead of guessing the pairing from their specs.

    def record_experiment(self, metrics: Dict[str, Any]) -> Optional[Path]:
        """Write a finished run's metrics (the dict of its metrics.json) to ``experiments/<id>.json``, the id from
        its stage keys (:func:`experiment_id`), atomically (a temp file renamed into place): a rerun of the same
        experiment replaces its record. A run of only some stages (``stages=[...]``, ``subset`` in its metrics)
        is no experiment: nothing is written and None returned."""
        if metrics.get("subset"):
            return None
        folder = self.root / "experiments"
        try:
            folder.mkdir(exist_ok=True)
            eid = experiment_id(s["key"] for s in metrics["stages"].values())
            path = folder / f"{eid}.json"
            tmp = folder / f".{eid}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
            tmp.write_text(json.dumps(metrics, indent=2, default=_json_default))
            os.replace(tmp, path)
        except OSError as e:
            raise self._unwritable(e) from None
        return path

    def experiments(self) -> Iterator[Dict[str, Any]]:
        """The recorded experiments (see :meth:`record_experiment`), oldest record first; a record that cannot
        be read is skipped with a warning naming it."""
        import logging

        folder = self.root / "experiments"
        paths = sorted(folder.glob("*.json"), key=lambda p: (p.stat().st_mtime, p.name)) if folder.is_dir() else []
        for path in paths:
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                logging.getLogger(__name__).warning("experiment record %s is unreadable (%s); skipped", path, e)
                continue
            if isinstance(record, dict) and isinstance(record.get("stages"), dict):
                yield record
            else:
                logging.getLogger(__name__).warning("experiment record %s names no stages; skipped", path)


class FeatureBank:
    """Frozen-model features by text content, for one encoder (``features/<encoder>/`` of a store).

    Each chunk is one ``.npz`` file holding ``hashes`` (one hex digest per text, :func:`text_hash`) and ``x``
    (their feature rows), written to a temporary name and renamed into place, so a reader never sees half a
    chunk. Chunks are only added, never changed: a reader takes the ones present when it looks. Adding takes the
    encoder's lock (``lock``), so two processes do not encode the same texts at once."""

    def __init__(self, root: Path, encoder: str):
        self.encoder = encoder
        self.path = Path(root) / "features" / encoder
        self._rows: Dict[str, Tuple[int, int]] = {}  # digest -> (chunk number, row)
        self._chunks: List[Any] = []  # loaded feature arrays, in self._names order
        self._names: List[str] = []

    def _refresh(self) -> None:
        import numpy as np

        names = sorted(p.name for p in self.path.glob("*.npz")) if self.path.is_dir() else []
        for name in names:
            if name in self._names:
                continue
            try:
                with np.load(self.path / name) as z:
                    hashes, x = z["hashes"], z["x"]
            except Exception as e:  # a chunk that cannot be read: set aside, its texts are encoded again
                import logging

                moved = set_aside(self.path / name)
                logging.getLogger(__name__).warning("feature chunk %s cannot be read (%s: %s); set aside in %s, its "
                                                    "texts are encoded again", self.path / name,
                                                    type(e).__name__, e, moved)
                continue
            c = len(self._chunks)
            self._chunks.append(x)
            self._names.append(name)
            for r, h in enumerate(hashes.tolist()):
                self._rows.setdefault(h, (c, r))

    def missing(self, digests: Iterable[str]) -> List[str]:
        """The digests (in first-seen order, each once) whose rows the bank does not hold yet."""
        self._refresh()
        return list(dict.fromkeys(d for d in digests if d not in self._rows))

    def rows(self, digests: List[str]) -> Any:
        """The feature rows [N, H] of ``digests``, in their order; every one must be in the bank."""
        import numpy as np

        self._refresh()
        where = [self._rows[d] for d in digests]
        if not where:
            return np.zeros((0, self._chunks[0].shape[1] if self._chunks else 0), dtype=np.float32)
        return np.stack([self._chunks[c][r] for c, r in where])

    def add(self, digests: List[str], x: Any) -> None:
        """Store the rows ``x`` of ``digests`` as one new chunk (atomically)."""
        import numpy as np

        if not digests:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.npz"
        tmp = self.path / f".{name}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            np.savez(f, hashes=np.array(digests, dtype="U32"), x=np.asarray(x, dtype=np.float32))
        os.replace(tmp, self.path / name)

    def __len__(self) -> int:
        self._refresh()
        return len(self._rows)


def text_hash(text: str, truncation: str) -> str:
    """A text's digest in a feature bank: its content and the side it is truncated on (pairs are cut on the
    left, single texts on the right), so the same text encoded the same way is found whatever task, seed or
    split it comes from."""
    import hashlib

    return hashlib.blake2b(f"{truncation}\0{text}".encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def experiment_id(stage_keys: Iterable[str]) -> str:
    """An experiment's id: a hash of its stages' keys (which hold every setting and the seed). It names the
    experiment's record in the store and its W&B run (w2sg.run.tracking.experiment_run_id)."""
    import hashlib

    return "exp-" + hashlib.sha256(",".join(sorted(stage_keys)).encode()).hexdigest()[:20]
