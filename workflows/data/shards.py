"""Writing the prepared layout: rows -> PREPARED/<dataset>/<split>/*.parquet (layout: prepared.py).

Rows arrive as Arrow tables with the output columns plus two skip columns: a row whose
`skip_reason` is set stands for a record that was left out (`skip_path` says which file); it is
returned, not written. `ShardSink` runs `write_shards` in Ray Data's write tasks.

Kept free of torch and the model code on purpose: a Ray write task imports only this module.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data.block import Block, BlockAccessor
from ray.data.datasource import Datasink

SKIP_PATH, SKIP_REASON = "skip_path", "skip_reason"
ROW_GROUP_SIZE = 64  # rows per Parquet row group: a reader can stream a shard in small pieces


def write_shards(table: pa.Table, out_dir: str | Path, file_stem: str, schema: pa.Schema) -> dict[str, list]:
    """Writes the rows of `table` that are not skips, one file per (dataset, split), cast to `schema`.

    Returns {"files": [{"dataset", "split", "path", "rows"}],
             "skipped": [{"path", "reason", "dataset", "split"}]}.
    """
    is_skip = pc.is_valid(table[SKIP_REASON])
    skipped = [
        {"path": r[SKIP_PATH], "reason": r[SKIP_REASON], "dataset": r["dataset"], "split": r["split"]}
        for r in table.filter(is_skip).select([SKIP_PATH, SKIP_REASON, "dataset", "split"]).to_pylist()
    ]
    good = table.filter(pc.invert(is_skip)).select(schema.names).cast(schema)
    files = []
    for dataset, split in sorted(set(zip(good["dataset"].to_pylist(), good["split"].to_pylist()))):
        in_pair = pc.and_(pc.equal(good["dataset"], dataset), pc.equal(good["split"], split))
        rows = good.filter(in_pair).sort_by("id")
        path = Path(out_dir) / dataset / split / f"{file_stem}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(rows, path, row_group_size=ROW_GROUP_SIZE)
        files.append({"dataset": dataset, "split": split, "path": str(path), "rows": rows.num_rows})
    return {"files": files, "skipped": skipped}


def write_empty_shard(out_dir: str | Path, dataset: str, split: str, schema: pa.Schema) -> Path:
    """A zero-row shard, so that every prepared split has a folder with at least one file."""
    path = Path(out_dir) / dataset / split / "part-empty.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(schema.empty_table(), path)
    return path


class ShardSink(Datasink):
    """Each Ray Data write task writes its rows with `write_shards`; `results` gathers the returns."""

    def __init__(self, out_dir: str | Path, schema: pa.Schema, rows_per_file: int):
        self.out_dir, self.schema, self.rows_per_file = str(out_dir), schema, rows_per_file
        self.results: list[dict[str, list]] = []

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_file  # a write task gets about this many rows: few, large shards

    def write(self, blocks: Iterable[Block], ctx: Any) -> dict[str, list]:
        tables = [BlockAccessor.for_block(block).to_arrow() for block in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return {"files": [], "skipped": []}
        # A block whose binary column holds only nulls has the type "null": promote, then cast.
        table = pa.concat_tables(tables, promote_options="permissive")
        stem = f"part-{ctx.task_idx:05d}-{uuid.uuid4().hex[:8]}"
        return write_shards(table, self.out_dir, stem, self.schema)

    def on_write_complete(self, write_result: Any) -> None:
        # Runs on the driver, on this very object, once every write task has returned.
        self.results = list(write_result.write_returns)
