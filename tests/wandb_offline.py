"""Read back what W&B wrote in offline mode (run-<id>.wandb: a LevelDB-style log of protobuf records)."""

import json
import struct
from pathlib import Path
from typing import Any, Dict, Iterator, List

BLOCK = 32768
HEADER = 7  # ":W&B", magic (2 bytes), version (1 byte)


def _records(path: Path) -> Iterator[bytes]:
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B log"
    pos, buf = HEADER, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:  # zero padding to the end of the block
            pos += left
            continue
        if pos + 7 + length > len(data):  # a run killed mid-write leaves a truncated last record
            break
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk  # FULL, FIRST | MIDDLE, LAST
        if kind in (1, 4):
            yield buf


def read_run(path: Path) -> Dict[str, Any]:
    """{id, group, job_type, project, tags, config, summary, history} of one offline run file."""
    from wandb.proto import wandb_internal_pb2 as pb

    def items(updates):
        return {(u.key or "/".join(u.nested_key)): json.loads(u.value_json) for u in updates}

    # W&B names the file after the run id; a run killed before its first flush has no run record yet
    run: Dict[str, Any] = {"id": path.stem[len("run-"):], "config": {}, "summary": {}, "history": []}
    for raw in _records(path):
        r = pb.Record()
        r.ParseFromString(raw)
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run.update(id=r.run.run_id, group=r.run.run_group, job_type=r.run.job_type, project=r.run.project,
                       tags=list(r.run.tags))
            run["config"].update(items(r.run.config.update))
        elif kind == "config":
            run["config"].update(items(r.config.update))
        elif kind == "summary":
            run["summary"].update(items(r.summary.update))
        elif kind == "history":
            run["history"].append(items(r.history.item))
    # older wandb (< 0.17) writes a logged table or image as one summary value (a dict); newer ones as nested
    # keys ("results/_type", ...): give both forms the newer keys
    for k, v in list(run["summary"].items()):
        if isinstance(v, dict):
            for sub, value in v.items():
                run["summary"].setdefault(f"{k}/{sub}", value)
    run["config"] = {k: (v.get("value") if isinstance(v, dict) and "value" in v else v)
                     for k, v in run["config"].items()}
    return run


def read_runs(wandb_dir: Path) -> List[Dict[str, Any]]:
    return [read_run(p) for p in sorted(Path(wandb_dir).glob("offline-run-*/run-*.wandb"))]
