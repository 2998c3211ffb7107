"""Read back what a Weights & Biases offline run wrote: its ``run-<id>.wandb`` file is a LevelDB-style
log of protobuf records (wandb's own reader is in its Go service, not in Python)."""

import json
import struct
from pathlib import Path

BLOCK = 32768  # LevelDB log blocks
FILE_HEADER = 7  # b":W&B", a 2-byte magic, a 1-byte version
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    position, pieces = FILE_HEADER, b""
    while position + 7 <= len(data):
        left_in_block = BLOCK - position % BLOCK
        if left_in_block < 7:  # a block's tail too short for a record header is padding
            position += left_in_block
            continue
        length, kind = struct.unpack("<HB", data[position + 4 : position + 7])
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (FULL, FIRST):
            pieces = chunk
        elif kind in (MIDDLE, LAST):
            pieces += chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            yield record


def offline_runs(run_dir) -> list[Path]:
    """The run files of every offline W&B run under ``run_dir``, oldest first."""
    return sorted(Path(run_dir, "wandb").glob("offline-run-*/run-*.wandb"))


def history(path: Path) -> tuple[str, dict[str, dict[int, float]]]:
    """(the run's id, {metric: {step: value}}) of one offline run file."""
    run_id, metrics = "", {}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
        elif kind == "history":
            step = record.history.step.num
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                if not key.startswith("_"):  # wandb's own: _step, _runtime, _timestamp
                    metrics.setdefault(key, {})[step] = json.loads(item.value_json)
    return run_id, metrics
