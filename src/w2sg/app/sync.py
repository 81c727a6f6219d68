"""``w2sg sync``: upload a sweep's offline W&B runs, in parallel, with retries, idempotently, never replacing a
run's history.

    w2sg sync [--jobs N] [--retries K] [--backoff S] [--dry-run] [--entity E --project P] <folders...>

Every ``offline-run-*`` folder beneath the given folders (a sweep folder, a run folder, a ``wandb`` folder or one
run folder itself) is uploaded with W&B's own ``wandb sync <folder>`` (a subprocess: :data:`SYNC_COMMAND`), up to
``--jobs`` at once. A failed upload (exit code, or no ``.synced`` marker afterwards: ``wandb sync`` reports a failed
upload as a message and may still exit 0) is retried ``--retries`` times with exponential backoff and jitter
(W&B answers a burst of uploads with HTTP 429). The summary names the uploaded, the already synced and the failed
folders (with the last error line of their output); the exit code is 1 when any failed.

Idempotent: W&B marks a folder it uploaded with ``run-<id>.wandb.synced`` next to ``run-<id>.wandb`` (wandb-core's
runsync writes it, "runsync: couldn't create .synced file" is its error; ``wandb/cli/beta_sync.py``
``_is_synced``: ``path.with_suffix(".wandb.synced").exists()``). A folder with that marker is skipped, so a rerun
uploads nothing twice (and the marker is what decides success, above).

Folders of one run id (a stage resumed by a requeued job, or ``recompute=``: docs/wandb.md, "Offline runs are uploaded
...") form one chain: uploaded one after another, never two of one id at once, in the order the runs started (the
run record's ``start_time``, which is also the order wandb-core itself uses, ``runsyncoperation.go``
``initAndPlan``; the folder name is not enough: two folders started in the same second are named ``...-<id>`` and
``...-<id>-1``). Different ids go in parallel. When a folder of a chain fails, the later ones of that id are not
uploaded (they would land before it) and are reported failed.

Not replacing the history of a run that is already on the server -- the decision, from the installed wandb:

* A plain ``wandb sync`` of a folder whose run already exists upserts the run and streams its history from offset
  0, replacing it (docs/wandb.md; wandb issues 3841, 5865).
* wandb <= 0.29 had ``wandb sync --append``. The installed wandb (0.31) removed it: ``wandb/cli/cli.py``
  ``sync()`` keeps ``--append``/``--mark-synced``/``--skip-console`` only to raise "The following options have been
  removed ... Downgrade to wandb<=0.29.0" (``--append`` is not even accepted any more).
* From 0.30 on, ``wandb sync`` is wandb-core's runsync. ``cli/beta_sync.py`` passes the sync process's own
  settings (``settings.to_proto()``, ``ServiceConnection.init_sync``), ``runsync/syncsettings.go``
  ``MakeSyncSettings`` clones them per file, and ``runupserter.InitRun`` resumes the run when
  ``params.Settings.GetResume() != ""`` (``runbranch.NewResumeBranch(...).UpdateForResume``: asks the server for
  the run's resume status and continues its history, config and file-stream offsets; the installed wandb-core
  binary holds ``runbranch.(*ResumeBranch).UpdateForResume`` and "Failed to get resume status for run %s").
  The ``resume`` flag inside the ``.wandb`` run record (``interface.py``: ``proto_run.resume = ...``) is not read
  for this, and grouping several files of one id into one ``wandb sync`` call (its ``-n`` help) does not resume
  either: every file gets the same settings.
* So: the first folder of an id is uploaded plainly (it creates the run); every later folder of the same id is
  uploaded with ``WANDB_RESUME=allow`` in the environment of its ``wandb sync`` (wandb's ``Settings.resume``,
  env ``WANDB_RESUME``), which appends its history to the run instead of replacing it; with wandb < 0.30,
  ``wandb sync --append`` instead (the advice in docs/wandb.md; not verifiable against the installed version). The
  stage's result and PGR never depend on it (they are in the store, ``metrics.json`` and the experiment's run).
  :func:`append_options` holds that choice.

Offline logging on compute nodes is ``logger.mode=offline`` (or ``WANDB_MODE=offline``): see
w2sg.run.tracking.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

# The upload command; the folder (and options) are appended. Tests point it at a fake.
SYNC_COMMAND: List[str] = [sys.executable, "-m", "wandb", "sync"]
SYNC_COMMAND_ENV = "W2SG_SYNC_COMMAND"  # overrides SYNC_COMMAND (split on whitespace), e.g. for a fake in tests

_NAME = re.compile(r"^offline-run-(\d{8}_\d{6})-(.+)$")


@dataclass
class Folder:
    path: Path
    run_id: str
    wandb_file: Path
    start: Tuple = ()  # sort key within a run id
    append: bool = False  # a later folder of an id: append to the run
    status: str = "pending"  # uploaded | synced (already) | failed | would upload
    attempts: int = 0
    error: str = ""

    @property
    def marker(self) -> Path:
        return self.wandb_file.with_suffix(".wandb.synced")

    def is_synced(self) -> bool:
        return self.marker.exists()


def append_options() -> Tuple[List[str], Dict[str, str]]:
    """(extra arguments, extra environment) that make ``wandb sync`` append a folder to an existing run instead
    of replacing it (see the module docstring)."""
    from importlib.metadata import version

    from packaging.version import Version

    if Version(version("wandb")) < Version("0.30"):
        return ["--append"], {}
    return [], {"WANDB_RESUME": "allow"}


def _start_time(wandb_file: Path) -> Optional[float]:
    """The run record's start time (seconds) in a ``.wandb`` file (a LevelDB-style log of protobuf records),
    reading no further than that record; None when it cannot be read."""
    try:
        from wandb.proto import wandb_internal_pb2 as pb

        with open(wandb_file, "rb") as f:
            data = f.read(1 << 20)
        if data[:4] != b":W&B":
            return None
        block, pos, buf = 32768, 7, b""
        while pos + 7 <= len(data):
            left = block - pos % block
            if left < 7:
                pos += left
                continue
            _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if length == 0 and kind == 0:
                pos += left
                continue
            if pos + 7 + length > len(data):
                return None
            chunk = data[pos + 7:pos + 7 + length]
            pos += 7 + length
            buf = chunk if kind in (1, 2) else buf + chunk
            if kind in (1, 4):
                record = pb.Record()
                record.ParseFromString(buf)
                if record.WhichOneof("record_type") == "run":
                    ts = record.run.start_time
                    return ts.seconds + ts.nanos / 1e9 if (ts.seconds or ts.nanos) else None
    except Exception:
        return None
    return None


def _folder(path: Path) -> Optional[Folder]:
    files = sorted(path.glob("run-*.wandb"))
    if not files:
        return None
    wandb_file = files[0]
    run_id = wandb_file.name[len("run-"):-len(".wandb")]
    m = _NAME.match(path.name)
    stamp = m.group(1) if m else ""
    suffix = 0
    if m and m.group(2) != run_id and m.group(2).startswith(run_id + "-"):
        tail = m.group(2)[len(run_id) + 1:]
        suffix = int(tail) if tail.isdigit() else 0
    start = _start_time(wandb_file)
    try:
        mtime = wandb_file.stat().st_mtime
    except OSError:
        mtime = 0.0
    # the run record's start time first; the folder name (second, then W&B's -1, -2 suffix) where it is missing
    key = (start if start is not None else float("inf"), stamp, suffix, mtime, str(path))
    return Folder(path=path, run_id=run_id, wandb_file=wandb_file, start=key)


def find_folders(roots: Iterable[Path]) -> Tuple[List[Folder], List[Path]]:
    """(every offline run folder beneath roots, once; the offline-run-* folders without a .wandb file)."""
    seen, found, empty = set(), [], []
    for root in roots:
        root = Path(root)
        candidates = [root] if root.name.startswith("offline-run-") else []
        for dirpath, dirnames, _ in os.walk(root):  # does not follow links (wandb/latest-run)
            for name in list(dirnames):
                if name.startswith("offline-run-"):
                    candidates.append(Path(dirpath) / name)
                    dirnames.remove(name)  # a run folder holds no run folders
        for path in candidates:
            real = path.resolve()
            if real in seen:
                continue
            seen.add(real)
            folder = _folder(path)
            if folder is None:
                empty.append(path)
            else:
                found.append(folder)
    return found, empty


def plan(folders: List[Folder]) -> List[List[Folder]]:
    """Chains of folders, one per run id, each in start order; every folder after an id's first appends."""
    by_id: Dict[str, List[Folder]] = {}
    for f in folders:
        by_id.setdefault(f.run_id, []).append(f)
    chains = []
    for run_id in sorted(by_id):
        chain = sorted(by_id[run_id], key=lambda f: f.start)
        for i, f in enumerate(chain):
            f.append = i > 0
        chains.append(chain)
    return chains


