"""``records.jsonl``: the per-example results of an evaluation, appended and flushed one by one.

Each line is one finished example keyed by ``(dataset, method, id)``. Because a line is written (and ``fsync``-ed)
as soon as its example finishes, an interrupted run loses at most the examples that were in flight, and a rerun with
the same output directory skips every key already present (:meth:`RecordStore.done_keys`). A line cut short by a
crash is ignored on reading and overwritten on the next append.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from searchrl.errors import InvalidRequest

RECORDS_FILE = "records.jsonl"
RecordKey = tuple[str, str, str]


def record_key(record: Mapping[str, Any]) -> RecordKey:
    """``(dataset, method, id)`` of a record."""
    return (str(record["dataset"]), str(record["method"]), str(record["id"]))


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """All complete records of a ``records.jsonl`` file, in file order; the last record wins for a repeated key.

    A final line without its newline (a write cut short) is ignored.

    Raises:
        InvalidRequest: the file does not exist, or a complete line is not a JSON record with dataset/method/id.
    """
    p = Path(path)
    if p.is_dir():
        p = p / RECORDS_FILE
    if not p.is_file():
        raise InvalidRequest(f"no records file at {p}")
    by_key: dict[RecordKey, dict[str, Any]] = {}
    text = p.read_text(encoding="utf-8")
    lines = text.split("\n")
    if not text.endswith("\n"):
        lines = lines[:-1]  # torn last line
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            key = record_key(rec)
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise InvalidRequest(f"{p}:{lineno}: not an evaluation record ({exc})") from None
        by_key.pop(key, None)
        by_key[key] = rec
    return list(by_key.values())


class RecordStore:
    """Append-only store of evaluation records in ``<out_dir>/records.jsonl``.

    Args:
        out_dir: the evaluation's output directory (created if missing).

    Thread-safe; every :meth:`append` writes one line, flushes and fsyncs before returning.
    """

    def __init__(self, out_dir: str | Path) -> None:
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / RECORDS_FILE
        self._lock = threading.Lock()
        self._records: dict[RecordKey, dict[str, Any]] = {}
        if self.path.exists():
            self._repair_tail()
            for rec in read_records(self.path):
                self._records[record_key(rec)] = rec
        self._fh = self.path.open("a", encoding="utf-8")

    def _repair_tail(self) -> None:
        """Cuts a torn last line (no trailing newline) so the next append starts on a fresh line."""
        size = self.path.stat().st_size
        if size == 0:
            return
        with self.path.open("rb+") as fh:
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) == b"\n":
                return
            fh.seek(0)
            data = fh.read()
            cut = data.rfind(b"\n") + 1
            fh.truncate(cut)

    def done_keys(self) -> set[RecordKey]:
        """Keys of the records already stored."""
        with self._lock:
            return set(self._records)

    def records(self) -> list[dict[str, Any]]:
        """Every stored record (one per key), in the order first written."""
        with self._lock:
            return list(self._records.values())

    def __len__(self) -> int:
        return len(self._records)

    def append(self, record: Mapping[str, Any]) -> None:
        """Writes one record as a line and makes it durable (flush + fsync)."""
        rec = dict(record)
        line = json.dumps(rec, ensure_ascii=False, default=str)
        with self._lock:
            self._fh.write(line + "\n")
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._records[record_key(rec)] = rec

    def close(self) -> None:
        with self._lock:
            if not self._fh.closed:
                self._fh.close()

    def __enter__(self) -> RecordStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
