"""Reading a prepared corpus (the output of `bubogpt data prepare`): plain Python, no Ray.

Layout (a contract: training, evaluation and serving tests read it):

    PREPARED/manifest.json
    PREPARED/<dataset>/<split>/*.parquet      dataset in DATASETS, split in SPLITS

Columns of every shard:

    dataset, split, id, instruction, answer   str
    meta                                      str, a JSON object (ground truth the source carries)
    pixel_values    binary | null   float16, C order, (3, S, S): the eval-transformed image
    fbank           binary | null   float16, C order, (clips, 1, mel_bins, frames): normalised fbank
                                    clips, evenly spaced over the audio
    vision_tokens   binary | null   only when prepared with a features model: float16 (T, D) frozen
    audio_tokens    binary | null   encoder outputs (see workflows/prepare.py)

The manifest gives the shapes (`shapes`), the row counts (`counts[dataset][split]`), the records
that were left out (`skipped`) and the Arrow schema; `decode_row_tensors` turns a row's bytes back
into tensors with those shapes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

MANIFEST_FILE = "manifest.json"
DATASETS = ("wavcaps", "cc_sbu_align", "llava_instruct", "clotho", "vggss", "negative_pairs")
SPLITS = ("train", "eval")
TEXT_COLUMNS = ("dataset", "split", "id", "instruction", "answer", "meta")
MEDIA_COLUMNS = ("pixel_values", "fbank")
FEATURE_COLUMNS = ("vision_tokens", "audio_tokens")
STORAGE_DTYPE = np.float16

_MANIFEST_KEYS = ("preset", "image_size", "audio", "shapes", "dtype", "features", "counts", "skipped", "schema")


class PreparedDataError(ValueError):
    """A prepared corpus or one of its rows is unusable; the message names the file or column."""


def read_manifest(prepared_dir: str | Path) -> dict[str, Any]:
    """PREPARED/manifest.json, checked for the keys consumers rely on."""
    path = Path(prepared_dir) / MANIFEST_FILE
    if not path.is_file():
        raise PreparedDataError(f"{prepared_dir} is not a prepared corpus: {MANIFEST_FILE} not found")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PreparedDataError(f"{path}: unreadable manifest: {err}") from err
    missing = [key for key in _MANIFEST_KEYS if key not in manifest]
    if missing:
        raise PreparedDataError(f"{path}: manifest lacks {missing}")
    if manifest["dtype"] != "float16":
        raise PreparedDataError(f"{path}: unsupported tensor dtype {manifest['dtype']!r}")
    return manifest


def shard_paths(prepared_dir: str | Path, dataset: str, split: str) -> list[Path]:
    """The Parquet shards of one dataset split, in name order (may be empty of rows, never absent)."""
    if dataset not in DATASETS or split not in SPLITS:
        raise PreparedDataError(f"unknown dataset/split {dataset}/{split}; expected {DATASETS} x {SPLITS}")
    folder = Path(prepared_dir) / dataset / split
    paths = sorted(folder.glob("*.parquet"))
    if not paths:
        raise PreparedDataError(f"{folder}: no Parquet shards (was this split prepared?)")
    return paths


def read_split(
    prepared_dir: str | Path, dataset: str, split: str, columns: list[str] | None = None
) -> pa.Table:
    """All rows of one dataset split as one Arrow table (fine for small corpora; stream otherwise)."""
    return pa.concat_tables(pq.read_table(path, columns=columns) for path in shard_paths(prepared_dir, dataset, split))


def decode_tensor(
    data: bytes | None, shape: list[int] | tuple[int, ...], column: str = "tensor", dtype: torch.dtype = torch.float32
) -> torch.Tensor | None:
    """float16 C-order bytes -> a tensor of `shape` and `dtype`; None stays None."""
    if data is None:
        return None
    expected = int(np.prod(shape)) * np.dtype(STORAGE_DTYPE).itemsize
    if len(data) != expected:
        raise PreparedDataError(
            f"{column}: {len(data)} bytes, expected {expected} for float16 of shape {list(shape)}"
        )
    array = np.frombuffer(data, dtype=STORAGE_DTYPE).reshape(shape)
    return torch.from_numpy(array.astype(np.float32)).to(dtype)  # astype copies: the tensor is writable


def decode_row_tensors(
    row: dict[str, Any], manifest: dict[str, Any], dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor | None]:
    """{column: tensor or None} for every tensor column of the manifest that the row carries.

    A row read with a subset of columns yields only those. Shapes come from `manifest["shapes"]`.
    """
    decoded = {}
    for column, shape in manifest["shapes"].items():
        if column in row:
            where = f"{column} of row {row.get('dataset')}/{row.get('split')}/{row.get('id')}"
            decoded[column] = decode_tensor(row[column], shape, where, dtype)
    return decoded
