"""Run and sweep folders are never overwritten (and an unwritable one is one line), W&B never asks for an API key,
and Ctrl-C ends a run with one line: the entry's answers to what the user's environment does
(w2sg.app.callback's folder checks, w2sg.run.tracking's mode, w2sg.app.cli's interrupt handling)."""

import os
import shutil
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import TINY, run_w2sg

ERROR = "w2sg: error: "
INTERRUPTED = "w2sg: interrupted (Ctrl-C); finished stages are stored; rerun the same command to go on"
QUICK = TINY + ["logger=none"]  # with warm_store: every stage is read from the store, a run takes seconds


def _files(folder: Path) -> dict:
    """Every file under the folder with its bytes: what a refused run must leave as it was."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _refused(proc, *words: str) -> str:
    """The one line a refusal prints (status 2, no traceback), checked to name each of ``words``."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith(ERROR)]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


# --- run folders ---------------------------------------------------------------------------------------------

def test_a_finished_run_folder_is_refused_and_left_as_it_was(tmp_path, warm_store):
    args = QUICK + ["hydra.run.dir=outputs/same"]
    run_w2sg(args, tmp_path)
    folder = tmp_path / "outputs" / "same"
    before = _files(folder)
    assert Path("metrics.json") in before and Path("w2sg.log") in before
    for again in (args, args + ["seed=1"]):  # the same command, or another run into the same folder
        line = _refused(run_w2sg(again, tmp_path, check=False), "outputs/same", "hydra.run.dir", "finished run",
                        "new folder", "move")
        assert line.startswith(f"{ERROR}the run folder outputs/same (hydra.run.dir) holds a finished run")
        assert _files(folder) == before, "nothing in the folder was written: not metrics.json, .hydra/ or the log"


def test_an_unfinished_run_folder_is_resumed(tmp_path, warm_store):
    """A run stopped before its end (no metrics.json: preempted, cancelled, crashed) goes on in its folder."""
    args = QUICK + ["hydra.run.dir=outputs/resumed"]
    [first] = run_w2sg(args, tmp_path).metrics
    (tmp_path / "outputs" / "resumed" / "metrics.json").unlink()
    [again] = run_w2sg(args, tmp_path).metrics
    assert again["output_dir"] == first["output_dir"] and again["acc"] == first["acc"]


def test_unwritable_run_folder_is_one_line(tmp_path):
    (tmp_path / "a_file").write_text("")  # a file where a folder should be: no user (root neither) can create it
    proc = run_w2sg(QUICK + ["hydra.run.dir=a_file/run"], tmp_path, check=False)
    _refused(proc, "cannot write into the folder a_file/run (hydra.run.dir)", "Not a directory",
             "set hydra.run.dir to a folder you can write to")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
@pytest.mark.parametrize("multirun", [False, True])
def test_run_folder_under_a_read_only_folder_is_one_line(tmp_path, multirun):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
        proc = run_w2sg((["-m"] if multirun else []) + QUICK + [f"{key}=ro/out"], tmp_path, check=False)
        _refused(proc, f"cannot write into the folder ro/out ({key}): Permission denied",
                 f"set {key} to a folder you can write to", f"make {ro} writable")
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


# --- sweep folders -------------------------------------------------------------------------------------------

SWEEP = ["-m", "objective=acc.w2s,acc.weak", *QUICK, "hydra.sweep.dir=sweep"]  # 2 jobs of the same stages


@pytest.mark.slow  # keeps the default suite under 5 minutes; CI runs -m slow too
def test_a_finished_sweep_folder_is_refused_an_interrupted_one_resumed(tmp_path, warm_store):
    run_w2sg(SWEEP, tmp_path)
    folder = tmp_path / "sweep"
    assert sorted(p.parent.name for p in folder.glob("*/metrics.json")) == ["0", "1"]
    before = _files(folder)
    # the same sweep again, finished: refused, as is another sweep into its folder
    line = _refused(run_w2sg(SWEEP, tmp_path, check=False), "sweep (hydra.sweep.dir)", "new folder", "move")
    assert "holds this sweep, finished" in line
    other = ["-m", "objective=acc.w2s,pgr", *QUICK, "hydra.sweep.dir=sweep"]
    assert "holds 2 finished runs of another sweep" in _refused(run_w2sg(other, tmp_path, check=False))
    assert _files(folder) == before, "a refused sweep writes nothing: no job ran, multirun.yaml is kept"
    # its second job stopped before its end (no metrics.json): the same command goes on, another sweep is refused
    (folder / "1" / "metrics.json").unlink()
    _refused(run_w2sg(other, tmp_path, check=False), "sweep (hydra.sweep.dir)", "1 finished run of another sweep")
    run_w2sg(SWEEP, tmp_path)
    assert (folder / "0" / "metrics.json").exists() and (folder / "1" / "metrics.json").exists()
    # stopped between its two jobs (the second never started: no folder): the same command goes on with it
    shutil.rmtree(folder / "1")
    run_w2sg(SWEEP, tmp_path)
    assert (folder / "1" / "metrics.json").exists()


# --- W&B without an API key ----------------------------------------------------------------------------------

