"""Corpus readers: fabricated samples of every original format, with bad records mixed in."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import soundfile
from PIL import Image

from workflows.data.readers import (
    RECORD_SCHEMA,
    SkipLog,
    read_cc_sbu_align,
    read_clotho,
    load_annotations,
    load_entry_list,
    read_llava_instruct,
    read_negative_pairs,
    read_vggss,
    read_wavcaps,
    records_to_table,
)

FIELDS = set(RECORD_SCHEMA.names)


def audio_bytes(freq: float, fmt: str = "WAV", seconds: float = 0.5, rate: int = 16000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    buffer = io.BytesIO()
    samples = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    soundfile.write(buffer, samples, rate, format=fmt)
    return buffer.getvalue()


def jpeg_bytes(colour: tuple[int, int, int], size: tuple[int, int] = (32, 24)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


GARBAGE = b"\x00\x01 definitely not a media file \xff" * 8


def write(path: Path, data: bytes | str | object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    elif isinstance(data, str):
        path.write_text(data)
    else:
        path.write_text(json.dumps(data))
    return path


def by_id(records: list[dict]) -> dict[str, dict]:
    return {r["id"]: r for r in records}


def check_schema(records: list[dict]) -> None:
    for record in records:
        assert set(record) == FIELDS
        json.loads(record["meta"])
    table = records_to_table(records)
    assert table.schema == RECORD_SCHEMA and table.num_rows == len(records)


# --------------------------------------------------------------------------------------------------
# WavCaps webdataset tars
# --------------------------------------------------------------------------------------------------


def make_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def caption_json(caption: str, **extra) -> bytes:
    return json.dumps({"caption": caption, **extra}).encode()


def test_wavcaps_tars(tmp_path):
    good = {f"s{i}": audio_bytes(300 + 100 * i, "FLAC") for i in range(3)}
    shard0 = make_tar(
        tmp_path / "shards" / "shard-000000.tar",
        [
            ("s0.flac", good["s0"]), ("s0.json", caption_json("a dog barks", duration=0.5)),
            ("bad_audio.flac", GARBAGE), ("bad_audio.json", caption_json("noise")),
            ("s1.flac", good["s1"]), ("s1.json", caption_json("rain on a roof")),
            ("bad_json.flac", good["s0"]), ("bad_json.json", b"{not json"),
            ("no_caption.flac", good["s0"]), ("no_caption.json", b'{"title": "x"}'),
            ("no_json.flac", good["s0"]),
        ],
    )
    # A shard cut in the middle of its last sample: the samples before the damage still come out.
    full = make_tar(
        tmp_path / "shards" / "shard-000001.tar",
        [
            ("s2.flac", good["s2"]), ("s2.json", caption_json("a bell rings")),
            ("lost.flac", audio_bytes(900, "FLAC", seconds=2.0)), ("lost.json", caption_json("x")),
        ],
    )
    with tarfile.open(full) as tar:
        last_data_offset = tar.getmember("lost.flac").offset_data
    full.write_bytes(full.read_bytes()[: last_data_offset + 1000])

    skips = SkipLog()
    shards = tmp_path / "shards"
    records = list(read_wavcaps(shards, split="eval", dataset="wavcaps_bbc", skips=skips))
    check_schema(records)
    got = by_id(records)
    assert sorted(got) == ["s0", "s1", "s2"]
    assert got["s0"]["answer"] == "a dog barks" and got["s2"]["answer"] == "a bell rings"
    assert got["s1"]["audio"] == good["s1"] and got["s1"]["image"] is None
    assert got["s1"]["audio_path"] == f"{shard0}:s1.flac"  # the tar and its member
    assert got["s0"]["dataset"] == "wavcaps_bbc" and got["s0"]["split"] == "eval"
    assert got["s0"]["instruction"] == ""
    assert json.loads(got["s0"]["meta"]) == {"duration": 0.5}
    assert json.loads(got["s1"]["meta"]) == {}

    skipped = skips.paths()
    assert len(skips) == 5
    assert f"{shard0}:bad_audio.flac" in skipped
    assert f"{shard0}:bad_json.json" in skipped
    assert f"{shard0}:no_caption.json" in skipped
    assert f"{shard0}:no_json" in skipped
    assert str(full) in skipped
    assert "truncated" in skips.entries[skipped.index(str(full))]["reason"]

    # validate=False leaves decoding to the caller: the garbage audio comes out, the rest is checked.
    unchecked = SkipLog()
    records = list(read_wavcaps(shard0, skips=unchecked, validate=False))
    assert [r["id"] for r in records] == ["s0", "bad_audio", "s1"]
    assert records[1]["audio"] == GARBAGE and records[1]["audio_path"] == f"{shard0}:bad_audio.flac"
    assert len(unchecked) == 3

    # One tar file as the path works too; a missing path is a skip, not a crash.
    assert [r["id"] for r in read_wavcaps(shard0)] == ["s0", "s1"]
    missing = SkipLog()
    assert list(read_wavcaps(tmp_path / "nowhere", skips=missing)) == []
    assert missing.paths() == [str(tmp_path / "nowhere")]


# --------------------------------------------------------------------------------------------------
# cc_sbu_align
# --------------------------------------------------------------------------------------------------


def test_cc_sbu_align(tmp_path):
    root = tmp_path / "cc_sbu_align"
    images = {
        "1": jpeg_bytes((255, 0, 0)), "2": jpeg_bytes((0, 255, 0)), "abc": jpeg_bytes((0, 0, 255))
    }
    for image_id, data in images.items():
        write(root / "image" / f"{image_id}.jpg", data)
    write(root / "1.jpg", images["1"])  # outside image/: an annotation must not reach it
    write(root / "image" / "corrupt.jpg", GARBAGE)
    write(root / "image" / "cut.jpg", truncated(jpeg_bytes((9, 9, 9), (200, 150))))
    annotations = [
        {"image_id": 1, "caption": "A red square."},
        {"image_id": "2", "caption": "  A green square. ", "source": "synthetic"},
        {"image_id": "corrupt", "caption": "x"},
        {"image_id": "abc", "caption": "A blue square."},
        {"image_id": "cut", "caption": "x"},
        {"image_id": "missing", "caption": "x"},
        {"image_id": "1"},
        "not an object",
        {"image_id": "../1", "caption": "escapes its folder"},
    ]
    index = write(root / "filter_cap.json", {"annotations": annotations})

    skips = SkipLog()
    records = list(read_cc_sbu_align(root, split="train", skips=skips))
    check_schema(records)
    got = by_id(records)
    assert sorted(got) == ["1", "2", "abc"]
    assert got["1"]["answer"] == "A red square." and got["2"]["answer"] == "A green square."
    assert got["abc"]["image"] == images["abc"]
    assert got["abc"]["image_path"] == str(root / "image" / "abc.jpg")
    assert got["1"]["audio"] is None and got["1"]["instruction"] == ""
    assert json.loads(got["2"]["meta"]) == {"source": "synthetic"}

    assert sorted(skips.paths()) == sorted(
        [
            str(root / "image" / "corrupt.jpg"),
            str(root / "image" / "cut.jpg"),
            str(root / "image" / "missing.jpg"),
            f"{index}#annotations[6]",
            f"{index}#annotations[7]",
            str(root / "image" / "../1.jpg"),
        ]
    )
    reasons = {e["path"]: e["reason"] for e in skips.entries}
    assert "truncated" in reasons[str(root / "image" / "cut.jpg")]
    assert "not found" in reasons[str(root / "image" / "missing.jpg")]
    assert "caption" in reasons[f"{index}#annotations[6]"]
    assert "outside" in reasons[str(root / "image" / "../1.jpg")]

    # A slice of the index, loaded beforehand (as the pipeline hands them out): entry numbers are
    # the file's; without validation the corrupt files come out as read, a missing one is skipped.
    loaded = SkipLog()
    entries = load_annotations(index, loaded)
    assert entries == annotations and len(loaded) == 0
    sliced = SkipLog()
    records = list(read_cc_sbu_align(root, skips=sliced, entries=entries[2:7], first=2, validate=False))
    assert [r["id"] for r in records] == ["corrupt", "abc", "cut"]
    assert records[0]["image"] == GARBAGE
    assert sorted(sliced.paths()) == sorted([str(root / "image" / "missing.jpg"), f"{index}#annotations[6]"])


@pytest.mark.parametrize("content", ["{broken", '{"something": []}', '[1, 2]'])
def test_unusable_index_is_one_skip(tmp_path, content):
    write(tmp_path / "filter_cap.json", content)
    write(tmp_path / "audio_cap.json", content)
    for reader in (
        lambda s: read_cc_sbu_align(tmp_path, skips=s),
        lambda s: read_clotho(tmp_path / "audio_cap.json", skips=s),
        lambda s: read_vggss(tmp_path / "audio_cap.json", tmp_path, tmp_path, skips=s),
        lambda s: read_negative_pairs(tmp_path / "audio_cap.json", tmp_path, tmp_path, skips=s),
    ):
        skips = SkipLog()
        assert list(reader(skips)) == []
        assert len(skips) == 1 and skips.paths()[0].endswith(".json")


# --------------------------------------------------------------------------------------------------
# LLaVA-Instruct
# --------------------------------------------------------------------------------------------------


def test_llava_instruct(tmp_path):
    images = tmp_path / "coco"
    write(images / "000000000001.jpg", jpeg_bytes((255, 0, 0)))
    write(images / "000000000002.jpg", jpeg_bytes((0, 255, 0)))
    write(images / "000000000003.jpg", truncated(jpeg_bytes((1, 2, 3), (300, 200))))

    def turn(role, value):
        return {"from": role, "value": value}

    entries = [
        {
            "id": "a",
            "image": "000000000001.jpg",
            "conversations": [
                turn("human", "<image>\nWhat colour is the square?"),
                turn("gpt", "It is red."),
                turn("human", "Is it large?"),
                turn("gpt", "No, it is small."),
                turn("human", "Where is it?"),
                turn("gpt", "In the center."),
            ],
        },
        {
            "id": 7,
            "image": "000000000002.jpg",
            "conversations": [
                turn("human", "How many squares are there?\n<image>"), turn("gpt", "One.")
            ],
            "meta": {"qtype": "count", "answer_key": 1},
        },
        {"id": "cut", "image": "000000000003.jpg",
         "conversations": [turn("human", "<image>\nq"), turn("gpt", "a")]},
        {"id": "odd", "image": "000000000001.jpg", "conversations": [turn("human", "<image>\nq")]},
        {"id": "swapped", "image": "000000000001.jpg",
         "conversations": [turn("gpt", "a"), turn("human", "q")]},
        {"id": "missing", "image": "000000000099.jpg",
         "conversations": [turn("human", "q"), turn("gpt", "a")]},
        {"id": "noconv", "image": "000000000001.jpg"},
    ]
    index = write(tmp_path / "llava_instruct_150k.json", entries)

    skips = SkipLog()
    records = list(read_llava_instruct(index, images, split="train", skips=skips))
    check_schema(records)
    got = by_id(records)
    assert sorted(got) == ["7_0", "a_0", "a_1", "a_2"]
    assert got["a_0"]["instruction"] == "What colour is the square?"
    assert got["a_0"]["answer"] == "It is red."
    assert got["a_1"]["instruction"] == "Is it large?"
    assert got["a_1"]["answer"] == "No, it is small."
    assert got["7_0"]["instruction"] == "How many squares are there?"
    assert got["a_1"]["image"] == (images / "000000000001.jpg").read_bytes()
    assert got["a_1"]["image_path"] == str(images / "000000000001.jpg")

    meta0, meta1 = json.loads(got["a_0"]["meta"]), json.loads(got["a_1"]["meta"])
    assert meta0 == {"history": [], "turn": 0, "source_id": "a"}
    assert meta1["history"] == [
        {"from": "human", "value": "What colour is the square?"},
        {"from": "gpt", "value": "It is red."},
    ]
    assert meta1["turn"] == 1
    meta2 = json.loads(got["a_2"]["meta"])
    assert meta2["history"] == meta1["history"] + [
        {"from": "human", "value": "Is it large?"},
        {"from": "gpt", "value": "No, it is small."},
    ]
    assert got["a_2"]["instruction"] == "Where is it?" and got["a_2"]["answer"] == "In the center."
    assert json.loads(got["7_0"]["meta"]) == {
        "qtype": "count", "answer_key": 1, "history": [], "turn": 0, "source_id": "7"
    }

    assert sorted(skips.paths()) == sorted(
        [
            str(images / "000000000003.jpg"),
            f"{index}[3]",
            f"{index}[4]",
            str(images / "000000000099.jpg"),
            f"{index}[6]",
        ]
    )

    not_a_list = SkipLog()
    write(tmp_path / "bad.json", {"annotations": []})
    assert list(read_llava_instruct(tmp_path / "bad.json", images, skips=not_a_list)) == []
    assert not_a_list.paths() == [str(tmp_path / "bad.json")]
    assert load_entry_list(tmp_path / "bad.json", SkipLog()) == []

    # The last two entries, handed over loaded: numbered as in the file; the truncated image is
    # not decoded without validation, so "cut" comes out.
    sliced = SkipLog()
    records = list(read_llava_instruct(index, images, skips=sliced, entries=entries[2:4], first=2, validate=False))
    assert [r["id"] for r in records] == ["cut_0"]
    assert sliced.paths() == [f"{index}[3]"]


# --------------------------------------------------------------------------------------------------
# Clotho
# --------------------------------------------------------------------------------------------------


def test_clotho(tmp_path):
    root = tmp_path / "clotho"
    clips = {"birds": audio_bytes(2000), "Santa Motor.wav": audio_bytes(150)}
    write(root / "birds.wav", clips["birds"])
    write(root / "Santa Motor.wav", clips["Santa Motor.wav"])
    write(root / "cut.wav", truncated(audio_bytes(440, seconds=1.0)))
    write(root / "silent_zero.wav", audio_bytes(440, seconds=0.0))
    annotations = [
        {"audio_id": "birds", "caption": "Birds chirp in a park while wind blows."},
        {"audio_id": "Santa Motor.wav", "caption": "A motor hums."},
        {"audio_id": "cut", "caption": "x"},
        {"audio_id": "missing", "caption": "x"},
        {"audio_id": "silent_zero", "caption": "x"},
        {"audio_id": "birds", "caption": ""},
    ]
    index = write(root / "audio_cap.json", {"annotations": annotations})

    skips = SkipLog()
    records = list(read_clotho(index, skips=skips))
    check_schema(records)
    got = by_id(records)
    assert sorted(got) == ["Santa Motor.wav", "birds"]
    assert got["birds"]["answer"] == "Birds chirp in a park while wind blows."
    assert got["birds"]["audio"] == clips["birds"]
    assert got["Santa Motor.wav"]["audio_path"] == str(root / "Santa Motor.wav")
    assert got["birds"]["image"] is None and got["birds"]["image_path"] is None
    assert sorted(skips.paths()) == sorted(
        [str(root / "cut.wav"), str(root / "missing.wav"), str(root / "silent_zero.wav"),
         f"{index}#annotations[5]"]
    )

    # audio in another folder than the index
    elsewhere = SkipLog()
    assert list(read_clotho(index, audio_dir=tmp_path / "empty", skips=elsewhere)) == []
    assert len(elsewhere) == 6


# --------------------------------------------------------------------------------------------------
# VGGSS and negative pairs
# --------------------------------------------------------------------------------------------------


def test_vggss_carries_extra_fields(tmp_path):
    write(tmp_path / "audio" / "dog.wav", audio_bytes(500))
    write(tmp_path / "audio" / "cut.wav", truncated(audio_bytes(500, seconds=1.0)))
    write(tmp_path / "image" / "park.jpg", jpeg_bytes((10, 200, 10)))
    write(tmp_path / "image" / "bad.jpg", GARBAGE)
    annotations = [
        {
            "audio_id": "dog",
            "image_id": "park",
            "caption": "The barking comes from the dog on the left.",
            "instruction": "Where does the sound come from?",
            "bbox": [1, 2, 20, 22],
            "meta": {"source_kind": "dog", "position": "left"},
        },
        {"audio_id": "dog", "image_id": "park", "caption": "A dog barks."},
        {"audio_id": "dog", "image_id": "bad", "caption": "x"},
        {"audio_id": "cut", "image_id": "park", "caption": "x"},
        {"audio_id": "dog", "image_id": "park", "caption": "x", "instruction": 3},
    ]
    index = write(tmp_path / "vggss.json", {"annotations": annotations})

    skips = SkipLog()
    records = list(read_vggss(index, tmp_path / "audio", tmp_path / "image", "eval", skips=skips))
    check_schema(records)
    assert len(records) == 2
    first, second = records
    assert first["id"] == "park+dog" and first["split"] == "eval" and first["dataset"] == "vggss"
    assert first["instruction"] == "Where does the sound come from?"
    assert first["answer"] == "The barking comes from the dog on the left."
    assert json.loads(first["meta"]) == {
        "bbox": [1, 2, 20, 22], "source_kind": "dog", "position": "left"
    }
    assert first["image"] == (tmp_path / "image" / "park.jpg").read_bytes()
    assert first["audio"] == (tmp_path / "audio" / "dog.wav").read_bytes()
    assert second["instruction"] == "" and json.loads(second["meta"]) == {}
    assert sorted(skips.paths()) == sorted(
        [str(tmp_path / "image" / "bad.jpg"), str(tmp_path / "audio" / "cut.wav"),
         f"{index}#annotations[4]"]
    )


def test_negative_pairs(tmp_path):
    write(tmp_path / "img" / "red.jpg", jpeg_bytes((255, 0, 0)))
    write(tmp_path / "img" / "blue.jpg", jpeg_bytes((0, 0, 255)))
    write(tmp_path / "snd" / "siren.wav", audio_bytes(1200))
    write(tmp_path / "snd" / "noise.wav", GARBAGE)
    target = (
        "The image and the audio seem unrelated. The image shows a red square. "
        "The audio is a siren."
    )
    annotations = [
        {"image_id": "red", "audio_id": "siren", "caption": target,
         "instruction": "Are the image and the audio related?", "audio_kind": "siren"},
        {"image_id": "blue", "audio_id": "siren", "caption": "A blue square. A siren wails."},
        {"image_id": "blue", "audio_id": "gone", "caption": "x"},
        {"image_id": "red", "audio_id": "noise", "caption": "x"},
        {"audio_id": "siren", "caption": "no image id"},
    ]
    index = write(tmp_path / "negative_pairs.json", {"annotations": annotations})

    skips = SkipLog()
    records = list(read_negative_pairs(index, tmp_path / "img", tmp_path / "snd", skips=skips))
    check_schema(records)
    got = by_id(records)
    assert sorted(got) == ["blue+siren", "red+siren"]
    assert got["red+siren"]["answer"] == target
    assert got["red+siren"]["instruction"] == "Are the image and the audio related?"
    assert json.loads(got["red+siren"]["meta"]) == {"audio_kind": "siren"}
    assert got["blue+siren"]["instruction"] == ""
    assert got["blue+siren"]["dataset"] == "negative_pairs"
    assert got["blue+siren"]["image"] == (tmp_path / "img" / "blue.jpg").read_bytes()
    assert sorted(skips.paths()) == sorted(
        [str(tmp_path / "snd" / "gone.wav"), str(tmp_path / "snd" / "noise.wav"),
         f"{index}#annotations[4]"]
    )


def test_records_from_all_readers_form_one_table(tmp_path):
    write(tmp_path / "image" / "x.jpg", jpeg_bytes((1, 2, 3)))
    write(tmp_path / "filter_cap.json", {"annotations": [{"image_id": "x", "caption": "c"}]})
    write(tmp_path / "x.wav", audio_bytes(700))
    write(tmp_path / "audio_cap.json", {"annotations": [{"audio_id": "x", "caption": "d"}]})
    records = list(read_cc_sbu_align(tmp_path)) + list(read_clotho(tmp_path / "audio_cap.json"))
    table = records_to_table(records)
    assert table.column("dataset").to_pylist() == ["cc_sbu_align", "clotho"]
    assert table.column("image").type == pa.large_binary()
    assert table.column("audio").to_pylist()[1] == (tmp_path / "x.wav").read_bytes()
