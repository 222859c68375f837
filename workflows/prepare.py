"""`bubogpt data prepare`: a corpus in the original formats -> preprocessed Parquet shards, on Ray Data.

Pipeline (one Ray Data dataset; each piece is plain Python usable without Ray):

    driver: INPUT/corpus.json --read_corpus_spec--> ReadUnits (a split's index file, or one tar)
            --load_indexes, plan_chunks-->          Chunks: slices of each index (each index file is
                                                    parsed once, here), tars whole
    --map_batches(ChunkPreparer), an actor pool of ActorPoolStrategy(min_size=1, max_size=workers);
      each call runs prepare_chunk on one chunk:
            readers (workflows/data/readers.py)  -> raw records; a file a reader refuses (missing,
                                                    malformed entry) becomes a *skip row*
            Preprocessor                         -> float16 tensor bytes; decoding is done here,
                                                    once, and a file that fails to decode or
                                                    preprocess becomes a skip row as well
            write_shards                         -> OUT/<dataset>/<split>/part-<run>-<chunk>-<k>.parquet
                                                    (skip rows are not written, they are returned)
    driver: the chunks' results -> OUT/manifest.json (counts, the shard list, skipped records,
            shapes, schema), written last

Why one actor stage does it all: the tensors never travel through the object store, and no other
worker process starts (a Ray worker costs about a second of CPU to start, torch's import three).
Chunks are small (about CHUNKS_PER_WORKER per actor) and one at a time per actor, so actors finish
together; tars are read whole (a tar streams) and go first.

Bad records never fail the job: they are logged with their path and listed in the manifest's
`skipped`. Errors in the job's own setup (a wrong corpus.json, an output folder in use, a features
model that does not fit the preset, an unreachable bucket) raise `PrepareError` before any work
starts.

Output, all or nothing:
    local folder  The output is written to a sibling staging folder and moved into place at the
                  end (a rename), so a failed run leaves OUT as it was.
    object store  (any pyarrow filesystem URI: s3://bucket/prefix, gs://...) There is no rename.
                  Shards are written under their final names, unique to the run (part-<run>-...),
                  and manifest.json, which lists them, is written last, in one PUT. Readers go
                  through the manifest (workflows/data/prepared.py), so they see the previous
                  complete output or the new one, never a mix or a partial run. A failed run
                  deletes the shards it wrote (best effort) and leaves the previous manifest; a
                  run killed outright may leave unlisted shards, which no reader reads. With
                  --overwrite, the previous output's shards are deleted after the new manifest is
                  in place. (pyarrow leaves empty folder markers where it deleted files.) Credentials and endpoint come from the environment, as pyarrow reads
                  them (S3: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION,
                  AWS_ENDPOINT_URL), on the driver and on the nodes running the actors.

INPUT/corpus.json (what `bubogpt data synth` writes; write one by hand for real copies of the corpora):

    {"sets": {<dataset>: {"splits": {<split>: {<fields>}}}}}

    dataset is one of wavcaps, cc_sbu_align, llava_instruct, clotho, vggss, negative_pairs, and
    split one of train, eval; list only the sets and splits you have. Paths are relative to the
    folder holding corpus.json, or absolute. Fields per dataset (others, such as "count", are ignored):

    wavcaps          "shards": [tar, ...] or "path": one .tar or a folder of .tar files
                     (WavCaps webdataset: <id>.flac + <id>.json {"caption"}; list all four subsets'
                     tars together)
    cc_sbu_align     "path": the folder holding filter_cap.json and image/
    llava_instruct   "annotations": the LLaVA-Instruct JSON list, "image_dir": the COCO images
    clotho           "annotations": audio_cap.json, "audio_dir" (default: the annotations' folder)
    vggss            "annotations", "audio_dir", "image_dir"
    negative_pairs   "annotations", "audio_dir", "image_dir"

    Example for real copies:
    {"sets": {"cc_sbu_align": {"splits": {"train": {"path": "/data/cc_sbu_align"}}},
              "llava_instruct": {"splits": {"train": {"annotations": "/data/llava/llava_instruct_150k.json",
                                                      "image_dir": "/data/coco/train2014"}}}}}

Output: see workflows/data/prepared.py for the layout and columns (a contract other code reads).
Images use the inference transform (bicubic, resized as the preset's `image_eval_resize` says) and
audio evenly spaced clips without SpecAugment. With `features_model`, the frozen encoders' output tokens
are stored too, so training can skip the encoders (they never change in training); the trade-off,
also stated in the manifest: no input augmentation (no random crops, random clips or SpecAugment)
for a run that reads them.

On a cluster (`address`), INPUT must be on a filesystem every node (and the driver) sees, OUT on
such a filesystem or on object storage, and the nodes need this package installed.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import shutil
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import ray
import torch

from bubogpt.atomic import replace_directory, staging_directory
from bubogpt.config import PRESETS, BuboGPTConfig
from bubogpt.preprocess import (
    AudioPreprocessConfig,
    ImagePreprocessConfig,
    audio_to_fbank_clips,
    decode_audio,
    decode_image,
    image_transform,
)
from workflows.data import readers
from workflows.data.prepared import (
    DATASETS,
    MANIFEST_FILE,
    SPLITS,
    STORAGE_DTYPE,
    PreparedDataError,
    read_manifest,
    resolve_location,
)
from workflows.data.shards import SKIP_PATH, SKIP_REASON, write_empty_shard, write_shards
from workflows.ray_connect import connect

logger = logging.getLogger(__name__)

# Rows between the read stage and the preprocessing stage: a reader record, or a skip row.
PIPELINE_SCHEMA = readers.RECORD_SCHEMA.append(pa.field(SKIP_PATH, pa.string())).append(
    pa.field(SKIP_REASON, pa.string())
)
# Chunks per actor the corpus is cut into (when it has that many batches): the last chunks run
# while other actors have nothing left to do, so they should be short.
CHUNKS_PER_WORKER = 16
AUGMENTATION_NOTE = (
    "none: pixel_values use the inference transform (bicubic, the preset's image_eval_resize), fbank evenly "
    "spaced clips without SpecAugment; vision_tokens/audio_tokens (when present) are the frozen "
    "encoders' outputs on exactly these inputs, so a run that reads them trains without input "
    "augmentation"
)


class PrepareError(ValueError):
    """The preparation job cannot start: bad corpus.json, output folder in use, mismatched model."""


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


@dataclass
class PrepareConfig:
    """What the Preprocessor computes; derived from a model preset so sizes match the encoders."""

    preset: str
    image: ImagePreprocessConfig
    audio: AudioPreprocessConfig
    features_model: str | None = None  # a native model directory (bubogpt/checkpoints/native.py)
    device: str = "cpu"  # where the frozen encoders run when features_model is set

    @classmethod
    def from_preset(
        cls, preset: str = "tiny", features_model: str | Path | None = None, device: str = "cpu"
    ) -> "PrepareConfig":
        if preset not in PRESETS:
            raise PrepareError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
        model = PRESETS[preset]()
        config = cls(
            preset=preset,
            image=ImagePreprocessConfig.for_model(model),
            audio=AudioPreprocessConfig.for_model(model),
            features_model=None if features_model is None else str(Path(features_model).resolve()),
            device=device,
        )
        if features_model is not None:
            config.check_features_model(read_model_config(features_model))
        return config

    def check_features_model(self, model: BuboGPTConfig) -> None:
        """The model's encoders must read exactly the tensors this config produces."""
        wanted = {
            "image size": (self.image.image_size, model.vision.img_size),
            "mel bins": (self.audio.num_mel_bins, model.audio.num_mel_bins),
            "fbank frames": (self.audio.target_length, model.audio.target_length),
        }
        for what, (ours, theirs) in wanted.items():
            if ours != theirs:
                raise PrepareError(
                    f"features model {self.features_model}: its encoders read {what} {theirs}, "
                    f"preset {self.preset!r} prepares {ours}; pass the matching --preset"
                )

    def shapes(self) -> dict[str, list[int]]:
        """Shape of every tensor column, as stored (float16, C order)."""
        size, audio = self.image.image_size, self.audio
        shapes = {
            "pixel_values": [3, size, size],
            "fbank": [audio.total_clips, 1, audio.num_mel_bins, audio.target_length],
        }
        if self.features_model is not None:
            model = read_model_config(self.features_model)
            shapes["vision_tokens"] = [model.vision.num_patches + 1, model.vision.embed_dim]
            shapes["audio_tokens"] = [model.audio.num_patches + 1, model.audio.embed_dim]
        return shapes

    def output_schema(self) -> pa.Schema:
        """The Parquet schema of every shard (see workflows/data/prepared.py)."""
        fields = [(name, pa.string()) for name in ("dataset", "split", "id", "instruction", "answer", "meta")]
        fields += [(name, pa.binary()) for name in self.shapes()]
        return pa.schema(fields)


