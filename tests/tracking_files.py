"""Reading back what the tracking services wrote, without their servers: W&B's offline run files and MLflow."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Iterator

BLOCK = 32768  # W&B's run file is LevelDB's log format: 32 KiB blocks of (crc32, length, type) records


def _records(path: Path) -> Iterator[Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, parts = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = pb.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def wandb_run(path: Path) -> dict[str, Any]:
    """One offline run file as {id, name, group, tags, config, history: [row], summary, exit_code}."""
    out: dict[str, Any] = {"config": {}, "history": [], "summary": {}, "exit_code": None}
    for r in _records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out.update(id=r.run.run_id, name=r.run.display_name, group=r.run.run_group, tags=list(r.run.tags))
            out["config"].update({_key(i): json.loads(i.value_json) for i in r.run.config.update})
        elif kind == "config":
            out["config"].update({_key(i): json.loads(i.value_json) for i in r.config.update})
        elif kind == "history":
            out["history"].append({_key(i): json.loads(i.value_json) for i in r.history.item})
        elif kind == "summary":
            out["summary"].update({_key(i): json.loads(i.value_json) for i in r.summary.update})
        elif kind == "exit":
            out["exit_code"] = r.exit.exit_code
    return out


def wandb_runs(folder: Path, run_id: str) -> list[dict[str, Any]]:
    """Every offline run file of `run_id` under a W&B dir (a resumed run has one per attempt), oldest first."""
    return [wandb_run(p) for p in sorted(folder.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))]


def series(history: list[dict[str, Any]], key: str) -> dict[int, float]:
    """{trainer/global_step: value} of one metric in a W&B history."""
    return {int(row["trainer/global_step"]): row[key] for row in history if key in row}


def mlflow_series(client: Any, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def tensorboard_scalars(folder: Path, tag: str) -> dict[int, float]:
    """{step: value} of one scalar in the TensorBoard event files under `folder` (TFRecord framing: u64 length,
    u32 crc, the Event proto, u32 crc)."""
    from tensorboardX.proto import event_pb2

    out = {}
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                if value.tag == tag:
                    out[event.step] = value.simple_value
    return out
