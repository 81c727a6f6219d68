"""Locks that hold across the nodes sharing a store, also where flock is not shared between them (Lustre, or NFS
mounted without working flock/lockd), and on local disks alike.

A lock is a file, ``locks/<key>.lock``, created with ``os.open(path, O_CREAT | O_EXCL | O_WRONLY)``: exactly one
process creates it. Its holder writes into it who holds it (host, pid, a unique token, since when) and a heartbeat
(a counter and the holder's time), rewritten in place (same length, fsync'd) every ``heartbeat_seconds()`` by a
background thread while it is held. Release removes the file only if it still holds the holder's token.

A holder that died leaves its file behind; another process takes it over:

* at once when the holder ran on this host (same hostname, boot id and pid namespace) and its pid is gone (or is a
  zombie, or is our own pid while we do not hold it: a pid reused since);
* after ``stale_seconds()`` (``W2SG_LOCK_STALE_SECONDS``, default 60) otherwise: a waiter reads the file again and
  again, and judges the holder stopped once it saw the very same content (same token, same heartbeat counter) for
  that long by its own clock. This needs no clocks in sync across nodes;
* a lock file with no content is one of the flock-based lock of earlier versions (or one created a moment ago):
  held while a flock on it is held, else taken over (once a few seconds old, or seen empty for a second).

Takeover moves the stale file aside (atomic rename to a unique name), checks that what it moved is exactly what
it judged stale, deletes it and creates the lock anew with O_EXCL; a file that changed meanwhile (its holder beat
after all, or another process took it over first) is put back (a hard link, which fails rather than overwrite a
lock created in between). So a lock another process has just refreshed is never deleted.

What the store's filesystem must give: atomic exclusive create (O_EXCL: local disks, NFSv3 and later, Lustre,
GPFS, BeeGFS), atomic rename within a directory (and hard links, to put a file back), and a file's content as
its holder last wrote it (fsync'd) to other nodes' fresh opens within the stale timeout (NFS close-to-open
consistency gives this). ``is_held`` (``w2sg status``'s running rows, what ``w2sg gc`` may remove) judges a
holder on another host from the time in its heartbeat against the local clock, so for listings clocks should
agree within the timeout; takeover never depends on clocks.

A holder that stops for longer than the timeout (suspended, SIGSTOP, a hung filesystem) loses its lock to a
waiter; its heartbeat thread logs it. Within one process the lock is reentrant per thread: the thread holding it
may acquire it again (released when every acquire is released), another thread of the process waits for it.
Acquire timeouts raise ``filelock.Timeout`` (imported only when raised), as the flock-based lock did.
"""

from __future__ import annotations

import atexit
import errno
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any, Dict, Optional, Tuple

STALE_ENV = "W2SG_LOCK_STALE_SECONDS"
DEFAULT_STALE_SECONDS = 60.0
SIZE = 512  # bytes of a lock file's content (JSON padded with spaces): a heartbeat rewrites it in place
EMPTY_GRACE = 1.0  # seconds an empty, unflocked lock file may stay empty: the instant between its create and write
EMPTY_OLD = 5.0  # an empty, unflocked lock file older than this (by its mtime) is taken over at once
MAX_POLL = 0.5  # longest sleep between two tries of a waiting acquire

log = logging.getLogger(__name__)


def stale_seconds() -> float:
    """How long a holder's heartbeat may stay unchanged before a waiter takes the lock over (W2SG_LOCK_STALE_SECONDS,
    default 60)."""
    try:
        value = float(os.environ.get(STALE_ENV) or DEFAULT_STALE_SECONDS)
    except ValueError:
        return DEFAULT_STALE_SECONDS
    return value if value > 0 else DEFAULT_STALE_SECONDS


def heartbeat_seconds(stale: Optional[float] = None) -> float:
    """How often a holder rewrites its heartbeat: a sixth of the stale timeout, at most every 5 s."""
    return max(0.02, min(5.0, (stale_seconds() if stale is None else stale) / 6))


# --- who we are ------------------------------------------------------------------------------------------------

_identity: Optional[Dict[str, Optional[str]]] = None


def identity() -> Dict[str, Optional[str]]:
    """This process's host as lock files record it: hostname, boot id and pid namespace (a pid is only checked on
    the host, boot and namespace it belongs to)."""
    global _identity
    if _identity is None:
        try:
            with open("/proc/sys/kernel/random/boot_id") as f:
                boot: Optional[str] = f.read().strip() or None
        except OSError:
            boot = None
        try:
            pidns: Optional[str] = os.readlink("/proc/self/ns/pid")
        except OSError:
            pidns = None
        _identity = {"host": socket.gethostname(), "boot": boot, "pidns": pidns}
    return _identity


