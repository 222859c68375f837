"""`bubogpt data prepare` (workflows/prepare.py) on the tiny synthetic corpus, on one local Ray.

Independent checks: row counts against corpus.json and the Parquet files themselves, tensors against
`bubogpt.preprocess` run directly on the source files, frozen-encoder tokens against the model loaded
with `load_model`, and planted corrupt files against `skipped`.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch

from bubogpt.config import tiny
from bubogpt.preprocess import AudioPreprocessConfig, ImagePreprocessConfig, load_audio_fbank, load_image
from workflows.data import readers
from workflows.data.prepared import (
    DATASETS,
    SPLITS,
    PreparedDataError,
    decode_row_tensors,
    read_manifest,
    read_split,
    shard_paths,
)
from workflows.prepare import (
    PrepareConfig,
    PrepareError,
    Preprocessor,
    load_indexes,
    plan_chunks,
    prepare_chunk,
    read_corpus_spec,
    records_to_batch,
    run_prepare,
)

TINY = tiny()
IMAGE_CONFIG = ImagePreprocessConfig.for_model(TINY)
AUDIO_CONFIG = AudioPreprocessConfig.for_model(TINY)
FP16 = {"rtol": 0.0, "atol": 2e-3}  # values within a few units: float16 storage rounds by <= 1e-3
# Which modality each dataset carries: (image, audio).
MODALITIES = {
    "wavcaps": (False, True),
    "cc_sbu_align": (True, False),
    "llava_instruct": (True, False),
    "clotho": (False, True),
    "vggss": (True, True),
    "negative_pairs": (True, True),
}


def _rows(prepared_dir: Path | str, dataset: str, split: str) -> dict[str, dict]:
    return {row["id"]: row for row in read_split(prepared_dir, dataset, split).to_pylist()}


def _parquet_rows(folder: Path) -> int:
    return sum(pq.ParquetFile(path).metadata.num_rows for path in folder.glob("*.parquet"))


# --------------------------------------------------------------------------------------------------
# The shared prepared corpus (tests/conftest.py: prepared_small_corpus)
# --------------------------------------------------------------------------------------------------


def test_counts_equal_parquet_rows_and_corpus_counts(prepared_small_corpus):
    corpus = json.loads((prepared_small_corpus.corpus_dir / "corpus.json").read_text())
    manifest = read_manifest(prepared_small_corpus.prepared_dir)
    assert manifest == prepared_small_corpus.manifest  # the file holds what run_prepare returned
    assert manifest["skipped"] == []
    assert set(manifest["counts"]) == set(DATASETS)
    for dataset in DATASETS:
        for split in SPLITS:
            folder = prepared_small_corpus.prepared_dir / dataset / split
            expected = corpus["sets"][dataset]["splits"][split]["count"]
            assert manifest["counts"][dataset][split] == _parquet_rows(folder) == expected, (dataset, split)
            rows = read_split(prepared_small_corpus.prepared_dir, dataset, split)
            assert set(rows["dataset"].to_pylist()) == {dataset}
            assert set(rows["split"].to_pylist()) == {split}
            assert len(set(rows["id"].to_pylist())) == rows.num_rows  # every record once


def test_manifest_shapes_schema_and_modalities(prepared_small_corpus):
    manifest = prepared_small_corpus.manifest
    size, audio = TINY.vision.img_size, TINY.audio
    assert manifest["image_size"] == size == 112
    clips, mels, frames = TINY.audio_clips, audio.num_mel_bins, audio.target_length
    assert manifest["audio"] == {"clips": clips, "mel_bins": mels, "frames": frames}
    assert manifest["shapes"] == {
        "pixel_values": [3, size, size],
        "fbank": [clips, 1, mels, frames],
    }
    assert manifest["features"] is False and manifest["dtype"] == "float16"
    text = ["dataset", "split", "id", "instruction", "answer", "meta"]
    assert manifest["schema"] == {**dict.fromkeys(text, "string"), "pixel_values": "binary", "fbank": "binary"}
    for dataset, (has_image, has_audio) in MODALITIES.items():
        table = read_split(prepared_small_corpus.prepared_dir, dataset, "train")
        assert table.schema.names == list(manifest["schema"])
        assert table["pixel_values"].null_count == (0 if has_image else table.num_rows), dataset
        assert table["fbank"].null_count == (0 if has_audio else table.num_rows), dataset
        assert all(isinstance(json.loads(m), dict) for m in table["meta"].to_pylist())


def test_image_rows_equal_preprocessing_the_source_images(prepared_small_corpus):
    corpus, prepared = prepared_small_corpus.corpus_dir, prepared_small_corpus.prepared_dir
    manifest = prepared_small_corpus.manifest
    annotations = json.loads((corpus / "cc_sbu_align/train/filter_cap.json").read_text())["annotations"]
    rows = _rows(prepared, "cc_sbu_align", "train")
    for entry in annotations[:3]:
        row = rows[entry["image_id"]]
        assert row["answer"] == entry["caption"]
        expected = load_image(corpus / "cc_sbu_align/train/image" / f"{entry['image_id']}.jpg", IMAGE_CONFIG)
        tensors = decode_row_tensors(row, manifest)
        assert tensors["fbank"] is None
        torch.testing.assert_close(tensors["pixel_values"], expected, **FP16)

    # LLaVA: one row per turn, each with its entry's image.
    entry = json.loads((corpus / "llava_instruct/eval/llava_instruct.json").read_text())[0]
    row = _rows(prepared, "llava_instruct", "eval")[f"{entry['id']}_0"]
    assert row["answer"] == entry["conversations"][1]["value"]
    expected = load_image(corpus / "llava_instruct/eval/image" / entry["image"], IMAGE_CONFIG)
    torch.testing.assert_close(decode_row_tensors(row, manifest)["pixel_values"], expected, **FP16)


def test_audio_rows_equal_preprocessing_the_source_audio(prepared_small_corpus):
    corpus, prepared = prepared_small_corpus.corpus_dir, prepared_small_corpus.prepared_dir
    manifest = prepared_small_corpus.manifest
    annotations = json.loads((corpus / "clotho/train/audio_cap.json").read_text())["annotations"]
    rows = _rows(prepared, "clotho", "train")
    for entry in annotations[:3]:
        row = rows[entry["audio_id"]]
        assert row["answer"] == entry["caption"]
        expected = load_audio_fbank(corpus / "clotho/train/audio" / f"{entry['audio_id']}.wav", AUDIO_CONFIG)
        tensors = decode_row_tensors(row, manifest)
        assert tensors["pixel_values"] is None
        torch.testing.assert_close(tensors["fbank"], expected, **FP16)

    # WavCaps: the audio lives inside the webdataset tar.
    with tarfile.open(corpus / "wavcaps/eval/shard-000000.tar") as tar:
        key = tar.getnames()[0].split(".")[0]
        flac = tar.extractfile(f"{key}.flac").read()
        caption = json.loads(tar.extractfile(f"{key}.json").read())["caption"]
    row = _rows(prepared, "wavcaps", "eval")[key]
    assert row["answer"] == caption
    torch.testing.assert_close(decode_row_tensors(row, manifest)["fbank"], load_audio_fbank(flac, AUDIO_CONFIG), **FP16)


def test_image_audio_pairs_carry_both_sources(prepared_small_corpus):
    corpus, prepared = prepared_small_corpus.corpus_dir, prepared_small_corpus.prepared_dir
    entry = json.loads((corpus / "vggss/train/vggss_instruction.json").read_text())["annotations"][1]
    row = _rows(prepared, "vggss", "train")[f"{entry['image_id']}+{entry['audio_id']}"]
    assert (row["instruction"], row["answer"]) == (entry["instruction"], entry["caption"])
    tensors = decode_row_tensors(row, prepared_small_corpus.manifest)
    image = load_image(corpus / "vggss/train/image" / f"{entry['image_id']}.jpg", IMAGE_CONFIG)
    audio = load_audio_fbank(corpus / "vggss/train/audio" / f"{entry['audio_id']}.wav", AUDIO_CONFIG)
    torch.testing.assert_close(tensors["pixel_values"], image, **FP16)
    torch.testing.assert_close(tensors["fbank"], audio, **FP16)


def test_refuses_to_write_into_a_folder_in_use(prepared_small_corpus, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    with pytest.raises(PrepareError, match="not empty"):
        run_prepare(prepared_small_corpus.corpus_dir, busy, progress=False)
    with pytest.raises(PrepareError, match="not a prepared corpus"):
        run_prepare(prepared_small_corpus.corpus_dir, busy, overwrite=True, progress=False)
    assert (busy / "notes.txt").read_text() == "keep me"


# --------------------------------------------------------------------------------------------------
# Corrupt files, frozen-encoder features and the CLI: one run on a subset corpus
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def problem_run(prepared_small_corpus, tmp_path_factory):
    """A corpus.json over copies of clotho/cc_sbu_align train (one corrupt file each) and the shared
    vggss eval split (absolute paths), prepared through the CLI with a tiny features model."""
    from bubogpt.checkpoints.native import save_model
    from bubogpt.modeling_bubogpt import BuboGPT
    from bubogpt.tokenizer import build_tiny_tokenizer
    from workflows.cli import main

    source = prepared_small_corpus.corpus_dir
    root = tmp_path_factory.mktemp("prepare_problems")
    shutil.copytree(source / "clotho/train", root / "clotho")
    shutil.copytree(source / "cc_sbu_align/train", root / "cc")
    bad_audio = root / "clotho/audio/clotho_000003.wav"
    bad_audio.write_bytes(b"RIFF this is not a wave file at all")
    bad_image = root / "cc/image/cc_000002.jpg"
    bad_image.write_bytes(bad_image.read_bytes()[:300])  # truncated JPEG
    shutil.copytree(source / "clotho/eval", root / "clotho_eval")  # every file bad: an empty split
    all_bad = sorted((root / "clotho_eval/audio").glob("*.wav"))
    for path in all_bad:
        path.write_bytes(b"")
    shutil.copytree(source / "llava_instruct/eval", root / "llava")  # two entries share each image
    shared_bad = root / "llava/image/llava_000006.jpg"
    shared_bad.write_bytes(shared_bad.read_bytes()[:200])
    vggss = {key: str(source / path) for key, path in
             json.loads((source / "corpus.json").read_text())["sets"]["vggss"]["splits"]["eval"].items()
             if key in ("annotations", "audio_dir", "image_dir")}  # fmt: skip
    spec = {"sets": {
        "clotho": {"splits": {
            "train": {"annotations": "clotho/audio_cap.json", "audio_dir": "clotho/audio"},
            "eval": {"annotations": "clotho_eval/audio_cap.json", "audio_dir": "clotho_eval/audio"},
        }},
        "cc_sbu_align": {"splits": {"train": {"path": "cc"}}},
        "llava_instruct": {"splits": {"eval": {"annotations": "llava/llava_instruct.json", "image_dir": "llava/image"}}},
        "vggss": {"splits": {"eval": vggss}},
    }}  # fmt: skip
    (root / "corpus.json").write_text(json.dumps(spec))

    torch.manual_seed(0)
    model = BuboGPT.build(tiny(), build_tiny_tokenizer(["a red square", "a rising chirp"], vocab_size=300))
    save_model(model, root / "model")

    rc = main(["data", "prepare", "--input", str(root), "--out", str(root / "prepared"),
               "--preset", "tiny", "--features-model", str(root / "model"), "--workers", "1"])  # fmt: skip
    bad = [("clotho", "train", bad_audio), ("cc_sbu_align", "train", bad_image)]
    bad += [("clotho", "eval", path) for path in all_bad] + [("llava_instruct", "eval", shared_bad)]
    return {"rc": rc, "root": root, "bad": bad}


def test_corrupt_files_are_skipped_with_their_paths(problem_run):
    assert problem_run["rc"] == 0  # the job succeeds
    prepared = problem_run["root"] / "prepared"
    manifest = read_manifest(prepared)
    skipped = [(s["dataset"], s["split"], s["path"]) for s in manifest["skipped"]]
    # Each bad file listed once, also the image both of its LLaVA entries use.
    assert sorted(skipped) == sorted((name, split, str(path)) for name, split, path in problem_run["bad"])
    assert all(s["reason"] for s in manifest["skipped"])
    # 8 clotho and 6 cc_sbu_align train records minus the corrupt one each, clotho eval's 2 all
    # corrupt (an empty split), LLaVA eval's 4 minus the 2 on the bad image, vggss eval untouched.
    expected = {"clotho": {"train": 7, "eval": 0}, "cc_sbu_align": {"train": 5}, "llava_instruct": {"eval": 2},
                "vggss": {"eval": 2}}  # fmt: skip
    assert manifest["counts"] == expected
    for dataset, splits in manifest["counts"].items():
        for split, count in splits.items():
            assert _parquet_rows(prepared / dataset / split) == count
    empty = read_split(prepared, "clotho", "eval")  # the folder exists, with the full schema
    assert empty.num_rows == 0 and empty.schema.names == list(manifest["schema"])
    assert "clotho_000003" not in _rows(prepared, "clotho", "train")
    assert "cc_000002" not in _rows(prepared, "cc_sbu_align", "train")
    assert sorted(_rows(prepared, "llava_instruct", "eval")) == ["llava_000007_0_0", "llava_000007_1_0"]
    assert not (prepared / "wavcaps").exists()  # only the sets listed in corpus.json


def test_features_equal_the_model_encoders_on_the_stored_inputs(problem_run):
    from bubogpt.checkpoints.native import load_model

    prepared = problem_run["root"] / "prepared"
    manifest = read_manifest(prepared)
    vision, audio = TINY.vision, TINY.audio
    assert manifest["features"] is True
    assert manifest["shapes"]["vision_tokens"] == [(vision.img_size // vision.patch_size) ** 2 + 1, vision.embed_dim]
    assert manifest["shapes"]["audio_tokens"] == [12 * 19 + 1, audio.embed_dim]  # 128 x 204 fbank, k16 s10
    assert manifest["augmentation"].startswith("none")  # the trade-off is stated in the manifest

    model = load_model(problem_run["root"] / "model")
    rows = list(_rows(prepared, "vggss", "eval").values()) + list(_rows(prepared, "clotho", "train").values())[:1]
    with torch.no_grad():
        for row in rows:
            t = decode_row_tensors(row, manifest)
            if t["pixel_values"] is not None:
                expected = model.encode_image(t["pixel_values"][None])[0]
                torch.testing.assert_close(t["vision_tokens"], expected, rtol=2e-3, atol=2e-3)
            else:
                assert t["vision_tokens"] is None
            expected = model.encode_audio(t["fbank"][None])[0]
            torch.testing.assert_close(t["audio_tokens"], expected, rtol=2e-3, atol=2e-3)


# --------------------------------------------------------------------------------------------------
# Without Ray: the Preprocessor, corpus.json validation, row decoding
# --------------------------------------------------------------------------------------------------


def test_preprocessor_turns_a_failing_record_into_a_skip_row(prepared_small_corpus):
    units = [u for u in read_corpus_spec(prepared_small_corpus.corpus_dir) if u.dataset == "cc_sbu_align"]
    good = next(r for r in readers.read_cc_sbu_align(dict(units[0].paths)["path"], split=units[0].split))
    bad = {**good, "id": "broken", "image": b"\x89PNG\r\n\x1a\n garbage", "image_path": "/data/broken.png"}
    records = [{**r, "skip_path": None, "skip_reason": None} for r in (good, bad)]
    config = PrepareConfig.from_preset("tiny")

    out = Preprocessor(config)(records_to_batch(records))

    assert list(out["id"]) == [good["id"], "broken"]
    assert out["skip_reason"][0] is None and out["pixel_values"][0] is not None
    assert out["skip_path"][1] == "/data/broken.png" and "image" in out["skip_reason"][1]
    assert out["pixel_values"][1] is None
    row = {name: out[name][0] for name in out}
    expected = load_image(good["image_path"], IMAGE_CONFIG)
    torch.testing.assert_close(decode_row_tensors(row, {"shapes": config.shapes()})["pixel_values"], expected, **FP16)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"sets": {"audioset": {"splits": {"train": {}}}}}, "unknown set 'audioset'"),
        ({"sets": {"clotho": {"splits": {"test": {}}}}}, "unknown split"),
        ({"sets": {"clotho": {"splits": {"train": {"audio_dir": "."}}}}}, 'missing or invalid "annotations"'),
        ({"sets": {"cc_sbu_align": {"splits": {"train": {"path": "nowhere"}}}}}, "does not exist"),
        ({"sets": {"wavcaps": {"splits": {"train": {"shards": []}}}}}, "non-empty list"),
        ({"version": 1}, 'no "sets"'),
    ],
)
def test_bad_corpus_json_is_refused_before_any_work(tmp_path, spec, message):
    (tmp_path / "corpus.json").write_text(json.dumps(spec))
    with pytest.raises(PrepareError, match=message):
        read_corpus_spec(tmp_path)


def test_missing_corpus_json_and_mismatched_features_model(tmp_path, problem_run):
    with pytest.raises(PrepareError, match="no corpus.json"):
        read_corpus_spec(tmp_path)
    # The tiny model's encoders read 112 px images; the 7b preset prepares 224 px.
    with pytest.raises(PrepareError, match="image size 112"):
        PrepareConfig.from_preset("7b", features_model=problem_run["root"] / "model")


def test_decode_row_tensors_refuses_bytes_of_the_wrong_size():
    manifest = {"shapes": {"pixel_values": [3, 4, 4], "fbank": [2, 1, 3, 5]}}
    good = torch.arange(48, dtype=torch.float16).reshape(3, 4, 4)
    row = {"dataset": "cc_sbu_align", "split": "train", "id": "x", "fbank": None}
    row["pixel_values"] = good.numpy().tobytes()
    decoded = decode_row_tensors(row, manifest)
    assert decoded["fbank"] is None
    assert torch.equal(decoded["pixel_values"], good.float())
    row["pixel_values"] = row["pixel_values"][:-2]
    with pytest.raises(PreparedDataError, match="pixel_values of row cc_sbu_align/train/x: 94 bytes, expected 96"):
        decode_row_tensors(row, manifest)


def test_small_chunks_and_files_hold_the_same_rows(prepared_small_corpus, tmp_path):
    """Without Ray: the tiny corpus cut into chunks of 2 index entries, at most 3 rows per file, through
    `prepare_chunk` in a loop, holds exactly the rows of the shared prepared corpus (one chunk per split)."""
    indexed, index_skips = load_indexes(read_corpus_spec(prepared_small_corpus.corpus_dir))
    chunks = plan_chunks(indexed, records_per_chunk=2)
    assert index_skips == []
    assert max(len(c.entries) for c in chunks if c.entries is not None) == 2
    preprocessor = Preprocessor(PrepareConfig.from_preset("tiny"))
    files = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the actors: fbank's float16 rounding may differ by a unit with more
    try:
        for chunk in chunks:
            result = prepare_chunk(chunk, preprocessor, pafs.LocalFileSystem(), str(tmp_path), "t", batch_size=2,
                                   rows_per_file=3)  # fmt: skip
            assert result["skipped"] == []
            files += result["files"]
    finally:
        torch.set_num_threads(threads)
    per_split: dict[tuple[str, str], list[Path]] = {}
    for f in files:
        per_split.setdefault((f["dataset"], f["split"]), []).append(tmp_path / f["path"])
    assert len(per_split["cc_sbu_align", "train"]) == 3  # 6 entries, 2 per chunk
    assert [f["rows"] for f in files if (f["dataset"], f["split"]) == ("wavcaps", "train")] == [3, 3, 2, 3, 1]  # 2 tars
    for dataset in DATASETS:
        for split in SPLITS:
            rows = {r["id"]: r for path in per_split[dataset, split] for r in pq.read_table(path).to_pylist()}
            assert rows == _rows(prepared_small_corpus.prepared_dir, dataset, split), (dataset, split)


# --------------------------------------------------------------------------------------------------
# Output on object storage (tests/conftest.py: s3_server, a moto server) and all-or-nothing output
# --------------------------------------------------------------------------------------------------


def _bucket_keys(s3_server, bucket: str) -> set[str]:
    """The bucket's objects, but for the empty folder markers pyarrow leaves where it deleted files."""
    import boto3

    listing = boto3.client("s3", endpoint_url=s3_server.endpoint_url).list_objects_v2(Bucket=bucket)
    return {item["Key"] for item in listing.get("Contents", []) if not item["Key"].endswith("/")}


