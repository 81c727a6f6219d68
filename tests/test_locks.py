"""The store's lock (w2sg.core.locks): O_EXCL lock files with a heartbeat, which hold across nodes without flock:
mutual exclusion between processes and threads, reentrancy by thread, takeover of a killed holder (at once on this
host, after the stale timeout on another) but never of a live one, release that leaves a lock taken over by
another, timeouts raising filelock.Timeout, and is_running read from the lock file."""

import json
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest
from filelock import FileLock, Timeout

from w2sg.core import locks
from w2sg.core.locks import StoreLock, holder, is_held
from w2sg.core.store import Store

STALE = 1.5  # W2SG_LOCK_STALE_SECONDS in these tests: heartbeats every STALE / 6 s


@pytest.fixture(autouse=True)
def short_timeout(monkeypatch):
    monkeypatch.setenv(locks.STALE_ENV, str(STALE))


HOLDER = """
import sys, time
from w2sg.core import locks
if sys.argv[2] != "-":  # pretend to run on another host
    locks.identity().update(host=sys.argv[2], boot="other-boot")
lock = locks.StoreLock(sys.argv[1])
lock.acquire()
print("held", flush=True)
time.sleep(120)
"""


def _holder(path, host="-"):
    """A process holding the lock ``path`` (on another host when ``host`` is given), once it said so."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), host], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, locks.STALE_ENV: str(STALE)})
    assert proc.stdout.readline().strip() == "held"
    return proc


def _kill(proc):
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)


def _fake_lock_file(path, host="node-b", pid=4242, beat=0, at=None, token=None):
    """A lock file as a holder on ``host`` writes it."""
    info = {"host": host, "boot": "b", "pidns": "p", "pid": pid, "token": token or uuid.uuid4().hex,
            "since": time.time(), "beat": beat, "time": time.time() if at is None else at, "every": STALE / 6}
    path.write_bytes((json.dumps(info, sort_keys=True).ljust(locks.SIZE - 1) + "\n").encode())
    return info


WORKER = """
import os, sys, time
from w2sg.core.locks import StoreLock
lock, log, go = StoreLock(sys.argv[1]), sys.argv[2], sys.argv[4]
while not os.path.exists(go):  # all start together
    time.sleep(0.005)
for _ in range(int(sys.argv[3])):
    time.sleep(0.01)  # outside the lock: the others get their turns
    with lock:
        with open(log, "a") as f:
            f.write(f"in {os.getpid()}\\n")
        time.sleep(0.005)
        with open(log, "a") as f:
            f.write(f"out {os.getpid()}\\n")
