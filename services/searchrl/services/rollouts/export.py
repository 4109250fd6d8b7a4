"""Exporting the rollout stream to files: JSON lines (one ``MessageToDict`` object per trajectory) or parquet (the flat
columns of :func:`trajectory_row`). Used by ``searchrl rollouts export``."""

from __future__ import annotations

import json
from typing import Any

from google.protobuf.json_format import MessageToDict

from searchrl.rollout.v1 import rollout_pb2
from searchrl.services.rollouts.store import RolloutStore, num_searches


def trajectory_row(record: dict[str, Any]) -> dict[str, Any]:
    """One flat row for tables (parquet) of an exported record (see :func:`export`): its ids, token lists, reward
    and text columns, plus ``num_turns``, ``search_queries``, the timings as columns and ``turns`` as a JSON string."""
    turns = record["turns"]
    return {
        **record,
        "num_turns": len(turns),
        "search_queries": [t["search"]["query"] for t in turns if "search" in t],
        **record["timings"],
        "turns_json": json.dumps(turns),
    }


def _record(entry_id: str, trajectory: rollout_pb2.Trajectory) -> dict[str, Any]:
    """A stored trajectory as a dict: its proto3 JSON (the form of ``Episode.to_record``) plus ``stream_id`` and
    ``num_searches``."""
    record = MessageToDict(trajectory, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    return {**record, "stream_id": entry_id, "num_searches": num_searches(trajectory)}


def _parquet_schema() -> Any:
    import pyarrow as pa

    return pa.schema(
        [
            ("stream_id", pa.string()),
            ("id", pa.string()),
            ("question_id", pa.string()),
            ("question", pa.string()),
            ("golden_answers", pa.list_(pa.string())),
            ("prompt_ids", pa.list_(pa.int32())),
            ("response_ids", pa.list_(pa.int32())),
            ("loss_mask", pa.list_(pa.int8())),
            ("response_logprobs", pa.list_(pa.float32())),
            ("response_text", pa.string()),
            ("reward", pa.float32()),
            ("answer", pa.string()),
            ("finish_reason", pa.string()),
            ("policy_version", pa.string()),
            ("group_index", pa.int32()),
            ("num_turns", pa.int32()),
            ("num_searches", pa.int32()),
            ("search_queries", pa.list_(pa.string())),
            ("generation_ms", pa.float64()),
            ("search_ms", pa.float64()),
            ("reward_ms", pa.float64()),
            ("total_ms", pa.float64()),
            ("turns_json", pa.string()),
        ]
    )


async def export(
    store: RolloutStore, out: str, fmt: str = "jsonl", limit: int | None = None, progress: bool = False
) -> int:
    """Writes every trajectory of the stream (oldest first) to ``out``.

    ``jsonl``: one ``MessageToDict`` object per line (proto field names, default values included) plus ``stream_id``
    and ``num_searches``. ``parquet``: the flat columns of :func:`trajectory_row` of it (pyarrow), in row groups.

    Args:
        store: the rollout store.
        out: output file path.
        fmt: ``"jsonl"`` or ``"parquet"``.
        limit: stop after this many trajectories.
        progress: show a progress bar on stderr.

    Returns:
        The number of trajectories written.

    Raises:
        ValueError: unknown format.
        Unavailable: Redis is down.
    """
    if fmt not in ("jsonl", "parquet"):
        raise ValueError(f"unknown export format {fmt!r}; use jsonl or parquet")
    from rich.console import Console
    from rich.progress import Progress

    total = await store.length()
    if limit is not None:
        total = min(total, limit)
    written = 0
    with Progress(disable=not progress, transient=True, console=Console(stderr=True)) as bar:
        task = bar.add_task(f"exporting {store.stream}", total=total)
        if fmt == "jsonl":
            with open(out, "w", encoding="utf-8") as fh:
                async for entry_id, traj in store.iter_all():
                    if limit is not None and written >= limit:
                        break
                    fh.write(json.dumps(_record(entry_id, traj), ensure_ascii=False) + "\n")
                    written += 1
                    bar.advance(task)
            return written
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = _parquet_schema()
        rows: list[dict[str, Any]] = []
        with pq.ParquetWriter(out, schema) as writer:
            async for entry_id, traj in store.iter_all():
                if limit is not None and written >= limit:
                    break
                rows.append(trajectory_row(_record(entry_id, traj)))
                written += 1
                bar.advance(task)
                if len(rows) >= 1000:
                    writer.write_table(pa.Table.from_pylist(rows, schema=schema))
                    rows = []
            if rows or written == 0:
                writer.write_table(pa.Table.from_pylist(rows, schema=schema))
    return written