def _subset_corpus(prepared_small_corpus, root: Path) -> Path:
    """A corpus.json over two small splits of the shared corpus (absolute paths): a quick job."""
    spec = json.loads((prepared_small_corpus.corpus_dir / "corpus.json").read_text())
    splits = {name: {"splits": {"eval": {k: str(prepared_small_corpus.corpus_dir / v)
                                         for k, v in spec["sets"][name]["splits"]["eval"].items()
                                         if k in ("annotations", "audio_dir", "image_dir")}}}
              for name in ("clotho", "vggss")}  # fmt: skip
    root.mkdir(parents=True)
    (root / "corpus.json").write_text(json.dumps({"sets": splits}))
    return root


def test_prepare_to_s3_lands_in_the_bucket_and_reads_back_as_local(prepared_small_corpus, s3_server, ray_session):
    import boto3

    from workflows.cli import main

    bucket = "prepared-tiny"
    out = f"{s3_server.create_bucket(bucket)}/corpus/v1"
    rc = main(["data", "prepare", "--input", str(prepared_small_corpus.corpus_dir), "--out", out, "--workers", "2"])
    assert rc == 0

    # In the bucket: the manifest and exactly the shards it lists, nothing else (no staging leftovers).
    body = boto3.client("s3", endpoint_url=s3_server.endpoint_url).get_object(Bucket=bucket, Key="corpus/v1/manifest.json")
    manifest = json.loads(body["Body"].read())
    listed = {f"corpus/v1/{path}" for splits in manifest["files"].values() for paths in splits.values() for path in paths}
    assert _bucket_keys(s3_server, bucket) == {"corpus/v1/manifest.json"} | listed
    assert read_manifest(out) == manifest
    local = prepared_small_corpus.manifest
    for key in ("counts", "shapes", "schema", "skipped", "preset"):
        assert manifest[key] == local[key], key

    # Read back through the URI: the same rows, byte for byte, as the local prepare of the same corpus.
    for dataset in DATASETS:
        for split in SPLITS:
            assert _rows(out, dataset, split) == _rows(prepared_small_corpus.prepared_dir, dataset, split)
    paths = shard_paths(out, "clotho", "train")
    assert all(p.startswith(f"{out}/clotho/train/part-") for p in paths)
    # Ray Data's workers read the shards from the bucket too (what training does with --data URI).
    assert ray_session.data.read_parquet(paths).count() == manifest["counts"]["clotho"]["train"]