def _on_this_host(info: Dict[str, Any]) -> bool:
    me = identity()
    return all(info.get(k) == me[k] for k in ("host", "boot", "pidns"))


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process: it exists
        return True
    try:  # a zombie (killed, not reaped yet) holds nothing
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


# --- lock files ----------------------------------------------------------------------------------------------------


def _read(path: str) -> Optional[bytes]:
    """A lock file's content; None when there is none."""
    try:
        with open(path, "rb") as f:
            return f.read(64 * 1024)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == getattr(errno, "ESTALE", None):  # NFS: replaced while we opened it
            return None
        raise


def _parse(content: Optional[bytes]) -> Optional[Dict[str, Any]]:
    try:
        info = json.loads((content or b"").decode())
    except (ValueError, UnicodeDecodeError):
        return None
    return info if isinstance(info, dict) and isinstance(info.get("token"), str) else None


def holder(path: str | os.PathLike) -> Optional[Dict[str, Any]]:
    """What a lock file says of its holder (host, pid, token, since, beat, time, every), or None (no lock file, or
    one without content)."""
    return _parse(_read(os.fspath(path)))


def _flock_held(path: str) -> bool:
    """Whether a flock is held on ``path`` (the lock of earlier versions, whose files are empty); False where flock
    is not supported."""
    try:
        import fcntl
    except ImportError:
        return False
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:  # ENOLCK, ENOSYS, EOPNOTSUPP, ...: no flock here
            return False
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def _mtime_age(path: str) -> Optional[float]:
    try:
        return time.time() - os.stat(path).st_mtime
    except OSError:
        return None


class _Holding:
    """A lock this process holds: its open file, token, heartbeat, and which thread holds it how many times."""

    def __init__(self, path: str, fd: int, every: float):
        self.path, self.fd, self.every = path, fd, every
        self.token = uuid.uuid4().hex
        self.since = time.time()
        self.beat = 0
        self.size = 0
        self.owner = threading.current_thread()
        self.count = 0
        self.mutex = threading.Lock()  # the heartbeat's write against release's close
        self.missing = 0  # heartbeats in a row that found the lock file gone or replaced
        self.warned = False

    def content(self) -> bytes:
        text = json.dumps({**identity(), "pid": os.getpid(), "token": self.token, "since": round(self.since, 3),
                           "beat": self.beat, "time": round(time.time(), 3), "every": self.every}, sort_keys=True)
        return (text.ljust(SIZE - 1) + "\n").encode()

    def write(self) -> None:
        data = self.content()
        os.pwrite(self.fd, data, 0)
        if len(data) != self.size:  # only where the JSON outgrew SIZE
            os.ftruncate(self.fd, len(data))
            self.size = len(data)
        os.fsync(self.fd)

    def heartbeat(self) -> None:
        with self.mutex:
            if self.fd is None:
                return
            self.beat += 1
            try:
                self.write()
                ours = os.fstat(self.fd)
                now = os.stat(self.path)
                same = (ours.st_ino, ours.st_dev) == (now.st_ino, now.st_dev)
            except OSError:
                same = False
            self.missing = 0 if same else self.missing + 1
            if self.missing >= 2 and not self.warned:  # twice: not the instant of a takeover check putting it back
                self.warned = True
                log.warning("lost the lock %s: its file was taken over by another process (this one was judged "
                            "stopped); both may compute the same stage now", self.path)


# Process-wide: the locks this process holds, by path (reentrancy by thread; forked children hold none), what
# this process saw of other holders' lock files (content, first seen by time.monotonic()) to judge their heartbeat
# stopped without comparing clocks, and the one heartbeat thread.
_registry = threading.Lock()
_held: Dict[str, _Holding] = {}
_seen: Dict[str, Tuple[bytes, float]] = {}
_beater: Optional[threading.Thread] = None


def _beat_forever() -> None:
    global _beater
    while True:
        with _registry:
            holdings = list(_held.values())
            if not holdings:
                if _beater is threading.current_thread():
                    _beater = None
                return
        time.sleep(min(h.every for h in holdings))
        for h in holdings:
            h.heartbeat()


def _start_beater() -> None:  # with _registry held
    global _beater
    if _beater is None or not _beater.is_alive():
        _beater = threading.Thread(target=_beat_forever, name="w2sg-lock-heartbeat", daemon=True)
        _beater.start()


def _before_fork() -> None:
    _registry.acquire()


def _after_fork_parent() -> None:
    _registry.release()


