"""`bubogpt data prepare`: a corpus in the original formats -> preprocessed Parquet shards, on Ray Data.

Pipeline (one Ray Data dataset; each stage is plain Python usable without Ray):

    INPUT/corpus.json --read_corpus_spec--> ReadUnits (one per index file or tar shard)
        --map_batches(read_units)-->       raw records (workflows/data/readers.py); a file a reader
                                           refuses becomes a *skip row* {skip_path, skip_reason}
        --map_batches(Preprocessor)-->     float16 tensor bytes (actor pool); a record whose
                                           preprocessing fails becomes a skip row as well
        --write_datasink(ShardSink)-->     OUT/<dataset>/<split>/part-*.parquet; skip rows are not
                                           written, they come back to the driver
    driver: OUT/manifest.json (counts, skipped records, shapes, schema)

Bad records never fail the job: they are logged with their path and listed in the manifest's
`skipped`. Errors in the job's own setup (a wrong corpus.json, an output folder in use, a features
model that does not fit the preset) raise `PrepareError` before any work starts.

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
Images use the inference transform (resize + center crop) and audio evenly spaced clips without
SpecAugment. With `features_model`, the frozen encoders' output tokens are stored too, so training
can skip the encoders (they never change in training); the trade-off, also stated in the manifest:
no input augmentation (no random crops, random clips or SpecAugment) for a run that reads them.

On a cluster (`address`), INPUT and OUT must be on a filesystem every node sees, and the nodes need
this package installed. The output is written to a sibling staging folder and moved into place at
the end, so a failed run leaves OUT untouched.
"""

from __future__ import annotations

import json
import logging
import shutil
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
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
from workflows.data.prepared import DATASETS, MANIFEST_FILE, SPLITS, STORAGE_DTYPE
from workflows.data.shards import SKIP_PATH, SKIP_REASON, ShardSink, write_empty_shard
from workflows.ray_connect import connect

logger = logging.getLogger(__name__)

# Rows between the read stage and the preprocessing stage: a reader record, or a skip row.
PIPELINE_SCHEMA = readers.RECORD_SCHEMA.append(pa.field(SKIP_PATH, pa.string())).append(
    pa.field(SKIP_REASON, pa.string())
)
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


def _open_reader(unit: ReadUnit, skips: readers.SkipLog) -> Iterator[dict[str, Any]]:
    paths, common = dict(unit.paths), {"split": unit.split, "dataset": unit.dataset, "skips": skips}
    if unit.dataset == "wavcaps":
        return readers.read_wavcaps(paths["path"], **common)
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


def read_unit_records(unit: ReadUnit) -> Iterator[dict[str, Any]]:
    """The unit's reader records, then one skip row per file the reader left out (PIPELINE_SCHEMA rows)."""
    skips = readers.SkipLog()
    produced = 0
    try:
        for record in _open_reader(unit, skips):
            produced += 1
            yield {**record, SKIP_PATH: None, SKIP_REASON: None}
    except (OSError, ValueError) as err:  # readers skip bad data themselves; this guards the rest
        source = next(iter(dict(unit.paths).values()))
        skips.add(source, f"reader stopped after {produced} records: {type(err).__name__}: {err}")
    for entry in skips.entries:
        yield _skip_row(unit.dataset, unit.split, entry["path"], entry["reason"])


