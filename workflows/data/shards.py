"""Writing the prepared layout: rows -> PREPARED/<dataset>/<split>/*.parquet (layout: prepared.py).

Rows arrive as Arrow tables with the output columns plus two skip columns: a row whose
`skip_reason` is set stands for a record that was left out (`skip_path` says which file); it is
returned, not written. Files go through a pyarrow filesystem, so PREPARED may be a local folder or
object storage alike (see `prepared.resolve_location`).

Kept free of torch, Ray and the model code on purpose.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

SKIP_PATH, SKIP_REASON = "skip_path", "skip_reason"
ROW_GROUP_SIZE = 64  # rows per Parquet row group: a reader can stream a shard in small pieces


def write_shards(
    table: pa.Table, filesystem: pafs.FileSystem, root: str, file_stem: str, schema: pa.Schema
) -> dict[str, list]:
    """Writes the rows of `table` that are not skips, one file per (dataset, split), cast to `schema`.

    `root` is PREPARED's path inside `filesystem`. Returns
    {"files": [{"dataset", "split", "path" (relative to PREPARED), "rows"}],
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
        relative = f"{dataset}/{split}/{file_stem}.parquet"
        _write_table(rows, filesystem, f"{root}/{relative}")
        files.append({"dataset": dataset, "split": split, "path": relative, "rows": rows.num_rows})
    return {"files": files, "skipped": skipped}


def write_empty_shard(
    filesystem: pafs.FileSystem, root: str, dataset: str, split: str, schema: pa.Schema, file_stem: str
) -> str:
    """A zero-row shard, so that every prepared split has at least one file; returns its relative path."""
    relative = f"{dataset}/{split}/{file_stem}.parquet"
    _write_table(schema.empty_table(), filesystem, f"{root}/{relative}")
    return relative


def _write_table(table: pa.Table, filesystem: pafs.FileSystem, path: str) -> None:
    if isinstance(filesystem, pafs.LocalFileSystem):  # object stores have no folders to create
        filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pq.write_table(table, path, filesystem=filesystem, row_group_size=ROW_GROUP_SIZE)
