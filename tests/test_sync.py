"""w2sg sync: real offline W&B runs, uploaded by a fake ``wandb sync`` (no network)."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from w2sg.app import sync

MAKE_RUNS = textwrap.dedent("""
    import os, sys, wandb
    from w2sg.run.tracking import _reinit
    root = sys.argv[1]
    # a stage resumed by a later process (two folders of one id), then three other runs
    for d, run_id, values in [("job0", "stage-a", [0, 1]), ("job0", "stage-b", [5]), ("job1", "stage-a", [2, 3]),
                              ("job1", "exp-c", []), ("job1", "stage-d", [7])]:
        os.makedirs(f"{root}/{d}", exist_ok=True)  # wandb < 0.18 falls back to the temp folder otherwise
        run = wandb.init(id=run_id, project="w2sg", resume="allow", dir=f"{root}/{d}", reinit=_reinit())
        for v in values:
            run.log({"loss": v})
        run.finish()
""")

# records its argv, WANDB_RESUME and the time; fails the first FAKE_FAILS times for folders whose name holds
# FAKE_FAIL (with a 429 line); on success writes the marker the way wandb-core does
FAKE = textwrap.dedent("""
    import glob, json, os, sys, time
    folder = sys.argv[-1]
    start = time.time()
    time.sleep(0.4)
    log = os.environ["FAKE_SYNC_LOG"]
    fail = os.environ.get("FAKE_FAIL")
    if fail and fail in os.path.basename(folder):
        counter = log + ".fails"
        n = int(open(counter).read()) if os.path.exists(counter) else 0
        if n < int(os.environ.get("FAKE_FAILS", "1000")):
            open(counter, "w").write(str(n + 1))
            print("wandb: uploading", folder)
            print("wandb: ERROR Error uploading run: returned error 429: rate limit exceeded")
            with open(log, "a") as f:
                f.write(json.dumps({"folder": folder, "ok": False, "start": start, "end": time.time()}) + "\\n")
            sys.exit(1)
    for w in glob.glob(os.path.join(folder, "run-*.wandb")):
        open(w + ".synced", "w").close()
    with open(log, "a") as f:
        f.write(json.dumps({"folder": folder, "ok": True, "argv": sys.argv[1:],
                            "resume": os.environ.get("WANDB_RESUME"), "mode": os.environ.get("WANDB_MODE"),
                            "start": start, "end": time.time()}) + "\\n")