def _command() -> List[str]:
    override = os.environ.get(SYNC_COMMAND_ENV)
    return override.split() if override else list(SYNC_COMMAND)


def _last_error_line(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in reversed(lines):
        if re.search(r"error|fail|429|rate|exception|denied|refused|timed? ?out", line, re.I):
            return line
    return lines[-1] if lines else ""


@dataclass
class Options:
    retries: int = 3
    backoff: float = 5.0
    entity: Optional[str] = None
    project: Optional[str] = None
    extra_args: List[str] = field(default_factory=list)


def upload(folder: Folder, opts: Options, print_lock: threading.Lock) -> bool:
    """Upload one folder with retries; True when W&B marked it synced."""
    args = list(opts.extra_args)
    if opts.entity:
        args += ["--entity", opts.entity]
    if opts.project:
        args += ["--project", opts.project]
    env = dict(os.environ)
    if env.get("WANDB_MODE") in ("offline", "dryrun"):
        env.pop("WANDB_MODE")  # syncing is online by nature (wandb-core ignores it too)
    env.pop("WANDB_RESUME", None)  # only a later folder of an id resumes its run
    if folder.append:
        append_args, append_env = append_options()
        args += append_args
        env.update(append_env)
    cmd = _command() + args + [str(folder.path)]
    for attempt in range(opts.retries + 1):
        folder.attempts = attempt + 1
        try:
            proc = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, errors="replace")
            output, rc = proc.stdout or "", proc.returncode
        except OSError as e:
            output, rc = f"cannot run {cmd[0]}: {e}", 127
        if rc == 0 and folder.is_synced():
            folder.status, folder.error = "uploaded", ""
            return True
        folder.error = _last_error_line(output) or (f"exit code {rc}" if rc else "no .synced marker written")
        if re.search(r"no api key|wandb login|not authenticated", output, re.I):
            break  # no credentials: retrying cannot help
        if attempt < opts.retries:
            delay = opts.backoff * (2 ** attempt) * (1 + random.random()) if opts.backoff > 0 else 0.0
            with print_lock:
                print(f"retry {attempt + 1}/{opts.retries} of {folder.path} in {delay:.0f}s: {folder.error}",
                      file=sys.stderr, flush=True)
            time.sleep(delay)
    folder.status = "failed"
    return False