def read_model_config(model_dir: str | Path) -> BuboGPTConfig:
    from bubogpt.checkpoints.native import CONFIG_FILE

    path = Path(model_dir) / CONFIG_FILE
    if not path.is_file():
        raise PrepareError(f"features model {model_dir} is not a BuboGPT model directory (no {CONFIG_FILE})")
    return BuboGPTConfig.load(path)


def load_frozen_encoders(model_dir: str | Path, device: str = "cpu") -> tuple[torch.nn.Module, torch.nn.Module]:
    """(audio encoder, vision encoder) of a native model directory; the rest (LLM) is not loaded."""
    # Imported here: the model code (and transformers) is only needed with a features model.
    from bubogpt.checkpoints.native import WEIGHTS_FILE, load_weights
    from bubogpt.modeling_audio import ImageBindAudioEncoder
    from bubogpt.modeling_vision import EvaVisionEncoder

    config = read_model_config(model_dir)
    weights = Path(model_dir) / WEIGHTS_FILE
    audio, vision = ImageBindAudioEncoder(config.audio), EvaVisionEncoder(config.vision)
    for prefix, encoder in (("audio_encoder.", audio), ("vision_encoder.", vision)):
        load_weights(encoder, weights, prefix)  # reads only this encoder's tensors; strict: none missing
    return audio.to(device).eval().requires_grad_(False), vision.to(device).eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------------
