"""Read an offline W&B run back from its ``run-<id>.wandb`` file (test helper, not a test).

Offline W&B writes neither ``wandb-summary.json`` nor ``config.yaml``; everything it logged
is in ``run-<id>.wandb``, a LevelDB-style log:

* a 7-byte file header (``:W&B`` magic, a 2-byte version, 1 byte);
* then 32 KiB blocks, each holding chunks with a 7-byte header: crc32 (u32, little endian),
  payload length (u16), chunk type (u8: FULL=1, FIRST=2, MIDDLE=3, LAST=4). A record that
  does not fit in the rest of a block is split into FIRST/MIDDLE.../LAST chunks; when fewer
  than 7 bytes remain in a block they are zero padding;
* each reassembled payload is a ``wandb.proto.wandb_internal_pb2.Record``.

`read_wandb_run` returns the history rows (key -> decoded JSON value, nested keys joined
with "."), the final summary and the config.
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BLOCK_SIZE = 32 * 1024
HEADER_SIZE = 7
FILE_HEADER_SIZE = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


@dataclass
class WandbRun:
    """What a run logged: history rows, summary and config (values decoded from JSON)."""

    path: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    num_records: int = 0
    finished: bool = False

    @property
    def run_dir(self) -> Path:
        return self.path.parent

    def rows_with(self, key: str) -> list[dict[str, Any]]:
        """History rows that contain ``key``."""
        return [row for row in self.history if key in row]

    def table_refs(self, key: str) -> list[dict[str, Any]]:
        """The references of every table logged under ``key`` (one per history row).

        A logged table arrives as flattened nested keys (``key._type``, ``key.path``, ...).
        """
        refs = []
        prefix = key + "."
        for row in self.history:
            ref = {k[len(prefix) :]: v for k, v in row.items() if k.startswith(prefix)}
            if ref.get("_type") == "table-file":
                refs.append(ref)
        return refs

    def load_table(self, ref: dict[str, Any]) -> dict[str, Any]:
        """Open a logged table (``{"columns": [...], "data": [[...], ...]}``)."""
        return json.loads((self.run_dir / "files" / ref["path"]).read_text())


def iter_payloads(data: bytes) -> list[bytes]:
    """Split the bytes of a ``.wandb`` file into record payloads (chunks reassembled)."""
    if len(data) < FILE_HEADER_SIZE or data[:4] != b":W&B":
        raise ValueError(f"Expected a W&B run file starting with ':W&B', got {data[:4]!r}")
    payloads: list[bytes] = []
    pos = FILE_HEADER_SIZE
    pending: bytearray | None = None
    while pos + HEADER_SIZE <= len(data):
        left_in_block = BLOCK_SIZE - (pos % BLOCK_SIZE)
        if left_in_block < HEADER_SIZE:  # zero padding at the end of a block
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER_SIZE])
        pos += HEADER_SIZE
        chunk = data[pos : pos + length]
        pos += length
        if kind == 0 and length == 0:  # pre-allocated zeros: end of the written log
            break
        if len(chunk) < length:  # the writer is still appending this chunk
            break
        if kind == FULL:
            payloads.append(bytes(chunk))
        elif kind == FIRST:
            pending = bytearray(chunk)
        elif kind == MIDDLE and pending is not None:
            pending.extend(chunk)
        elif kind == LAST and pending is not None:
            pending.extend(chunk)
            payloads.append(bytes(pending))
            pending = None
        else:
            raise ValueError(f"Corrupt W&B log: chunk type {kind} at byte {pos - length - 7}")
    return payloads


def _key(item: Any) -> str:
    return ".".join(item.nested_key) if item.nested_key else item.key


def read_wandb_run(path: str | Path, timeout: float = 20.0) -> WandbRun:
    """Parse one ``run-<id>.wandb`` file (or the single one under a directory).

    ``run.finish()`` returns before the W&B service has necessarily written the last
    records, so this waits (up to ``timeout`` seconds) until the run's ``exit`` record is in
    the file, reading again while the file ends in a partly written record.
    """
    path = Path(path)
    if path.is_dir():
        found = sorted(path.rglob("run-*.wandb"))
        if len(found) != 1:
            raise ValueError(f"Expected exactly one run-*.wandb under {path}, found {found}")
        path = found[0]
    from google.protobuf.message import DecodeError

    deadline = time.monotonic() + timeout
    while True:
        # The W&B service may still be appending (a partly written chunk or record reads as
        # truncated or corrupt): read again until the exit record is there.
        try:
            run = _parse(path)
        except (DecodeError, ValueError) as err:
            if time.monotonic() > deadline:
                raise
            last_error: Exception | None = err
        else:
            if run.finished:
                return run
            last_error = None
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{path} has no exit record after {timeout} s (run not finished?)"
            ) from last_error
        time.sleep(0.05)


def _parse(path: Path) -> WandbRun:
    from wandb.proto import wandb_internal_pb2 as pb

    run = WandbRun(path=path)
    for payload in iter_payloads(path.read_bytes()):
        record = pb.Record()
        record.ParseFromString(payload)
        run.num_records += 1
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {_key(item): json.loads(item.value_json) for item in record.history.item}
            run.history.append(row)
        elif kind == "summary":
            for item in record.summary.update:
                run.summary[_key(item)] = json.loads(item.value_json)
            for item in record.summary.remove:
                run.summary.pop(_key(item), None)
        elif kind == "run":  # the config given to wandb.init arrives with the run record
            for item in record.run.config.update:
                run.config[_key(item)] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                run.config[_key(item)] = json.loads(item.value_json)
            for item in record.config.remove:
                run.config.pop(_key(item), None)
        elif kind == "exit":
            run.finished = True
    return run