def run_chain(chain: List[Folder], opts: Options, print_lock: threading.Lock) -> None:
    """One run id's folders, in order; stop at the first failure (the later ones would land before it)."""
    failed: Optional[Folder] = None
    for folder in chain:
        if folder.is_synced():
            folder.status = "synced"
            continue
        if failed is not None:
            folder.status = "failed"
            folder.error = f"not uploaded: the earlier folder {failed.path.name} of run {folder.run_id} failed"
            continue
        if not upload(folder, opts, print_lock):
            failed = folder


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="w2sg sync", description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", type=Path,
                   help="sweep / run folders or wandb folders; every offline-run-* folder beneath is uploaded")
    p.add_argument("--jobs", "-j", type=int, default=8, help="uploads at once (different run ids; default 8)")
    p.add_argument("--retries", type=int, default=3, help="retries of a failed upload (default 3)")
    p.add_argument("--backoff", type=float, default=5.0,
                   help="first retry delay in seconds, doubled each retry, with jitter (default 5)")
    p.add_argument("--dry-run", action="store_true", help="list what would be uploaded, upload nothing")
    p.add_argument("--entity", "-e", help="upload to this W&B entity (wandb sync --entity)")
    p.add_argument("--project", "-p", help="upload to this W&B project (wandb sync --project)")
    args = p.parse_args(list(argv))
    if args.jobs < 1 or args.retries < 0 or args.backoff < 0:
        p.error("--jobs must be >= 1, --retries and --backoff >= 0")
    return args


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    missing = [str(f) for f in args.folders if not f.is_dir()]
    if missing:
        print(f"w2sg sync: no such folder: {', '.join(missing)}", file=sys.stderr)
        return 2
    folders, empty = find_folders(args.folders)
    for path in empty:
        print(f"skipped {path}: no run-*.wandb file in it", file=sys.stderr)
    if not folders:
        print("no offline W&B runs (offline-run-*) under " + ", ".join(map(str, args.folders)))
        return 0
    chains = plan(folders)
    if args.dry_run:
        for chain in chains:
            for f in chain:
                f.status = "synced" if f.is_synced() else "would upload"
                note = " (appends to the run)" if f.append and f.status != "synced" else ""
                print(f"{f.status:13s} {f.path}{note}")
        todo = sum(f.status == "would upload" for f in folders)
        print(f"dry run: {todo} to upload, {len(folders) - todo} already synced, {len(chains)} run ids")
        return 0
    opts = Options(retries=args.retries, backoff=args.backoff, entity=args.entity, project=args.project)
    lock = threading.Lock()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for future in [pool.submit(run_chain, chain, opts, lock) for chain in chains]:
            future.result()
    return summarize(folders)


def summarize(folders: List[Folder]) -> int:
    uploaded = [f for f in folders if f.status == "uploaded"]
    synced = [f for f in folders if f.status == "synced"]
    failed = [f for f in folders if f.status == "failed"]
    for f in uploaded:
        print(f"uploaded      {f.path}" + (" (appended)" if f.append else ""))
    for f in failed:
        tries = f" after {f.attempts} tries" if f.attempts > 1 else ""
        print(f"FAILED        {f.path}{tries}: {f.error}")
    print(f"{len(uploaded)} uploaded, {len(synced)} already synced, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
