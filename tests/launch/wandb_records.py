"""Read the records of an offline wandb run file (`run-ID.wandb`): a LevelDB-style log of protobuf Records.

    file  = ":W&B" 0xBEE1(le16) version(u8), then 32 KiB blocks
    chunk = crc32c(le32) length(le16) type(u8: 1 full, 2 first, 3 middle, 4 last) payload
A block with fewer than 7 bytes left is zero-padded. Checksums are not verified here.
"""
from __future__ import annotations

import json
import struct

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def raw_records(path: str) -> list[bytes]:
    data = open(path, "rb").read()
    assert data[:4] == b":W&B" and struct.unpack("<H", data[4:6])[0] == 0xBEE1, f"{path} is not a wandb run file"
    pos, records, pending = HEADER, [], b""
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:
            pos += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if kind == 0 and length == 0:   # padding at the end of the file
            break
        payload = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == FULL:
            records.append(payload)
        elif kind == FIRST:
            pending = payload
        elif kind == MIDDLE:
            pending += payload
        elif kind == LAST:
            records.append(pending + payload)
            pending = b""
    return records


def read_run(path: str) -> dict:
    """{"config": {...}, "history": [{key: value}, ...], "summary": {...}} of one run file."""
    from wandb.proto import wandb_internal_pb2 as pb
    run = {"config": {}, "history": [], "summary": {}}
    key = lambda item: item.key or "/".join(item.nested_key)  # noqa: E731
    for payload in raw_records(path):
        record = pb.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            run["history"].append({key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            run["summary"].update({key(i): json.loads(i.value_json) for i in record.summary.update})
        elif kind in ("config", "run"):
            updates = record.config.update if kind == "config" else record.run.config.update
            run["config"].update({key(i): json.loads(i.value_json) for i in updates})
    return run