def read_units(units: pa.Table, records_per_block: int = 16) -> Iterator[pa.Table]:
    """Ray Data stage: a batch of read-unit rows -> blocks of at most `records_per_block` records."""
    for row in units.to_pylist():
        block: list[dict[str, Any]] = []
        for record in read_unit_records(ReadUnit.from_row(row)):
            block.append(record)
            if len(block) == records_per_block:
                yield pa.Table.from_pylist(block, schema=PIPELINE_SCHEMA)
                block = []
        if block:
            yield pa.Table.from_pylist(block, schema=PIPELINE_SCHEMA)


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
    """A batch of records (PIPELINE_SCHEMA columns as numpy arrays) -> the output columns + skip columns.

    The Ray Data stage (an actor: the encoders, when any, load once in __init__), and a plain callable
    without Ray. Skip rows pass through; a record whose media fail to preprocess becomes a skip row
    (logged with its path) instead of failing the batch.
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
        pixel_cache: dict[str, torch.Tensor] = {}  # LLaVA: the turns of one image share it
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
        return {name: _object_array([r[name] for r in out]) for name in out[0]} if out else {}

    def _pixel_values(self, row: dict[str, Any], cache: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """(3, S, S) float32, already rounded to float16 values (so features match the stored image)."""
        if row["image"] is None:
            return None
        path = row["image_path"] or f"{row['dataset']}/{row['split']}/{row['id']} (image)"
        if path in cache:
            return cache[path]
        try:
            pixels = self.image_transform(decode_image(row["image"])).to(torch.float16).float()
        except (ValueError, OSError, RuntimeError) as err:  # MediaError is a ValueError
            raise _RecordError(path, f"image preprocessing failed: {err}") from err
        cache[path] = pixels
        return pixels

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

    address: an existing Ray cluster ("auto", "ray://...") or None for a local Ray (a Ray already
    initialised in this process is used as is). workers: Preprocessor actors (default: one per CPU
    free at the start, or per `num_gpus` share of the free GPUs). num_gpus: GPUs per actor, for the
    features encoders. batch_size: records per Preprocessor call. rows_per_file: about how many rows
    a write task puts in one shard. OUT must not exist or be empty; overwrite=True replaces a folder
    that holds a previous manifest.json.
    """
    for name, value in (("workers", workers or 1), ("batch_size", batch_size), ("rows_per_file", rows_per_file)):
        if not isinstance(value, int) or value < 1:
            raise PrepareError(f"{name} must be a positive integer, got {value!r}")
    if num_gpus < 0:
        raise PrepareError(f"num_gpus must be >= 0, got {num_gpus}")
    config = PrepareConfig.from_preset(preset, features_model, device="cuda" if num_gpus > 0 else "cpu")
    units = read_corpus_spec(input_dir)
    out = Path(out_dir).resolve()
    _check_output_dir(out, overwrite)

    started_ray = not ray.is_initialized()
    if started_ray:
        connect(address)  # bounded: a one-line error instead of retrying a dead address
    data_context = ray.data.DataContext.get_current()
    saved_progress = data_context.enable_progress_bars
    data_context.enable_progress_bars = progress
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_directory(out)
    try:
        if workers is None:  # one actor per free CPU, or per `num_gpus` share of the free GPUs
            resources = ray.available_resources()  # not the total: other actors (Serve) may hold some
            available = resources.get("GPU", 0) / num_gpus if num_gpus else resources.get("CPU", 1)
            workers = max(1, int(available))
        schema = config.output_schema()
        dataset = ray.data.from_items([u.to_row() for u in units], override_num_blocks=len(units))
        dataset = dataset.map_batches(
            read_units, batch_size=1, batch_format="pyarrow", fn_kwargs={"records_per_block": batch_size}
        )
        # batch_size=None: one batch per block of `batch_size` records out of the read stage. Ray
        # fuses the two stages into the actors, and a fixed batch size there would bundle several
        # read units into one actor call (no parallelism over a small corpus).
        dataset = dataset.map_batches(
            Preprocessor,
            fn_constructor_kwargs={"config": config},
            batch_size=None,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_gpus=num_gpus or None,
        )
        sink = ShardSink(staging, schema, rows_per_file)
        # Writing is I/O: 0 CPUs lets write tasks run beside the actors, which may hold every CPU, so
        # shards stream to disk instead of piling up in the object store until the actors finish.
        dataset.write_datasink(sink, ray_remote_args={"num_cpus": 0}, concurrency=workers)
        # Every listed split gets a folder with at least one shard (maybe empty): readers of the
        # layout never meet a missing folder.
        for unit in units:
            if not any((staging / unit.dataset / unit.split).glob("*.parquet")):
                write_empty_shard(staging, unit.dataset, unit.split, schema)
        manifest_text = json.dumps(_manifest(config, units, sink.results, schema, input_dir), indent=2)
        (staging / MANIFEST_FILE).write_text(manifest_text)
        manifest = json.loads(manifest_text)  # what a reader of the file gets (lists, not tuples)
        replace_directory(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        data_context.enable_progress_bars = saved_progress
        if started_ray:
            ray.shutdown()
    _log_summary(manifest, out)
    return manifest


def _check_output_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise PrepareError(f"output path {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise PrepareError(f"output folder {out} is not empty; pass overwrite=True (--overwrite) to replace it")
        if not (out / MANIFEST_FILE).is_file():
            raise PrepareError(f"refusing to overwrite {out}: it is not a prepared corpus (no {MANIFEST_FILE})")


def _manifest(
    config: PrepareConfig,
    units: list[ReadUnit],
    results: list[dict[str, list]],
    schema: pa.Schema,
    input_dir: str | Path,
) -> dict[str, Any]:
    counts: dict[str, dict[str, int]] = {}
    for unit in units:
        counts.setdefault(unit.dataset, {})[unit.split] = 0
    skipped = []
    for result in results:
        for f in result["files"]:
            counts[f["dataset"]][f["split"]] += f["rows"]
        skipped += result["skipped"]
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
        "skipped": sorted(skipped, key=lambda s: (s["dataset"], s["split"], s["path"])),
        "schema": {f.name: str(f.type) for f in schema},
        "preprocess": {"image": asdict(config.image), "audio": asdict(config.audio)},
        "input": str(Path(input_dir).resolve()),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _log_summary(manifest: dict[str, Any], out: Path) -> None:
    total = sum(n for splits in manifest["counts"].values() for n in splits.values())
    logger.info("prepared %d records into %s (%d skipped)", total, out, len(manifest["skipped"]))
    for entry in manifest["skipped"]:
        logger.warning("skipped %s/%s %s: %s", entry["dataset"], entry["split"], entry["path"], entry["reason"])