# Read: corpus.json -> read units -> reader records (+ skip rows)
# --------------------------------------------------------------------------------------------------

# Path fields of each dataset's corpus.json entry: (required, optional). wavcaps is handled apart.
_SPEC_FIELDS = {
    "cc_sbu_align": (("path",), ()),
    "llava_instruct": (("annotations", "image_dir"), ()),
    "clotho": (("annotations",), ("audio_dir",)),
    "vggss": (("annotations", "audio_dir", "image_dir"), ()),
    "negative_pairs": (("annotations", "audio_dir", "image_dir"), ()),
}


@dataclass(frozen=True)
class ReadUnit:
    """One reader call: a dataset split's index file, or one WavCaps tar. Paths are absolute."""

    dataset: str
    split: str
    paths: tuple[tuple[str, str], ...]  # (field, path) pairs: hashable and picklable

    def to_row(self) -> dict[str, str]:
        return {"dataset": self.dataset, "split": self.split, "paths": json.dumps(dict(self.paths))}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "ReadUnit":
        return cls(str(row["dataset"]), str(row["split"]), tuple(json.loads(row["paths"]).items()))


def read_corpus_spec(input_dir: str | Path) -> list[ReadUnit]:
    """INPUT/corpus.json -> the read units (format in the module docstring); every path must exist."""
    input_dir = Path(input_dir).resolve()
    spec_path = input_dir / "corpus.json"
    try:
        spec = json.loads(spec_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PrepareError(f"{input_dir} holds no corpus.json (see workflows/prepare.py for its format)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PrepareError(f"{spec_path}: unreadable or not JSON: {err}") from err
    sets = spec.get("sets") if isinstance(spec, dict) else None
    if not isinstance(sets, dict) or not sets:
        raise PrepareError(f'{spec_path}: no "sets" object')

    units = []
    for dataset, entry in sets.items():
        if dataset not in DATASETS:
            raise PrepareError(f"{spec_path}: unknown set {dataset!r}; expected some of {DATASETS}")
        splits = entry.get("splits") if isinstance(entry, dict) else None
        if not isinstance(splits, dict) or not splits:
            raise PrepareError(f'{spec_path}: set {dataset!r} has no "splits" object')
        for split, fields in splits.items():
            where = f"{spec_path}: sets.{dataset}.splits.{split}"
            if split not in SPLITS:
                raise PrepareError(f"{where}: unknown split; expected some of {SPLITS}")
            if not isinstance(fields, dict):
                raise PrepareError(f"{where}: not an object")
            units += _split_units(dataset, split, fields, input_dir, where)
    return units


def _spec_path(fields: dict[str, Any], key: str, root: Path, where: str) -> str:
    value = fields.get(key)
    if not isinstance(value, str) or not value:
        raise PrepareError(f'{where}: missing or invalid "{key}"')
    path = root / value  # an absolute value replaces root
    if not path.exists():
        raise PrepareError(f'{where}: "{key}" {path} does not exist')
    return str(path)


def _split_units(dataset: str, split: str, fields: dict[str, Any], root: Path, where: str) -> list[ReadUnit]:
    if dataset == "wavcaps":
        # One unit per tar, so the shards are read in parallel.
        if "shards" in fields:
            shards = fields["shards"]
            if not isinstance(shards, list) or not shards:
                raise PrepareError(f'{where}: "shards" must be a non-empty list of .tar paths')
            tars = [_spec_path({"shards": s}, "shards", root, where) for s in shards]
        else:
            path = Path(_spec_path(fields, "path", root, where))
            tars = [str(p) for p in sorted(path.glob("*.tar"))] if path.is_dir() else [str(path)]
            if not tars:
                raise PrepareError(f"{where}: no .tar files in {path}")
        return [ReadUnit(dataset, split, (("path", tar),)) for tar in tars]
    required, optional = _SPEC_FIELDS[dataset]
    paths = [(key, _spec_path(fields, key, root, where)) for key in required]
    paths += [(key, _spec_path(fields, key, root, where)) for key in optional if key in fields]
    return [ReadUnit(dataset, split, tuple(paths))]


@dataclass(frozen=True)
class Chunk:
    """One actor call: up to `records_per_chunk` entries of a split's index, or one WavCaps tar.

    `entries` is the slice of the index (loaded once, on the driver) starting at entry `first`;
    None for a tar, which is read whole (a tar streams: no cheap way to start in its middle).
    The actor reads, preprocesses and writes the chunk: one Parquet file, named after `number`.
    """

    unit: ReadUnit
    number: int
    entries: tuple[Any, ...] | None = None
    first: int = 0

    def to_row(self) -> dict[str, Any]:
        entries = None if self.entries is None else json.dumps(self.entries)
        return {**self.unit.to_row(), "number": self.number, "entries": entries, "first": self.first}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "Chunk":
        entries = None if row["entries"] is None else tuple(json.loads(row["entries"]))
        return cls(ReadUnit.from_row(row), int(row["number"]), entries, int(row["first"]))


def load_index(unit: ReadUnit, skips: readers.SkipLog) -> list[Any] | None:
    """The entries of the unit's index file (an unusable index: [] and a skip); None for a tar."""
    paths = dict(unit.paths)
    if unit.dataset == "wavcaps":
        return None
    if unit.dataset == "cc_sbu_align":
        return readers.load_annotations(Path(paths["path"]) / readers.CC_SBU_ALIGN_INDEX, skips)
    if unit.dataset == "llava_instruct":
        return readers.load_entry_list(paths["annotations"], skips)
    return readers.load_annotations(paths["annotations"], skips)


def load_indexes(units: list[ReadUnit]) -> tuple[list[tuple[ReadUnit, list | None]], list[dict[str, str]]]:
    """(unit, its index entries or None for a tar) for every unit, and the skips of index files
    that could not be used ({"path", "reason", "dataset", "split"})."""
    indexed, index_skips = [], []
    for unit in units:
        skips = readers.SkipLog()
        indexed.append((unit, load_index(unit, skips)))
        index_skips += [{**entry, "dataset": unit.dataset, "split": unit.split} for entry in skips.entries]
    return indexed, index_skips


def plan_chunks(indexed: list[tuple[ReadUnit, list | None]], records_per_chunk: int) -> list[Chunk]:
    """Tars whole, indexes cut into slices of `records_per_chunk` entries. Tars come first, then
    full slices, then the short last slices: the largest work goes out first, a short tail last."""
    tars, slices = [], []
    for unit, entries in indexed:
        if entries is None:
            tars.append((unit, None, 0))
        for first in range(0, len(entries or ()), records_per_chunk):
            slices.append((unit, tuple(entries[first : first + records_per_chunk]), first))
    slices.sort(key=lambda item: -len(item[1]))  # stable: full slices keep the corpus order
    return [Chunk(unit, number, entries, first) for number, (unit, entries, first) in enumerate(tars + slices)]


def chunk_size(index_entries: int, workers: int, batch_size: int, rows_per_file: int) -> int:
    """Entries per chunk: about CHUNKS_PER_WORKER chunks per actor (when there are that many
    Preprocessor batches), so that the last chunks, which run while other actors have nothing left
    to do, are short; at most `rows_per_file`."""
    wanted = math.ceil(index_entries / (workers * CHUNKS_PER_WORKER))
    return max(1, min(rows_per_file, max(batch_size, wanted)))


def _open_reader(chunk: Chunk, skips: readers.SkipLog) -> Iterator[dict[str, Any]]:
    unit = chunk.unit
    paths = dict(unit.paths)
    # validate=False: the Preprocessor decodes every file anyway, and turns one that fails into a skip.
    common = {"split": unit.split, "dataset": unit.dataset, "skips": skips, "validate": False}
    if unit.dataset == "wavcaps":
        return readers.read_wavcaps(paths["path"], **common)
    common.update(entries=list(chunk.entries), first=chunk.first)
    if unit.dataset == "cc_sbu_align":
        return readers.read_cc_sbu_align(paths["path"], **common)
    if unit.dataset == "llava_instruct":
        return readers.read_llava_instruct(paths["annotations"], paths["image_dir"], **common)
    if unit.dataset == "clotho":
        return readers.read_clotho(paths["annotations"], paths.get("audio_dir"), **common)
    if unit.dataset == "vggss":
        return readers.read_vggss(paths["annotations"], paths["audio_dir"], paths["image_dir"], **common)
    if unit.dataset == "negative_pairs":
        return readers.read_negative_pairs(paths["annotations"], paths["image_dir"], paths["audio_dir"], **common)
    raise PrepareError(f"no reader for dataset {unit.dataset!r}")


def _skip_row(dataset: str, split: str, path: str, reason: str) -> dict[str, Any]:
    row = dict.fromkeys(PIPELINE_SCHEMA.names)
    row.update(dataset=dataset, split=split, id="", instruction="", answer="", meta="{}")
    row.update({SKIP_PATH: path, SKIP_REASON: reason})
    return row


def read_chunk_records(chunk: Chunk) -> Iterator[dict[str, Any]]:
    """The chunk's reader records, then one skip row per file the reader left out (PIPELINE_SCHEMA rows).

    Media are not decoded here (the Preprocessor does it once, and skips what fails)."""
    unit, skips = chunk.unit, readers.SkipLog()
    produced = 0
    try:
        for record in _open_reader(chunk, skips):
            produced += 1
            yield {**record, SKIP_PATH: None, SKIP_REASON: None}
    except (OSError, ValueError) as err:  # readers skip bad data themselves; this guards the rest
        source = next(iter(dict(unit.paths).values()))
        skips.add(source, f"reader stopped after {produced} records: {type(err).__name__}: {err}")
    for entry in skips.entries:
        yield _skip_row(unit.dataset, unit.split, entry["path"], entry["reason"])


def records_to_batch(records: Iterable[dict[str, Any]]) -> dict[str, np.ndarray]:
    """PIPELINE_SCHEMA rows -> the numpy batch a Preprocessor takes (what Ray Data hands it)."""
    records = list(records)
    return {name: _object_array([r.get(name) for r in records]) for name in PIPELINE_SCHEMA.names}


def _object_array(values: list[Any]) -> np.ndarray:
    array = np.empty(len(values), dtype=object)  # np.array() would split bytes/str into characters
    array[:] = values
    return array


# --------------------------------------------------------------------------------------------------
# Preprocess: one batch of records -> float16 tensor bytes
# --------------------------------------------------------------------------------------------------


def tensor_to_bytes(tensor: torch.Tensor) -> bytes:
    """Any float tensor -> float16 C-order bytes (the storage format of every tensor column)."""
    return tensor.detach().to("cpu", torch.float16).contiguous().numpy().tobytes()


class _RecordError(Exception):
    def __init__(self, path: str, reason: str):
        super().__init__(reason)
        self.path, self.reason = path, reason


class Preprocessor:
    """Records (PIPELINE_SCHEMA rows) -> rows of the output columns + the skip columns.

    Plain Python: `prepare_chunk` (in the pipeline's actors, or in a loop without Ray) calls
    `preprocess`; `__call__` takes a batch of numpy columns, as Ray Data's map_batches hands them.
    Skip rows pass through; a record whose media fail to decode or preprocess becomes a skip row
    (logged with its path) instead of failing the batch. The encoders, when any, load once.
    """

    def __init__(self, config: PrepareConfig):
        self.config = config
        self.image_transform = image_transform(config.image, train=False)
        self.tensor_columns = list(config.shapes())
        self.encoders = None
        if config.features_model is not None:
            self.encoders = load_frozen_encoders(config.features_model, config.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [{name: batch[name][i] for name in batch} for i in range(len(batch["id"]))]
        out = self.preprocess(rows)
        return {name: _object_array([r[name] for r in out]) for name in out[0]} if out else {}

    def preprocess(
        self, rows: list[dict[str, Any]], pixel_cache: dict[str, torch.Tensor | _RecordError] | None = None
    ) -> list[dict[str, Any]]:
        """PIPELINE_SCHEMA rows -> output rows (tensors as float16 bytes). `pixel_cache` maps an image
        path to its pixels or its error: LLaVA's turns of one image decode it once."""
        pixel_cache = {} if pixel_cache is None else pixel_cache
        out: list[dict[str, Any]] = []
        for row in rows:
            result = {name: row[name] for name in ("dataset", "split", "id", "instruction", "answer", "meta")}
            result.update(pixel_values=None, fbank=None, skip_path=row[SKIP_PATH], skip_reason=row[SKIP_REASON])
            if row[SKIP_REASON] is None:
                try:
                    result["pixel_values"] = self._pixel_values(row, pixel_cache)
                    result["fbank"] = self._fbank(row)
                except _RecordError as err:
                    logger.warning("skipped %s: %s", err.path, err.reason)
                    result.update(pixel_values=None, fbank=None, skip_path=err.path, skip_reason=err.reason)
            out.append(result)
        if self.encoders is not None:
            self._add_features(out)
        for result in out:  # tensors -> float16 bytes
            for name in self.tensor_columns:
                value = result.get(name)
                result[name] = None if value is None else tensor_to_bytes(value)
        return out

    def _pixel_values(self, row: dict[str, Any], cache: dict[str, Any]) -> torch.Tensor | None:
        """(3, S, S) float32, already rounded to float16 values (so features match the stored image)."""
        if row["image"] is None:
            return None
        path = row["image_path"] or f"{row['dataset']}/{row['split']}/{row['id']} (image)"
        if path not in cache:
            try:
                cache[path] = self.image_transform(decode_image(row["image"])).to(torch.float16).float()
            except (ValueError, OSError, RuntimeError) as err:  # MediaError is a ValueError
                cache[path] = _RecordError(path, f"image preprocessing failed: {err}")
        if isinstance(cache[path], _RecordError):
            raise cache[path]
        return cache[path]

    def _fbank(self, row: dict[str, Any]) -> torch.Tensor | None:
        """(clips, 1, mel_bins, frames) float32, rounded to float16 values."""
        if row["audio"] is None:
            return None
        path = row["audio_path"] or f"{row['dataset']}/{row['split']}/{row['id']} (audio)"
        try:
            waveform, sample_rate = decode_audio(row["audio"], max_seconds=self.config.audio.max_seconds)
            fbank = audio_to_fbank_clips(waveform, sample_rate, self.config.audio, train=False)
        except (ValueError, OSError, RuntimeError) as err:
            raise _RecordError(path, f"audio preprocessing failed: {err}") from err
        return fbank.to(torch.float16).float()

    @torch.inference_mode()
    def _add_features(self, results: list[dict[str, Any]]) -> None:
        """vision_tokens / audio_tokens (T, D) for the rows that have that modality, one forward each."""
        audio_encoder, vision_encoder = self.encoders
        for source, column, encoder in (
            ("pixel_values", "vision_tokens", vision_encoder),
            ("fbank", "audio_tokens", audio_encoder),
        ):
            have = [r for r in results if r[source] is not None]
            for r in results:
                r[column] = None
            if have:
                inputs = torch.stack([r[source] for r in have]).to(self.config.device)  # (n, ...)
                tokens = encoder(inputs)  # (n, T, D)
                for r, row_tokens in zip(have, tokens):
                    r[column] = row_tokens


# --------------------------------------------------------------------------------------------------
# One chunk: read -> preprocess -> Parquet, in an actor of the pipeline or in a loop without Ray
# --------------------------------------------------------------------------------------------------


def prepare_chunk(
    chunk: Chunk,
    preprocessor: Preprocessor,
    filesystem: pafs.FileSystem,
    root: str,
    run_id: str,
    batch_size: int = 16,
    rows_per_file: int = 512,
) -> dict[str, list]:
    """Reads, preprocesses and writes one chunk under `root` (a path in `filesystem`), as
    `<dataset>/<split>/part-<run_id>-<chunk>-<k>.parquet`, a new file every `rows_per_file` records.

    Returns {"files": [{"dataset", "split", "path" (relative to root), "rows"}],
             "skipped": [{"path", "reason", "dataset", "split"}]}.
    """
    schema = preprocessor.config.output_schema()
    rows_schema = schema.append(pa.field(SKIP_PATH, pa.string())).append(pa.field(SKIP_REASON, pa.string()))
    result: dict[str, list] = {"files": [], "skipped": []}
    pending: list[dict[str, Any]] = []
    pixel_cache: dict[str, Any] = {}

    def flush() -> None:
        stem = f"part-{run_id}-{chunk.number:05d}-{len(result['files']):03d}"
        written = write_shards(pa.Table.from_pylist(pending, schema=rows_schema), filesystem, root, stem, schema)
        result["files"] += written["files"]
        result["skipped"] += written["skipped"]
        pending.clear()
        pixel_cache.clear()

    records, rows = read_chunk_records(chunk), 0  # rows: records in `pending` that are not skips
    while batch := list(itertools.islice(records, min(batch_size, rows_per_file - rows))):
        preprocessed = preprocessor.preprocess(batch, pixel_cache)
        pending += preprocessed
        rows += sum(row[SKIP_REASON] is None for row in preprocessed)
        if rows == rows_per_file:
            flush()
            rows = 0
    if pending:
        flush()
    return result


class ChunkPreparer:
    """The pipeline's actor: a batch of chunk rows -> one JSON result row per chunk (prepare_chunk)."""

    def __init__(
        self,
        config: PrepareConfig,
        filesystem: pafs.FileSystem,
        root: str,
        run_id: str,
        batch_size: int,
        rows_per_file: int,
    ):
        self.preprocessor = Preprocessor(config)
        self.output = {"filesystem": filesystem, "root": root, "run_id": run_id}
        self.batch_size, self.rows_per_file = batch_size, rows_per_file

    def __call__(self, chunks: pa.Table) -> pa.Table:
        results = [
            prepare_chunk(Chunk.from_row(row), self.preprocessor, **self.output, batch_size=self.batch_size,
                          rows_per_file=self.rows_per_file)
            for row in chunks.to_pylist()
        ]  # fmt: skip
        return pa.table({"result": [json.dumps(r) for r in results]})


# --------------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------------


def run_prepare(
    input_dir: str | Path,
    out_dir: str | Path,
    preset: str = "tiny",
    address: str | None = None,
    features_model: Path | None = None,
    *,
    overwrite: bool = False,
    workers: int | None = None,
    num_gpus: float = 0.0,
    batch_size: int = 16,
    rows_per_file: int = 512,
    progress: bool = True,
) -> dict[str, Any]:
    """Prepares INPUT (a corpus.json layout) into OUT with Ray Data; returns the manifest.

    OUT: a local folder or a pyarrow filesystem URI (s3://bucket/prefix, gs://...; see the module
    docstring for what each guarantees). address: an existing Ray cluster ("auto", "ray://...") or
    None for a local Ray (a Ray already initialised in this process is used as is). workers: the
    actor pool's maximum size (default: one per CPU free at the start, or per `num_gpus` share of
    the free GPUs). num_gpus: GPUs per actor, for the features encoders. batch_size: records per
    Preprocessor call. rows_per_file: the most rows in one shard. OUT must not exist or be empty;
    overwrite=True replaces a prepared corpus (one holding a manifest.json).
    """
    for name, value in (("workers", workers or 1), ("batch_size", batch_size), ("rows_per_file", rows_per_file)):
        if not isinstance(value, int) or value < 1:
            raise PrepareError(f"{name} must be a positive integer, got {value!r}")
    if num_gpus < 0:
        raise PrepareError(f"num_gpus must be >= 0, got {num_gpus}")
    config = PrepareConfig.from_preset(preset, features_model, device="cuda" if num_gpus > 0 else "cpu")
    units = read_corpus_spec(input_dir)
    try:
        filesystem, out_path = resolve_location(out_dir)
    except PreparedDataError as err:
        raise PrepareError(str(err)) from None
    local = isinstance(filesystem, pafs.LocalFileSystem)
    if local:
        _check_output_dir(Path(out_path), overwrite)
        previous = None
    else:
        previous = _check_output_store(filesystem, out_path, out_dir, overwrite)

    started_ray = not ray.is_initialized()
    if started_ray:
        connect(address)  # bounded: a one-line error instead of retrying a dead address
    data_context = ray.data.DataContext.get_current()
    saved_progress = data_context.enable_progress_bars
    data_context.enable_progress_bars = progress
    run_id = uuid.uuid4().hex[:8]
    if local:  # everything goes to a sibling staging folder, moved into place at the end
        root = str(staging_directory(out_path))
    else:  # shards under their final, run-unique names; the manifest, written last, publishes them
        root = out_path
    try:
        if workers is None:  # one actor per free CPU, or per `num_gpus` share of the free GPUs
            resources = ray.available_resources()  # not the total: other actors (Serve) may hold some
            available = resources.get("GPU", 0) / num_gpus if num_gpus else resources.get("CPU", 1)
            workers = max(1, int(available))
        indexed, index_skips = load_indexes(units)  # on the driver: each index file is read once
        index_entries = sum(len(entries) for _, entries in indexed if entries is not None)
        chunks = plan_chunks(indexed, chunk_size(index_entries, workers, batch_size, rows_per_file))
        preparer = {"config": config, "filesystem": filesystem, "root": root, "run_id": run_id,
                    "batch_size": batch_size, "rows_per_file": rows_per_file}  # fmt: skip
        results = _run_pipeline(chunks, preparer, workers, num_gpus) if chunks else []
        results.append({"files": [], "skipped": index_skips})
        schema = config.output_schema()
        # Every listed split gets at least one shard (maybe empty): readers never meet a missing split.
        written = {(f["dataset"], f["split"]) for result in results for f in result["files"]}
        for unit in units:
            if (unit.dataset, unit.split) not in written:
                path = write_empty_shard(filesystem, root, unit.dataset, unit.split, schema, f"part-{run_id}-empty")
                results.append({"files": [{"dataset": unit.dataset, "split": unit.split, "path": path, "rows": 0}],
                                "skipped": []})  # fmt: skip
                written.add((unit.dataset, unit.split))
        manifest_text = json.dumps(_manifest(config, units, results, schema, input_dir), indent=2)
        _write_text(filesystem, f"{root}/{MANIFEST_FILE}", manifest_text)  # last: it makes the output
        manifest = json.loads(manifest_text)  # what a reader of the file gets (lists, not tuples)
        if local:
            replace_directory(root, out_path)
        elif previous is not None:
            _delete_replaced_shards(filesystem, out_path, previous, manifest)
    except BaseException:
        if local:
            shutil.rmtree(root, ignore_errors=True)
        else:
            _delete_run_shards(filesystem, out_path, run_id)
        raise
    finally:
        data_context.enable_progress_bars = saved_progress
        if started_ray:
            ray.shutdown()
    _log_summary(manifest, out_dir)
    return manifest


def _run_pipeline(chunks: list[Chunk], preparer: dict[str, Any], workers: int, num_gpus: float) -> list[dict]:
    """The Ray Data pipeline: chunk rows -> ChunkPreparer actors -> their results, on the driver."""
    dataset = ray.data.from_items([chunk.to_row() for chunk in chunks], override_num_blocks=len(chunks))
    workers = min(workers, len(chunks))
    dataset = dataset.map_batches(
        ChunkPreparer,
        fn_constructor_kwargs=preparer,
        batch_size=1,  # one chunk per call
        batch_format="pyarrow",
        # Two chunks in flight per actor: the next one is there when a chunk ends (Ray Data notices
        # a finished task up to 0.1 s late), and at the end at most one short chunk waits behind
        # a busy actor while another is idle.
        compute=ray.data.ActorPoolStrategy(
            min_size=1, max_size=workers, initial_size=workers, max_tasks_in_flight_per_actor=2
        ),
        num_gpus=num_gpus or None,
    )
    return [json.loads(row["result"]) for row in dataset.take_all()]


def _check_output_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise PrepareError(f"output path {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise PrepareError(f"output folder {out} is not empty; pass overwrite=True (--overwrite) to replace it")
        if not (out / MANIFEST_FILE).is_file():
            raise PrepareError(f"refusing to overwrite {out}: it is not a prepared corpus (no {MANIFEST_FILE})")


def _check_output_store(
    filesystem: pafs.FileSystem, path: str, out: str | Path, overwrite: bool
) -> dict[str, Any] | None:
    """OUT on object storage: its bucket must exist, and OUT be empty or (overwrite) a prepared
    corpus, whose manifest is returned."""
    bucket = path.split("/", 1)[0]
    try:
        if filesystem.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise PrepareError(f"output {out}: bucket {bucket!r} does not exist")
        info = filesystem.get_file_info(path)
        if info.type == pafs.FileType.File:
            raise PrepareError(f"output {out} exists and is not a folder")
        if info.type == pafs.FileType.NotFound:
            return None
        # Only objects count: pyarrow leaves empty folder markers behind when it deletes files.
        everything = filesystem.get_file_info(pafs.FileSelector(path, recursive=True))
        if not any(entry.type == pafs.FileType.File for entry in everything):
            return None
        has_manifest = filesystem.get_file_info(f"{path}/{MANIFEST_FILE}").type == pafs.FileType.File
    except OSError as err:
        raise PrepareError(f"output {out}: cannot reach it: {err}") from err
    if not overwrite:
        raise PrepareError(f"output {out} is not empty; pass overwrite=True (--overwrite) to replace it")
    if not has_manifest:
        raise PrepareError(f"refusing to overwrite {out}: it is not a prepared corpus (no {MANIFEST_FILE})")
    try:
        return read_manifest(out)
    except PreparedDataError as err:
        raise PrepareError(f"refusing to overwrite {out}: {err}") from None


def _write_text(filesystem: pafs.FileSystem, path: str, text: str) -> None:
    with filesystem.open_output_stream(path) as stream:  # object stores: one PUT, when it closes
        stream.write(text.encode("utf-8"))


def _listed_shards(manifest: dict[str, Any]) -> set[str]:
    return {path for splits in manifest.get("files", {}).values() for paths in splits.values() for path in paths}


def _delete_replaced_shards(
    filesystem: pafs.FileSystem, path: str, previous: dict[str, Any], manifest: dict[str, Any]
) -> None:
    """After the new manifest is in place: the shards only the previous one listed."""
    for relative in sorted(_listed_shards(previous) - _listed_shards(manifest)):
        try:
            filesystem.delete_file(f"{path}/{relative}")
        except FileNotFoundError:
            pass


def _delete_run_shards(filesystem: pafs.FileSystem, path: str, run_id: str) -> None:
    """A failed run on object storage: deletes what it wrote (best effort; no manifest lists them)."""
    try:
        for info in filesystem.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True)):
            if info.type == pafs.FileType.File and info.base_name.startswith(f"part-{run_id}-"):
                filesystem.delete_file(info.path)
    except OSError as err:
        logger.warning("could not delete the shards of the failed run %s under %s: %s", run_id, path, err)


def _manifest(
    config: PrepareConfig,
    units: list[ReadUnit],
    results: list[dict[str, list]],
    schema: pa.Schema,
    input_dir: str | Path,
) -> dict[str, Any]:
    counts: dict[str, dict[str, int]] = {}
    files: dict[str, dict[str, list[str]]] = {}
    for unit in units:
        counts.setdefault(unit.dataset, {})[unit.split] = 0
        files.setdefault(unit.dataset, {})[unit.split] = []
    skipped = set()  # a bad image shared by several LLaVA turns is listed once
    for result in results:
        for f in result["files"]:
            counts[f["dataset"]][f["split"]] += f["rows"]
            files[f["dataset"]][f["split"]].append(f["path"])
        skipped |= {(s["dataset"], s["split"], s["path"], s["reason"]) for s in result["skipped"]}
    audio = config.audio
    return {
        "preset": config.preset,
        "image_size": config.image.image_size,
        "audio": {"clips": audio.total_clips, "mel_bins": audio.num_mel_bins, "frames": audio.target_length},
        "shapes": config.shapes(),
        "dtype": np.dtype(STORAGE_DTYPE).name,
        "features": config.features_model is not None,
        "features_model": config.features_model,
        "augmentation": AUGMENTATION_NOTE,
        "counts": counts,
        "files": {name: {split: sorted(paths) for split, paths in splits.items()} for name, splits in files.items()},
        "skipped": [dict(zip(("dataset", "split", "path", "reason"), entry)) for entry in sorted(skipped)],
        "schema": {f.name: str(f.type) for f in schema},
        "preprocess": {"image": asdict(config.image), "audio": asdict(config.audio)},
        "input": str(Path(input_dir).resolve()),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _log_summary(manifest: dict[str, Any], out: str | Path) -> None:
    total = sum(n for splits in manifest["counts"].values() for n in splits.values())
    logger.info("prepared %d records into %s (%d skipped)", total, out, len(manifest["skipped"]))
    for entry in manifest["skipped"]:
        logger.warning("skipped %s/%s %s: %s", entry["dataset"], entry["split"], entry["path"], entry["reason"])