def test_s3_output_is_all_or_nothing(prepared_small_corpus, s3_server, ray_session, tmp_path, monkeypatch):
    import workflows.prepare

    corpus = _subset_corpus(prepared_small_corpus, tmp_path / "corpus")
    bucket = "prepared-replace"
    out = f"{s3_server.create_bucket(bucket)}/corpus"

    # A run that fails after its shards are written (here: in building the manifest) deletes them
    # and leaves the previous output as it was: at first, nothing.
    def broken_manifest(*args, **kwargs):
        raise RuntimeError("injected failure")

    def failed_run(**options) -> None:
        with monkeypatch.context() as patch:
            patch.setattr(workflows.prepare, "_manifest", broken_manifest)
            with pytest.raises(RuntimeError, match="injected"):
                run_prepare(corpus, out, workers=1, progress=False, **options)

    failed_run()
    assert _bucket_keys(s3_server, bucket) == set()
    with pytest.raises(PreparedDataError, match="not a prepared corpus"):
        read_manifest(out)

    first = run_prepare(corpus, out, workers=1, progress=False)  # the failed run left nothing in the way
    assert first["counts"] == {"clotho": {"eval": 2}, "vggss": {"eval": 2}}
    keys = _bucket_keys(s3_server, bucket)
    with pytest.raises(PrepareError, match="not empty"):
        run_prepare(corpus, out, workers=1, progress=False)
    failed_run(overwrite=True)
    assert _bucket_keys(s3_server, bucket) == keys
    assert read_manifest(out) == first

    # Overwrite: the new manifest, its shards, and none of the previous run's.
    second = run_prepare(corpus, out, workers=1, overwrite=True, progress=False)
    listed = {f"corpus/{p}" for splits in second["files"].values() for paths in splits.values() for p in paths}
    assert _bucket_keys(s3_server, bucket) == {"corpus/manifest.json"} | listed
    assert not listed & keys
    assert _rows(out, "vggss", "eval") == _rows(prepared_small_corpus.prepared_dir, "vggss", "eval")

    with pytest.raises(PrepareError, match="bucket 'no-such-bucket' does not exist"):
        run_prepare(corpus, "s3://no-such-bucket/x", progress=False)