def _env_without_wandb_key(tmp_path: Path) -> dict:
    """The test's environment with no W&B credentials anywhere: no WANDB_* variable, HOME an empty folder (no
    ~/.netrc, no W&B settings file), W&B's server an address that refuses at once."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "NETRC"}
    env.update(HOME=str(home), WANDB_BASE_URL="http://127.0.0.1:9", TERM="xterm",
               HF_HOME=os.environ.get("HF_HOME") or str(Path.home() / ".cache" / "huggingface"))
    return env


def _run_at_a_terminal(args, cwd, env, timeout=300):
    """``python -m w2sg <args>`` with a pseudo-terminal as stdin, stdout and stderr (where W&B would prompt),
    whose input ends at once (Ctrl-D, as for a prompt nobody answers); returns (status, everything it printed)."""
    master, slave = os.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "w2sg", *args], cwd=cwd, env=env, stdin=slave, stdout=slave,
                            stderr=slave, start_new_session=True)
    os.close(slave)
    os.write(master, b"\x04")
    out, deadline = b"", time.time() + timeout
    try:
        while time.time() < deadline:
            ready, _, _ = select.select([master], [], [], 1)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: every process holding the terminal is gone
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
        else:
            proc.kill()
            raise AssertionError(f"no end in {timeout} s:\n{out.decode(errors='replace')}")
        return proc.wait(timeout=60), out.decode(errors="replace")
    finally:
        os.close(master)


@pytest.mark.parametrize("stdin", ["terminal", "none"])
def test_wandb_online_without_a_key_warns_once_and_logs_offline(tmp_path, warm_store, stdin):
    env = _env_without_wandb_key(tmp_path)
    args = TINY + ["logger.mode=online"]
    if stdin == "terminal":
        rc, out = _run_at_a_terminal(args, tmp_path, env)
    else:
        proc = subprocess.run([sys.executable, "-m", "w2sg", *args], cwd=tmp_path, env=env,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
        rc, out = proc.returncode, proc.stdout + proc.stderr
    assert rc == 0, out
    assert len(list((tmp_path / "outputs").glob("*/*/metrics.json"))) == 1
    assert out.count("W&B: logger.mode=online needs an API key and none was found") == 1, out
    for way_out in ("WANDB_API_KEY", "`wandb login`", "logger.mode=offline", "logging offline instead"):
        assert way_out in out
    assert "Create a W&B account" not in out and "W&B tracking failed" not in out, out
    assert list((tmp_path / "wandb").glob("offline-run-*")), "the experiment's run is logged offline"


# --- Ctrl-C --------------------------------------------------------------------------------------------------

def _plan_keys(overrides):
    from helpers import compose

    from w2sg.core.plan import plan

    return [s.key for s in plan(compose(overrides)).values()]


def _ctrl_c_as_at_a_terminal() -> None:
    """In the child: SIGINT's default disposition, as a command started at a terminal has. A suite started in the
    background (``cmd &`` in a script, nohup) inherits SIGINT ignored, and Python then never raises
    KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(args, cwd):
    """``python -m w2sg <args>``, its output read as it comes (lines: stdout, then stderr when done)."""
    proc = subprocess.Popen([sys.executable, "-m", "w2sg", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_ctrl_c_as_at_a_terminal)
    lines: list = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    return proc, lines, reader


def _wait_for(proc, lines, cond, what, timeout=180):
    start = time.time()
    while not cond():
        assert proc.poll() is None, f"ended before {what}: {''.join(lines)}{proc.stderr.read()}"
        assert time.time() - start < timeout, f"no {what} in {timeout} s: {''.join(lines)}"
        time.sleep(0.05)


def _interrupted(proc, lines, reader, accept=(INTERRUPTED,)):
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"still running 120 s after SIGINT: {''.join(lines)}") from None
    err = proc.stderr.read()
    reader.join(timeout=10)
    out = "".join(lines)
    assert proc.returncode == 128 + signal.SIGINT, out + err
    assert "Traceback" not in out + err, out + err
    said = [ln for ln in err.splitlines() if ln.startswith("w2sg: ")]
    assert len(said) == 1 and any(a in said[0] for a in accept), err
    return said[0]


@pytest.mark.parametrize("multirun", [False, True])
def test_ctrl_c_outside_training_is_one_line(tmp_path, store, multirun):
    """Ctrl-C while the run waits for a stage another process computes (its lock, held here): no training loop to
    turn it into a checkpoint, so KeyboardInterrupt reaches the entry."""
    from filelock import FileLock

    locks = [FileLock(str(store / "locks" / f"{key}.lock")) for key in _plan_keys(QUICK)]
    (store / "locks").mkdir(parents=True)
    for lock in locks:
        lock.acquire()
    try:
        proc, lines, reader = _start((["-m"] if multirun else []) + QUICK, tmp_path)
        _wait_for(proc, lines, lambda: any("waiting for stage" in ln for ln in lines), "wait for the lock")
        assert _interrupted(proc, lines, reader) == INTERRUPTED
    finally:
        for lock in locks:
            lock.release()


@pytest.mark.slow  # a training run interrupted in a subprocess: 13 s (CI runs -m slow; test_store's resume too)
def test_ctrl_c_while_training_is_one_line(tmp_path, store):
    """During training: the interrupt line, or (where the training loop saves a checkpoint on SIGINT) Preempted's."""
    args = ["weak=tiny_random_l4", "strong=tiny_random_l3", "train=full", "task.n_train=400", "task.n_test=64",
            "train.batch_size=4", "train.epochs=2", "train.checkpoint_every=3", "progress=false", "logger=none"]
    proc, lines, reader = _start(args, tmp_path)
    _wait_for(proc, lines, lambda: any((store / "partial").glob("*/checkpoint.pt")), "training checkpoint")
    _interrupted(proc, lines, reader, accept=(INTERRUPTED, "stopped by SIGINT at step"))
