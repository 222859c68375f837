"""Reading a prepared corpus (the output of `bubogpt data prepare`): plain Python, no Ray.

PREPARED is a local folder or a URI of any pyarrow filesystem (`s3://bucket/prefix`,
`gs://bucket/prefix`, `file:///abs/path`); credentials and endpoints come from the environment as
pyarrow reads them (for S3: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT_URL).

Layout (a contract: training, evaluation and serving tests read it):

    PREPARED/manifest.json
    PREPARED/<dataset>/<split>/*.parquet      dataset in DATASETS, split in SPLITS

The manifest lists the shards of every split (`files[dataset][split]`, paths relative to
PREPARED), and readers read exactly those: on object storage a folder may also hold shards of a
run that failed or of an output being replaced, which no manifest lists. `shard_paths` is the way
to find a split's shards (a manifest written before `files` existed falls back to the folder's
*.parquet).

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
import pyarrow.fs as pafs
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


# --------------------------------------------------------------------------------------------------
# Locations: a local path or a pyarrow filesystem URI
# --------------------------------------------------------------------------------------------------


def is_uri(location: str | Path) -> bool:
    return "://" in str(location)


def resolve_location(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) of a local path (made absolute) or a URI such as s3://bucket/x."""
    if is_uri(location):
        try:
            filesystem, path = pafs.FileSystem.from_uri(str(location))
        except (pa.ArrowInvalid, OSError) as err:
            raise PreparedDataError(f"{location}: not a usable filesystem URI: {err}") from err
        return filesystem, path.rstrip("/")
    return pafs.LocalFileSystem(), str(Path(location).resolve())


def join_location(location: str | Path, relative: str) -> str:
    """A location (local path or URI) + a "/"-separated relative path, in the location's own form."""
    if is_uri(location):
        return f"{str(location).rstrip('/')}/{relative}"
    return str(Path(location) / relative)


def read_manifest(prepared_dir: str | Path) -> dict[str, Any]:
    """PREPARED/manifest.json, checked for the keys consumers rely on."""
    filesystem, root = resolve_location(prepared_dir)
    path = f"{root}/{MANIFEST_FILE}"
    try:
        with filesystem.open_input_stream(path) as stream:
            text = stream.read().decode("utf-8")
    except FileNotFoundError:
        raise PreparedDataError(f"{prepared_dir} is not a prepared corpus: {MANIFEST_FILE} not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise PreparedDataError(f"{join_location(prepared_dir, MANIFEST_FILE)}: unreadable manifest: {err}") from err
    path = join_location(prepared_dir, MANIFEST_FILE)  # for messages: as the user wrote it
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as err:
        raise PreparedDataError(f"{path}: unreadable manifest: {err}") from err
    missing = [key for key in _MANIFEST_KEYS if key not in manifest]
    if missing:
        raise PreparedDataError(f"{path}: manifest lacks {missing}")
    if manifest["dtype"] != "float16":
        raise PreparedDataError(f"{path}: unsupported tensor dtype {manifest['dtype']!r}")
    return manifest


def shard_paths(
    prepared_dir: str | Path, dataset: str, split: str, manifest: dict[str, Any] | None = None
) -> list[str]:
    """The Parquet shards of one dataset split, in name order (may be empty of rows, never absent).

    Each is a local path or a URI, like `prepared_dir`: what `ray.data.read_parquet` and
    `pyarrow.parquet` take. `manifest`: the corpus' manifest, when the caller has read it already.
    """
    return [join_location(prepared_dir, path) for path in _split_shards(prepared_dir, dataset, split, manifest)]


def read_split(
    prepared_dir: str | Path, dataset: str, split: str, columns: list[str] | None = None
) -> pa.Table:
    """All rows of one dataset split as one Arrow table (fine for small corpora; stream otherwise)."""
    filesystem, root = resolve_location(prepared_dir)
    shards = _split_shards(prepared_dir, dataset, split)
    return pa.concat_tables(pq.read_table(f"{root}/{path}", columns=columns, filesystem=filesystem) for path in shards)


def _split_shards(
    prepared_dir: str | Path, dataset: str, split: str, manifest: dict[str, Any] | None = None
) -> list[str]:
    """The split's shards relative to PREPARED ("<dataset>/<split>/<name>.parquet"), sorted."""
    if dataset not in DATASETS or split not in SPLITS:
        raise PreparedDataError(f"unknown dataset/split {dataset}/{split}; expected {DATASETS} x {SPLITS}")
    manifest = read_manifest(prepared_dir) if manifest is None else manifest
    if "files" in manifest:
        shards = manifest["files"].get(dataset, {}).get(split, [])
    else:  # written before the manifest listed its files: every shard in the folder
        filesystem, root = resolve_location(prepared_dir)
        found = filesystem.get_file_info(pafs.FileSelector(f"{root}/{dataset}/{split}", allow_not_found=True))
        shards = [f"{dataset}/{split}/{info.base_name}" for info in found if info.base_name.endswith(".parquet")]
    if not shards:
        folder = join_location(prepared_dir, f"{dataset}/{split}")
        raise PreparedDataError(f"{folder}: no Parquet shards (was this split prepared?)")
    return sorted(shards)


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