def _after_fork_child() -> None:
    global _registry, _held, _seen, _beater
    for h in _held.values():  # the parent's locks: not this process's
        if h.fd is not None:
            try:
                os.close(h.fd)
            except OSError:
                pass
    _registry, _held, _seen, _beater = threading.Lock(), {}, {}, None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_parent, after_in_child=_after_fork_child)


@atexit.register
def _release_all() -> None:
    """On a normal exit, remove the lock files this process still holds (a killed process's are taken over)."""
    with _registry:
        holdings = list(_held.values())
        _held.clear()
    for h in holdings:
        _drop(h)


def _create(path: str) -> Optional[_Holding]:
    """The lock, created (O_EXCL) and written; None if its file exists."""
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY
    try:
        fd = os.open(path, flags, 0o666)
    except FileExistsError:
        return None
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        try:
            fd = os.open(path, flags, 0o666)
        except FileExistsError:
            return None
    h = _Holding(path, fd, heartbeat_seconds())
    try:
        h.write()
    except BaseException:
        os.close(fd)
        try:
            os.unlink(path)
        except OSError:
            pass
        raise
    return h


def _unchanged_for(path: str, content: bytes, seconds: float) -> bool:
    """Whether this process has seen ``content`` in ``path`` for ``seconds`` (by its own clock); starts watching it
    if not."""
    now = time.monotonic()
    first = _seen.get(path)
    if first is None or first[0] != content:
        _seen[path] = (content, now)
        return False
    return now - first[1] >= seconds


def _stale(path: str, content: bytes) -> bool:
    """Whether the holder of the lock file ``path`` that reads ``content`` is gone (with _registry held)."""
    if not content.strip():  # the flock-based lock of earlier versions, or a lock file created a moment ago
        if _flock_held(path):
            _seen.pop(path, None)
            return False
        age = _mtime_age(path)
        return (age is not None and age > EMPTY_OLD) or _unchanged_for(path, content, EMPTY_GRACE)
    info = _parse(content)
    if info is not None and _on_this_host(info) and _gone(info):
        return True
    limit = stale_seconds()
    if info is not None and isinstance(info.get("every"), (int, float)):
        limit = max(limit, 3 * info["every"])  # a holder that beats less often than our timeout expects
    return _unchanged_for(path, content, limit)


def _gone(info: Dict[str, Any]) -> bool:
    """Whether the holder a lock file of this host names is gone (with _registry held): its pid is not alive, or is
    ours (a pid reused) with a token this process does not hold."""
    if info.get("pid") == os.getpid():
        return all(h.token != info.get("token") for h in _held.values())
    return not _pid_alive(info.get("pid"))


def _key(path: str | os.PathLike) -> str:
    """One spelling per lock file (symlinks and relative parts of its folder resolved): the registry's key."""
    path = os.fspath(path)
    return os.path.join(os.path.realpath(os.path.dirname(path) or "."), os.path.basename(path))


def _describe(content: bytes) -> str:
    info = _parse(content)
    if info is None:
        return "a lock file without content (an earlier version's, not held)"
    since = info.get("since")
    when = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else ""
    return f"{info.get('host', '?')} pid {info.get('pid', '?')}{when}"


def _put_back(aside: str, path: str) -> bool:
    """Move ``aside`` back to ``path`` unless a new lock file was created there meanwhile; True if put back."""
    try:
        os.link(aside, path)
    except FileExistsError:
        restored = False
    except OSError:  # no hard links on this filesystem: rename back while nothing is there
        if os.path.lexists(path):
            restored = False
        else:
            try:
                os.rename(aside, path)
                return True
            except OSError:
                restored = False
    else:
        restored = True
    try:
        os.unlink(aside)
    except FileNotFoundError:
        pass
    return restored


def _take_over(path: str, judged: bytes) -> None:
    """Remove the lock file ``path`` judged stale from ``judged`` (its content then), only if it still reads so."""
    aside = f"{path}.stale.{uuid.uuid4().hex[:12]}"
    try:
        os.rename(path, aside)
    except FileNotFoundError:  # released or taken over meanwhile
        return
    moved = _read(aside)
    if moved == judged:
        try:
            os.unlink(aside)
        except FileNotFoundError:
            pass
        _seen.pop(path, None)
        log.warning("taking over the lock %s: its holder, %s, stopped (its process is gone or its heartbeat stood "
                    "still)", path, _describe(judged))
        return
    if not _put_back(aside, path):  # refreshed or replaced meanwhile, and a new lock was created in between
        log.warning("the lock %s of %s was moved aside to check it and could not be put back: a lock was created "
                    "meanwhile", path, _describe(moved or b""))


