"""The training workers' batch sources: endless batches of decoded rows per dataset, read from the
Ray Data shards Ray Train hands each worker (the recipe's `RowStream`).

    InMemoryData / LocalStream   "memory" mode: every training row read once into Arrow tables,
                                 batches sampled locally (a reshuffled permutation per epoch)
    ShardStream                  "stream" mode: a dataset's shard iterated epoch after epoch, for
                                 corpora that do not fit in memory

Each stream's position is `state()` = {"seed", "epoch", "position"}; `restore(state)` continues
exactly there. Every checkpoint records each rank's stream states (`bubogpt.training.recipe`), so a
resumed run trains on the rows an uninterrupted one would have. For that the rows must come in the
same order in every run: `InMemoryData` sorts each dataset's rows by id (Ray Data may deliver blocks
in any order), and stream mode reads with Ray Data's `preserve_order` and a seeded block order
(`workflows/train.py`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from workflows.data.prepared import decode_row_tensors


class StreamError(ValueError):
    """A dataset with no rows for this worker."""


def _decoded(rows: list[dict[str, Any]], manifest: dict) -> list[dict[str, Any]]:
    for row in rows:
        row.update(decode_row_tensors(row, manifest))
    return rows


class InMemoryData:
    """Every training row this worker samples from, read once from its Ray Data shard into memory
    (Arrow tables per dataset; media decoded per batch). For corpora that fit in memory: no
    per-epoch pipeline restarts, and ratio mixing draws from all datasets at no cost."""

    def __init__(self, shard, manifest: dict):
        import pyarrow as pa

        tables: dict[str, list] = {}
        for block in shard.iter_batches(batch_size=512, batch_format="pyarrow"):
            for name in set(block.column("dataset").to_pylist()):
                mask = pa.compute.equal(block.column("dataset"), name)
                tables.setdefault(name, []).append(block.filter(mask))
        # Sorted by id: the same row order whatever order the blocks arrived in, so a stream's state
        # (a permutation of row indices) names the same rows in every run.
        self.tables = {name: pa.concat_tables(parts).sort_by("id") for name, parts in tables.items()}
        self.manifest = manifest

    def stream(self, name: str, batch_size: int, seed: int) -> "LocalStream":
        if name not in self.tables or self.tables[name].num_rows == 0:
            raise StreamError(f"dataset {name}: no training rows were loaded")
        return LocalStream(self.tables[name], batch_size, self.manifest, seed)


class LocalStream:
    """Endless batches from one in-memory table: epoch e visits the rows in the e-th permutation
    drawn from `default_rng(seed)`."""

    def __init__(self, table, batch_size: int, manifest: dict, seed: int):
        self.table, self.batch_size, self.manifest, self.seed = table, batch_size, manifest, seed
        self.rng = np.random.default_rng(seed)
        self.epoch = -1  # no permutation drawn yet
        self.order, self.position = np.empty(0, dtype=np.int64), 0

    def _next_epoch(self) -> None:
        self.order, self.position = self.rng.permutation(self.table.num_rows), 0
        self.epoch += 1

    def next_rows(self) -> list[dict[str, Any]]:
        indices = []
        while len(indices) < min(self.batch_size, self.table.num_rows):
            if self.position >= len(self.order):
                self._next_epoch()
            take = self.order[self.position : self.position + self.batch_size - len(indices)]
            indices.extend(take.tolist())
            self.position += len(take)
        rows = self.table.take(indices).to_pylist()
        return _decoded(rows, self.manifest)

    def state(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position}

    def restore(self, state: dict[str, int]) -> None:
        """Continue from `state()` of a stream over the same table (replays the permutations)."""
        self.seed, self.rng = state["seed"], np.random.default_rng(state["seed"])
        self.epoch, self.order = -1, np.empty(0, dtype=np.int64)
        while self.epoch < state["epoch"]:
            self._next_epoch()
        self.position = state["position"]


class ShardStream:
    """Streaming alternative for corpora too big for memory: endless batches from one dataset's
    Ray Data shard, a new (reshuffled) epoch whenever one ends."""

    def __init__(self, name: str, shard, batch_size: int, manifest: dict, seed: int):
        self.name, self.shard, self.batch_size = name, shard, batch_size
        self.manifest, self.seed = manifest, seed
        self.epoch, self.position = 0, 0  # position: batches taken from this epoch
        self._batches = None

    def _open_epoch(self):
        return iter(self.shard.iter_batches(
            batch_size=self.batch_size, batch_format="pyarrow",
            local_shuffle_buffer_size=4 * self.batch_size, local_shuffle_seed=self.seed + self.epoch,
        ))  # fmt: skip

    def next_rows(self) -> list[dict[str, Any]]:
        for _ in range(2):
            if self._batches is None:
                self._batches = self._open_epoch()
            try:
                rows = next(self._batches).to_pylist()
            except StopIteration:
                self._batches = None
                self.epoch, self.position = self.epoch + 1, 0
                continue
            self.position += 1
            return _decoded(rows, self.manifest)
        raise StreamError(f"dataset {self.name}: this worker's shard has no rows (fewer rows than workers?)")

    def state(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position}

    def restore(self, state: dict[str, int]) -> None:
        """Continue from `state()`: reopen that epoch and skip the batches already taken (the same
        rows when the shard's blocks arrive in the same order)."""
        self.seed, self.epoch, self._batches = state["seed"], state["epoch"], None
        self._batches = self._open_epoch()
        for _ in range(state["position"]):
            next(self._batches)
        self.position = state["position"]