def test_local_output_is_all_or_nothing(prepared_small_corpus, ray_session, tmp_path, monkeypatch):
    import workflows.prepare

    corpus = _subset_corpus(prepared_small_corpus, tmp_path / "corpus")
    out = tmp_path / "prepared"
    first = run_prepare(corpus, out, workers=1, progress=False)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if "corpus" not in p.parts)

    def broken_manifest(*args, **kwargs):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(workflows.prepare, "_manifest", broken_manifest)
    with pytest.raises(RuntimeError, match="injected"):
        run_prepare(corpus, out, workers=1, overwrite=True, progress=False)
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if "corpus" not in p.parts)
    assert after == before  # OUT untouched, no staging folder left beside it
    assert read_manifest(out) == first


def test_eval_image_transform_is_torchvisions_and_actors_do_not_import_torchvision():
    """bubogpt.preprocess's eval transforms do, without torchvision, exactly what torchvision's
    Resize(BICUBIC) [+ CenterCrop] + ToTensor + Normalize do; the preparation code then never imports
    torchvision, whose import is the largest part of an actor's start-up (it pulls in torch._dynamo)."""
    import subprocess
    import sys

    import numpy as np
    from PIL import Image
    from torchvision import transforms

    from bubogpt.preprocess import decode_image, image_transform

    rng = np.random.default_rng(0)
    sizes = ((320, 160), (90, 301), (225, 224), (113, 112), (112, 112), (57, 400))  # odd margins: rounding
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
    encoded = io.BytesIO()
    images[0].save(encoded, "JPEG", quality=90)
    images.append(decode_image(encoded.getvalue()))  # as the Preprocessor gets it
    bicubic = transforms.InterpolationMode.BICUBIC
    for size in (32, 112, 224):
        for eval_resize in ("center_crop", "squash"):
            config = ImagePreprocessConfig(image_size=size, eval_resize=eval_resize)
            if eval_resize == "center_crop":
                geometry = [transforms.Resize(size, interpolation=bicubic), transforms.CenterCrop(size)]
            else:
                geometry = [transforms.Resize((size, size), interpolation=bicubic)]
            reference = transforms.Compose([*geometry, transforms.ToTensor(), transforms.Normalize(config.mean, config.std)])
            for image in images:
                assert torch.equal(image_transform(config)(image), reference(image)), (size, eval_resize, image.size)

    code = "import sys, workflows.prepare; print('torchvision' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