def _drop(h: _Holding) -> None:
    """Close a holding's file and remove the lock file if it is still ours."""
    with h.mutex:
        fd, h.fd = h.fd, None
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass
    info = holder(h.path)
    if info is None or info.get("token") != h.token:
        log.warning("lock %s: not removed on release, it is no longer this process's (%s)", h.path,
                    "gone" if info is None else f"held by {info.get('host')} pid {info.get('pid')}")
        return
    aside = f"{h.path}.released.{uuid.uuid4().hex[:12]}"
    try:
        os.rename(h.path, aside)
    except FileNotFoundError:
        return
    moved = _parse(_read(aside))
    if moved is not None and moved.get("token") == h.token:
        try:
            os.unlink(aside)
        except FileNotFoundError:
            pass
    else:  # taken over between the read and the rename: someone else's, put back
        _put_back(aside, h.path)


def is_held(path: str | os.PathLike) -> bool:
    """Whether a live holder holds the lock ``path``, from its file (never by trying to acquire it): this process,
    a process of this host that is alive, or another host's whose heartbeat time is within the stale timeout of
    our clock (an empty file, the flock-based lock of earlier versions: while a flock is held on it)."""
    path = _key(path)
    with _registry:
        if path in _held:
            return True
    content = _read(path)
    if content is None:
        return False
    info = _parse(content)
    if info is None:
        if not content.strip() and _flock_held(path):
            return True
        age = _mtime_age(path)
        return age is not None and age < (EMPTY_OLD if not content.strip() else stale_seconds())
    if _on_this_host(info):
        with _registry:
            if _gone(info):
                return False
    limit = stale_seconds()
    if isinstance(info.get("every"), (int, float)):
        limit = max(limit, 3 * info["every"])
    beat = info.get("time")
    return isinstance(beat, (int, float)) and time.time() - beat < limit


class _Acquired:
    """What ``acquire`` returns: the lock, released on leaving a ``with`` block (as filelock's)."""

    def __init__(self, lock: "StoreLock"):
        self.lock = lock

    def __enter__(self) -> "StoreLock":
        return self.lock

    def __exit__(self, *exc: Any) -> None:
        self.lock.release()


class StoreLock:
    """A lock on the file ``path`` that holds across nodes (see the module). Used as ``filelock.FileLock``:
    ``with lock:``, ``acquire(timeout=...)`` (None or negative: wait for ever; 0: try once) raising
    ``filelock.Timeout``, ``release()``, ``lock_file``, ``is_locked``."""

    def __init__(self, path: str | os.PathLike, timeout: float = -1):
        self.lock_file = os.fspath(path)
        self._path = _key(path)
        self.timeout = timeout
        self._count = 0  # this object's acquires not yet released

    @property
    def is_locked(self) -> bool:
        return self._count > 0

    def _try(self) -> bool:
        with _registry:
            h = _held.get(self._path)
            if h is not None:
                if h.owner is not threading.current_thread():
                    return False
            else:
                for _ in range(3):  # created; or released, or taken over from a stopped holder, then created
                    h = _create(self._path)
                    if h is not None:
                        break
                    content = _read(self._path)
                    if content is not None:
                        if not _stale(self._path, content):
                            return False
                        _take_over(self._path, content)
                if h is None:
                    return False
                _held[self._path] = h
                _seen.pop(self._path, None)
                _start_beater()
            h.count += 1
            self._count += 1
            return True

    def acquire(self, timeout: Optional[float] = None, poll_interval: Optional[float] = None, *,
                blocking: bool = True) -> _Acquired:
        if timeout is None:
            timeout = self.timeout
        if not blocking:
            timeout = 0
        deadline = None if timeout < 0 else time.monotonic() + timeout
        delay = poll_interval or 0.05
        while not self._try():
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                from filelock import Timeout  # here: listings (is_held) never import filelock

                raise Timeout(self.lock_file)
            time.sleep(delay if deadline is None else max(0.0, min(delay, deadline - now)))
            if poll_interval is None:
                delay = min(delay * 1.5, MAX_POLL)
        return _Acquired(self)

    def release(self, force: bool = False) -> None:
        """Release one acquire of this object (``force``: all of them); the file goes once no acquire of this
        process is left. Releasing a lock this object does not hold does nothing."""
        with _registry:
            if self._count == 0:
                return
            n = self._count if force else 1
            self._count -= n
            h = _held.get(self._path)
            if h is None:  # e.g. acquired before a fork, released in the child
                return
            h.count -= n
            if h.count > 0:
                return
            del _held[self._path]
            _drop(h)  # with _registry held: no thread of ours creates it again before it is gone

    def __enter__(self) -> "StoreLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"StoreLock({self.lock_file!r}, held={self.is_locked})"