"""


def _exclusive(log_path, n):
    lines = log_path.read_text().split("\n")[:-1]
    assert len(lines) == 2 * n
    for enter, leave in zip(lines[::2], lines[1::2]):  # every critical section ends before the next begins
        assert enter.startswith("in ") and leave == "out " + enter[3:], lines
    turns = sum(a != b for a, b in zip(lines[::2], lines[2::2]))
    assert turns >= 3, lines  # they did contend: the lock passed between them


def test_processes_take_the_lock_in_turn(tmp_path):
    lock, log, go = tmp_path / "locks" / "k.lock", tmp_path / "log", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(lock), str(log), "15", str(go)]) for _ in range(3)]
    time.sleep(0.3)
    go.touch()
    for p in procs:
        assert p.wait(60) == 0
    _exclusive(log, 45)
    assert not lock.exists()  # the last release removed it


def test_threads_take_the_lock_in_turn_and_the_holding_thread_may_take_it_again(tmp_path):
    path, log = tmp_path / "k.lock", []

    def work():
        for _ in range(20):
            with StoreLock(path):
                with StoreLock(path):  # a new object, the same thread: reentrant, no deadlock
                    log.append(("in", threading.get_ident()))
                    time.sleep(0.001)
                    log.append(("out", threading.get_ident()))
                assert path.exists()  # the outer acquire still holds it

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(log) == 120 and all(a == ("in", b[1]) and b[0] == "out" for a, b in zip(log[::2], log[1::2]))
    assert not path.exists()


def test_another_thread_waits_and_timeout_zero_raises_filelock_s_timeout(tmp_path):
    path = tmp_path / "k.lock"
    held = StoreLock(path)
    held.acquire()
    got = {}

    def other():
        try:
            StoreLock(path).acquire(timeout=0)
        except Timeout as e:
            got["zero"] = e
        start = time.monotonic()
        with pytest.raises(Timeout):
            StoreLock(path).acquire(timeout=0.3)
        got["waited"] = time.monotonic() - start

    t = threading.Thread(target=other)
    t.start()
    t.join(10)
    assert str(path) in str(got["zero"]) and got["waited"] >= 0.3
    held.release()
    with StoreLock(path).acquire(timeout=0) as lock:  # filelock's proxy: released on leaving the block
        assert lock.is_locked and lock.lock_file == str(path)
    assert not path.exists() and not lock.is_locked


def test_a_forked_child_does_not_hold_its_parent_s_locks(tmp_path):
    path = tmp_path / "k.lock"
    with StoreLock(path):
        ctx = multiprocessing.get_context("fork")
        child = ctx.Process(target=_try_in_child, args=(str(path),))
        child.start()
        child.join(30)
        assert child.exitcode == 3  # Timeout: not reentrant across processes
        assert holder(path)["pid"] == os.getpid()


def _try_in_child(path):
    try:
        StoreLock(path).acquire(timeout=0.2)
    except Timeout:
        os._exit(3)
    os._exit(0)


def test_a_killed_holder_on_this_host_is_taken_over_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv(locks.STALE_ENV, "600")  # not by the timeout: its pid is gone
    path = tmp_path / "locks" / "k.lock"
    proc = _holder(path)
    assert is_held(path) and holder(path)["pid"] == proc.pid
    with pytest.raises(Timeout):
        StoreLock(path).acquire(timeout=0.2)
    _kill(proc)
    assert path.exists() and not is_held(path)
    lock = StoreLock(path)
    lock.acquire(timeout=0)
    assert holder(path)["pid"] == os.getpid() and is_held(path)
    lock.release()
    assert not path.exists() and [p.name for p in path.parent.iterdir()] == []  # nothing left aside


def test_a_live_holder_on_another_host_keeps_the_lock_a_killed_one_loses_it_after_the_timeout(tmp_path):
    path = tmp_path / "k.lock"
    proc = _holder(path, host="node-b")
    try:
        first = holder(path)
        assert first["host"] == "node-b" and is_held(path)
        start = time.monotonic()
        with pytest.raises(Timeout):  # its heartbeat goes on: never stale, however long we wait
            StoreLock(path).acquire(timeout=2 * STALE)
        assert time.monotonic() - start >= 2 * STALE
        assert holder(path)["token"] == first["token"] and holder(path)["beat"] > first["beat"] and is_held(path)
    finally:
        _kill(proc)
    lock = StoreLock(path)
    start = time.monotonic()
    lock.acquire(timeout=10 * STALE)  # its heartbeat stood still for STALE seconds (by our clock)
    waited = time.monotonic() - start
    try:
        # its content stood still for STALE s by our clock, watched since (at most a heartbeat before) the kill
        assert STALE - 0.5 <= waited < 5 * STALE and holder(path)["pid"] == os.getpid()
    finally:
        lock.release()


def test_a_stopped_heartbeat_is_judged_by_our_clock_not_by_the_time_it_records(tmp_path):
    """A lock file of another host whose heartbeat reads 'now' (or the future: a clock ahead) but never changes."""
    path = tmp_path / "k.lock"
    _fake_lock_file(path, at=time.time() + 3600)
    assert is_held(path)
    with pytest.raises(Timeout):
        StoreLock(path).acquire(timeout=0)
    start = time.monotonic()
    with StoreLock(path).acquire(timeout=10 * STALE):
        assert time.monotonic() - start >= STALE * 0.9


def test_a_heartbeat_kept_up_by_another_host_is_never_taken_over(tmp_path):
    path = tmp_path / "k.lock"
    stop = threading.Event()
    info = _fake_lock_file(path)

    def beat():
        n = 0
        while not stop.wait(STALE / 4):
            n += 1
            _fake_lock_file(path, token=info["token"], beat=n, at=time.time() - 3600)  # its clock: an hour behind

    t = threading.Thread(target=beat)
    t.start()
    try:
        with pytest.raises(Timeout):
            StoreLock(path).acquire(timeout=2 * STALE)
        assert holder(path)["token"] == info["token"]
    finally:
        stop.set()
        t.join()


def test_is_running_reads_the_lock_file(tmp_path):
    s = Store(tmp_path / "store")
    key = "k" * 24
    path = s.root / "locks" / f"{key}.lock"
    assert not s.is_running(key)
    with s.lock(key) as lock:
        assert s.is_running(key) and lock.lock_file == str(path)
        assert holder(path)["pid"] == os.getpid()
    assert not s.is_running(key) and not path.exists()
    _fake_lock_file(path)  # another host, a fresh heartbeat
    assert s.is_running(key)
    _fake_lock_file(path, at=time.time() - 10 * STALE)  # another host, its heartbeat old
    assert not s.is_running(key)
    me = locks.identity()
    _fake_lock_file(path, host=me["host"], pid=_dead_pid())  # this host, its process gone
    info = json.loads(path.read_text())
    path.write_text(json.dumps({**info, "boot": me["boot"], "pidns": me["pidns"]}).ljust(locks.SIZE - 1) + "\n")
    assert not s.is_running(key)
    with s.lock(key):  # taken over at once
        assert s.is_running(key)


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_release_leaves_a_lock_another_process_took_over(tmp_path, caplog):
    path = tmp_path / "k.lock"
    lock = StoreLock(path)
    lock.acquire()
    os.rename(path, tmp_path / "aside")  # what a waiter that judged us stopped does, then creates its own
    theirs = _fake_lock_file(path)
    with caplog.at_level(logging.WARNING, logger="w2sg.core.locks"):
        lock.release()
    assert holder(path)["token"] == theirs["token"]
    assert "not removed on release, it is no longer this process's (held by node-b pid 4242)" in caplog.text


def test_a_lock_refreshed_while_judged_stale_is_put_back(tmp_path):
    path = tmp_path / "k.lock"
    judged = _fake_lock_file(path, beat=1)
    content = path.read_bytes()
    _fake_lock_file(path, token=judged["token"], beat=2)  # its holder beat just after we read it
    refreshed = path.read_bytes()
    with locks._registry:
        locks._take_over(str(path), content)
    assert path.read_bytes() == refreshed and sorted(p.name for p in tmp_path.iterdir()) == ["k.lock"]
    with locks._registry:
        locks._take_over(str(path), refreshed)  # what was judged: removed
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_an_earlier_version_s_lock_file_is_held_while_its_flock_is(tmp_path):
    """Stores written by the flock-based lock keep empty lock files: held while a flock is held on them (a process
    of the earlier version computing), else taken over at once."""
    path = tmp_path / "k.lock"
    old = FileLock(str(path))
    old.acquire()
    try:
        assert path.read_bytes() == b"" and is_held(path)
        with pytest.raises(Timeout):
            StoreLock(path).acquire(timeout=2 * locks.EMPTY_GRACE)
    finally:
        old.release()
    os.utime(path, (time.time() - 60, time.time() - 60))
    assert path.exists() and not is_held(path)
    with StoreLock(path).acquire(timeout=0):
        assert holder(path)["pid"] == os.getpid()


def test_a_waiting_compute_reuses_what_the_holder_stored(tmp_path):
    """Two processes computing the same stage through Store.compute: one computes, the other waits and reuses it."""
    code = """
import sys, time
from w2sg.core.store import Store
s = Store(sys.argv[1])
def fn(out):
    time.sleep(0.5)
    out.write_json("metrics.json", {"acc": 1.0})
_, reused = s.compute("c" * 24, {"kind": "train", "label": "x"}, fn)
print("reused" if reused else "computed")
"""
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "store")], stdout=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert outs == ["computed", "reused"]
    assert Store(tmp_path / "store").status("c" * 24) == "done"