""")


@pytest.fixture(scope="module")
def offline_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs") / "sweep"
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DISABLE_GIT="true",
               WANDB_CONSOLE="off")
    subprocess.run([sys.executable, "-c", MAKE_RUNS, str(root)], env=env, check=True, timeout=120)
    return root


@pytest.fixture
def sweep(offline_runs, tmp_path, monkeypatch):
    root = tmp_path / "sweep"
    shutil.copytree(offline_runs, root, symlinks=True)
    fake = tmp_path / "fake_wandb_sync.py"
    fake.write_text(FAKE)
    monkeypatch.setattr(sync, "SYNC_COMMAND", [sys.executable, str(fake)])
    monkeypatch.delenv(sync.SYNC_COMMAND_ENV, raising=False)
    monkeypatch.setenv("FAKE_SYNC_LOG", str(tmp_path / "calls.jsonl"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("FAKE_FAIL", raising=False)
    return root


def calls(tmp_path):
    log = tmp_path / "calls.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def run_id(folder):
    return next(Path(folder).glob("run-*.wandb")).stem[len("run-"):]


def folders(root):
    return sorted(p for p in root.rglob("offline-run-*") if p.is_dir() and not p.is_symlink())


def test_finds_every_offline_folder_once(sweep):
    found, empty = sync.find_folders([sweep, sweep / "job0" / "wandb"])  # overlapping roots
    assert sorted(f.path for f in found) == folders(sweep) and len(found) == 5 and not empty
    chains = {c[0].run_id: c for c in sync.plan(found)}
    assert [len(c) for c in chains.values()].count(2) == 1
    a = chains["stage-a"]
    assert "job0" in str(a[0].path) and "job1" in str(a[1].path)  # in start order
    assert [f.append for f in a] == [False, True]


def test_uploads_all_in_parallel_same_id_in_order_then_idempotent(sweep, tmp_path, capsys):
    assert sync.main(["--jobs", "4", "--retries", "0", str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "5 uploaded, 0 already synced, 0 failed" in out
    log = calls(tmp_path)
    assert sorted(c["folder"] for c in log) == [str(p) for p in folders(sweep)]  # each once
    assert all(c["mode"] is None for c in log)  # WANDB_MODE=offline is not passed on to the upload
    same = sorted((c for c in log if run_id(c["folder"]) == "stage-a"), key=lambda c: c["start"])
    assert "job0" in same[0]["folder"] and "job1" in same[1]["folder"]
    assert same[0]["end"] <= same[1]["start"]  # never two uploads of one id at once
    # the later folder appends to the run (wandb >= 0.30: WANDB_RESUME=allow; before: --append)
    extra_args, extra_env = sync.append_options()
    assert same[0]["resume"] is None and "--append" not in same[0]["argv"]
    assert same[1]["resume"] == extra_env.get("WANDB_RESUME") and all(a in same[1]["argv"] for a in extra_args)
    assert all(c["resume"] is None for c in log if run_id(c["folder"]) != "stage-a")
    # different ids ran at the same time
    overlap = max(sum(c["start"] < d["end"] and d["start"] < c["end"] for c in log) for d in log)
    assert overlap > 1
    # a rerun uploads nothing
    assert sync.main([str(sweep)]) == 0
    assert "0 uploaded, 5 already synced, 0 failed" in capsys.readouterr().out
    assert len(calls(tmp_path)) == 5


def test_retries_then_succeeds(sweep, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_FAIL", "stage-b")
    monkeypatch.setenv("FAKE_FAILS", "2")
    assert sync.main(["--retries", "2", "--backoff", "0", str(sweep)]) == 0
    assert "5 uploaded" in capsys.readouterr().out
    b = [c for c in calls(tmp_path) if "stage-b" in c["folder"]]
    assert [c["ok"] for c in b] == [False, False, True]


def test_failure_is_named_and_blocks_later_folders_of_its_id(sweep, tmp_path, monkeypatch, capsys):
    first_a = next(p for p in folders(sweep / "job0") if run_id(p) == "stage-a")
    monkeypatch.setenv("FAKE_FAIL", first_a.name)  # the first folder of stage-a (name unique in job0)
    assert sync.main(["--retries", "1", "--backoff", "0", str(sweep / "job0"), str(sweep / "job1")]) == 1
    out = capsys.readouterr().out
    assert f"FAILED        {first_a} after 2 tries: wandb: ERROR Error uploading run: returned error 429" in out
    assert "not uploaded: the earlier folder" in out and "3 uploaded, 0 already synced, 2 failed" in out
    log = calls(tmp_path)
    assert not any(c["ok"] and run_id(c["folder"]) == "stage-a" for c in log)  # the later one waits
    # once the failure is gone, a rerun uploads just the two of stage-a, in order
    monkeypatch.delenv("FAKE_FAIL")
    assert sync.main(["--backoff", "0", str(sweep)]) == 0
    assert "2 uploaded, 3 already synced, 0 failed" in capsys.readouterr().out
    new = [c for c in calls(tmp_path)[len(log):]]
    assert [run_id(c["folder"]) for c in new] == ["stage-a", "stage-a"] and new[0]["folder"] == str(first_a)


def test_dry_run_uploads_nothing(sweep, tmp_path, capsys):
    (folders(sweep)[0] / f"run-{run_id(folders(sweep)[0])}.wandb.synced").touch()
    assert sync.main(["--dry-run", str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "dry run: 4 to upload, 1 already synced, 4 run ids" in out
    assert out.count("would upload") == 4 and "(appends to the run)" in out
    assert calls(tmp_path) == []


def test_missing_folder_and_empty_folder(sweep, tmp_path, capsys):
    assert sync.main([str(tmp_path / "nope")]) == 2
    (tmp_path / "empty").mkdir()
    assert sync.main([str(tmp_path / "empty")]) == 0
    assert "no offline W&B runs" in capsys.readouterr().out


def test_entity_project_passed_on(sweep, tmp_path):
    assert sync.main(["--entity", "me", "--project", "proj", "--jobs", "8", str(sweep)]) == 0
    for c in calls(tmp_path):
        assert c["argv"][:4] == ["--entity", "me", "--project", "proj"] or \
            c["argv"][-5:-1] == ["--entity", "me", "--project", "proj"]
