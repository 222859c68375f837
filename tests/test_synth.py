"""The synthetic corpus: original on-disk formats, ground truth that matches the pixels and the
waveforms, sound kinds that differ as designed, determinism, and clear errors on bad arguments.

Everything is read back with independent tools (PIL, soundfile, tarfile, pycocotools, numpy FFTs)
and checked against the design written in vocab.py / the brief, never against values the generator
reported about itself.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile
from PIL import Image
from pycocotools import mask as mask_utils
from scipy import ndimage

from bubogpt.data import SynthError, all_corpus_words, sample_texts, synthesize, vocab

SETS = ("wavcaps", "cc_sbu_align", "llava_instruct", "clotho", "vggss", "negative_pairs")


# ---------------------------------------------------------------------------------------------
# Fixtures and readers
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "seed0"
    synthesize(out, seed=0, size="tiny")
    return out


def file_digests(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def load(path: Path):
    return json.loads(path.read_text())


def split_dir(root: Path, name: str, split: str) -> Path:
    return root / name / split


def read_scenes(root: Path, name: str, split: str) -> dict[str, dict]:
    scenes = load(split_dir(root, name, split) / "scenes.json")["scenes"]
    return {s["image_id"]: s for s in scenes}


def wavcaps_samples(root: Path, split: str) -> list[tuple[str, bytes, dict]]:
    """(id, flac bytes, json) per sample, read with tarfile in webdataset's grouping rule
    (consecutive members sharing the name before the first dot)."""
    samples = []
    for shard in sorted(split_dir(root, "wavcaps", split).glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            members = tar.getmembers()
            assert len(members) % 2 == 0
            for flac_info, json_info in zip(members[::2], members[1::2]):
                key, ext = flac_info.name.split(".", 1)
                assert ext == "flac" and json_info.name == f"{key}.json"
                flac = tar.extractfile(flac_info).read()
                samples.append((key, flac, json.loads(tar.extractfile(json_info).read())))
    return samples


def all_audio(root: Path):
    """(source, sound_kind, samples (frames, channels), sample_rate, meta) over every audio file."""
    for split in ("train", "eval"):
        for key, flac, annotation in wavcaps_samples(root, split):
            assert soundfile.info(io.BytesIO(flac)).format == "FLAC"
            data, sr = soundfile.read(io.BytesIO(flac), always_2d=True)
            yield f"wavcaps/{key}", annotation["meta"]["sound_kind"], data, sr, annotation["meta"]
        for name, ann_file in (
            ("clotho", "audio_cap.json"),
            ("vggss", "vggss_instruction.json"),
            ("negative_pairs", "negative_pairs.json"),
        ):
            folder = split_dir(root, name, split)
            for ann in load(folder / ann_file)["annotations"]:
                path = folder / "audio" / f"{ann['audio_id']}.wav"
                assert soundfile.info(str(path)).format == "WAV"
                data, sr = soundfile.read(str(path), always_2d=True)
                yield f"{name}/{ann['audio_id']}", ann["meta"]["sound_kind"], data, sr, ann["meta"]


# ---------------------------------------------------------------------------------------------
# Sound analysis: features measured from the waveform, and the designed property of each kind
# ---------------------------------------------------------------------------------------------


def sound_features(samples: np.ndarray, sr: int) -> dict[str, float]:
    mono = samples.mean(axis=1)
    # Spectral frames: 40 ms Hann, 10 ms hop.
    frame, hop = int(0.04 * sr), int(0.01 * sr)
    starts = np.arange(0, len(mono) - frame, hop)
    frames = mono[starts[:, None] + np.arange(frame)[None, :]] * np.hanning(frame)
    power = np.abs(np.fft.rfft(frames, n=4096)) ** 2
    freqs = np.fft.rfftfreq(4096, 1.0 / sr)
    rms = np.sqrt((frames**2).mean(axis=1))
    active = rms > 0.1 * rms.max()
    dominant = freqs[power.argmax(axis=1)][active]
    p = power[active] + 1e-20
    flatness = np.exp(np.log(p).mean(axis=1)) / p.mean(axis=1)
    centroid = (p * freqs).sum(axis=1) / p.sum(axis=1)
    # Envelope on 5 ms blocks, fine enough to see the gaps between beeps.
    block = int(0.005 * sr)
    env = np.sqrt((mono[: len(mono) // block * block].reshape(-1, block) ** 2).mean(axis=1))
    steps = np.diff(dominant)
    return {
        "dominant_median": float(np.median(dominant)),
        "dominant_spread": float(np.percentile(dominant, 95) - np.percentile(dominant, 5)),
        "flatness": float(np.median(flatness)),
        "centroid": float(np.median(centroid)),
        "rising": float((steps > 0).mean()) if len(steps) else 0.0,
        "gap_fraction": float((env < 0.1 * env.max()).mean()),
        "in_tone_band": float(((dominant > 390) & (dominant < 610)).mean()),
        "in_siren_low": float(((dominant > 780) & (dominant < 920)).mean()),
        "in_siren_high": float(((dominant > 780 * 1.4) & (dominant < 920 * 1.4)).mean()),
    }


# The designed property of each sound kind (the synth module's constants, vocab.SOUND_DETAILS).
SOUND_PROPERTIES = {
    "tone": lambda f: f["in_tone_band"] > 0.9 and f["dominant_spread"] < 30,
    "buzz": lambda f: f["dominant_median"] < 250 and f["centroid"] > 2 * f["dominant_median"],
    "chirp": lambda f: f["rising"] > 0.6 and f["dominant_spread"] > 2000,
    "pulses": lambda f: f["gap_fraction"] > 0.35 and 1900 < f["dominant_median"] < 2500,
    "hiss": lambda f: f["flatness"] > 0.3,
    "siren": lambda f: (
        f["in_siren_low"] > 0.3
        and f["in_siren_high"] > 0.3
        and f["in_siren_low"] + f["in_siren_high"] > 0.85
    ),
}


def classify_sound(samples: np.ndarray, sr: int) -> list[str]:
    """Every kind whose designed property the waveform has (a distinct kind: exactly one)."""
    features = sound_features(samples, sr)
    return [kind for kind, has in SOUND_PROPERTIES.items() if has(features)]


def audio_of(root: Path, name: str, split: str, audio_id: str) -> tuple[np.ndarray, int]:
    data, sr = soundfile.read(
        str(split_dir(root, name, split) / "audio" / f"{audio_id}.wav"), always_2d=True
    )
    return data, sr


# ---------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_bytes_and_another_seed_differs(corpus, tmp_path):
    again = tmp_path / "again"
    other = tmp_path / "other"
    synthesize(again, seed=0, size="tiny")
    synthesize(other, seed=1, size="tiny")
    first, second, third = file_digests(corpus), file_digests(again), file_digests(other)
    assert len(first) > 60
    assert first == second
    media = [p for p in first if p.endswith((".jpg", ".wav", ".tar"))]
    assert media and all(first[p] != third.get(p) for p in media)


# ---------------------------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------------------------


def test_corpus_json_describes_every_set_with_true_counts(corpus):
    description = load(corpus / "corpus.json")
    assert description["seed"] == 0 and description["size"] in ("tiny", "small", "medium")
    assert set(description["sets"]) == set(SETS)
    for name in SETS:
        splits = description["sets"][name]["splits"]
        assert set(splits) == {"train", "eval"}
        for split, info in splits.items():
            assert (corpus / info["path"]).is_dir()
            if name == "wavcaps":
                actual = len(wavcaps_samples(corpus, split))
            else:
                annotations = load(corpus / info["annotations"])
                actual = len(
                    annotations if name == "llava_instruct" else annotations["annotations"]
                )
            assert info["count"] == actual > 0
        # A held-out split of roughly 15-20% (rounded up to two items in the tiny build).
        n_train, n_eval = splits["train"]["count"], splits["eval"]["count"]
        assert 0.1 <= n_eval / (n_train + n_eval) <= 0.3


def test_wavcaps_is_webdataset_of_flac_and_caption_json(corpus):
    ids = {}
    for split in ("train", "eval"):
        samples = wavcaps_samples(corpus, split)
        assert samples
        for _key, flac, annotation in samples:
            assert isinstance(annotation["caption"], str) and len(annotation["caption"]) > 5
            data, sr = soundfile.read(io.BytesIO(flac), always_2d=True)
            assert data.shape[0] > sr * 0.9
        ids[split] = {key for key, _, _ in samples}
    assert ids["train"].isdisjoint(ids["eval"])


def test_cc_sbu_align_layout(corpus):
    ids = {}
    for split in ("train", "eval"):
        folder = split_dir(corpus, "cc_sbu_align", split)
        annotations = load(folder / "filter_cap.json")["annotations"]
        scenes = read_scenes(corpus, "cc_sbu_align", split)
        for ann in annotations:
            # The original's keys, plus the synthetic corpus' `meta` (as its other sets carry): the
            # scene's objects, which the evaluation scores captions against.
            assert set(ann) == {"image_id", "caption", "meta"}
            objects = scenes[ann["image_id"]]["objects"]
            assert ann["meta"] == {"object_kinds": [o["kind"] for o in objects], "colours": [o["colour"] for o in objects]}
            with Image.open(folder / "image" / f"{ann['image_id']}.jpg") as image:
                assert image.format == "JPEG"
            # The caption names every object with its colour and position.
            for obj in scenes[ann["image_id"]]["objects"]:
                assert (
                    f"{obj['colour']} {obj['kind']} {vocab.POSITION_PHRASES[obj['position']]}"
                    in ann["caption"]
                )
        ids[split] = {a["image_id"] for a in annotations}
    assert ids["train"].isdisjoint(ids["eval"])


def test_llava_entries_follow_the_format_and_answer_from_ground_truth(corpus):
    ids, images, qtypes = {}, {}, set()
    for split in ("train", "eval"):
        folder = split_dir(corpus, "llava_instruct", split)
        entries = load(folder / "llava_instruct.json")
        scenes = {k: v for k, v in read_scenes(corpus, "llava_instruct", split).items()}
        assert isinstance(entries, list) and entries
        for entry in entries:
            conv = entry["conversations"]
            assert [turn["from"] for turn in conv] == ["human", "gpt"]
            assert conv[0]["value"].startswith("<image>\n")
            with Image.open(folder / "image" / entry["image"]) as image:
                assert image.format == "JPEG"
            scene = scenes[Path(entry["image"]).stem]
            meta, answer = entry["meta"], conv[1]["value"]
            qtypes.add(meta["qtype"])
            if meta["qtype"] == "count":
                assert meta["answer_key"] == vocab.NUMBER_WORDS[len(scene["objects"])]
                assert meta["answer_key"] in answer
                continue
            (obj,) = [o for o in scene["objects"] if o["kind"] == meta["object"]["kind"]]
            truth = {"colour": obj["colour"], "kind": obj["kind"], "position": obj["position"]}
            assert meta["answer_key"] == truth[meta["qtype"]]
            # The answer says it (positions as their phrase, e.g. "on the left").
            said = (
                vocab.POSITION_PHRASES[obj["position"]]
                if meta["qtype"] == "position"
                else truth[meta["qtype"]]
            )
            assert said in answer
            # The question names the object by what is *not* asked.
            question = conv[0]["value"]
            if meta["qtype"] == "colour":
                assert obj["kind"] in question and obj["colour"] not in question
            if meta["qtype"] == "kind":
                assert obj["colour"] in question and obj["kind"] not in question
        ids[split] = {e["id"] for e in entries}
        images[split] = {e["image"] for e in entries}
    assert ids["train"].isdisjoint(ids["eval"]) and images["train"].isdisjoint(images["eval"])
    assert qtypes == {"colour", "kind", "position", "count"}


def test_clotho_layout(corpus):
    ids = {}
    for split in ("train", "eval"):
        folder = split_dir(corpus, "clotho", split)
        annotations = load(folder / "audio_cap.json")["annotations"]
        for ann in annotations:
            assert {"audio_id", "caption"} <= set(ann)
            assert soundfile.info(str(folder / "audio" / f"{ann['audio_id']}.wav")).format == "WAV"
            # Detailed: several sentences, naming the sound.
            assert ann["caption"].count(".") >= 3
            assert vocab.SOUND_PHRASES[ann["meta"]["sound_kind"]] in ann["caption"]
        ids[split] = {a["audio_id"] for a in annotations}
    assert ids["train"].isdisjoint(ids["eval"])


@pytest.mark.parametrize(
    "name, ann_file",
    [("vggss", "vggss_instruction.json"), ("negative_pairs", "negative_pairs.json")],
)
def test_paired_sets_layout(corpus, name, ann_file):
    ids = {}
    for split in ("train", "eval"):
        folder = split_dir(corpus, name, split)
        annotations = load(folder / ann_file)["annotations"]
        for ann in annotations:
            assert {"audio_id", "image_id", "caption"} <= set(ann)
            assert (folder / "audio" / f"{ann['audio_id']}.wav").is_file()
            assert (folder / "image" / f"{ann['image_id']}.jpg").is_file()
        ids[split] = {a["audio_id"] for a in annotations} | {a["image_id"] for a in annotations}
    assert ids["train"].isdisjoint(ids["eval"])


# ---------------------------------------------------------------------------------------------
# Ground truth against pixels
# ---------------------------------------------------------------------------------------------


def expected_position(bbox, width, height) -> str:
    """The documented rule: centre within 0.12 of the middle on both axes, else larger offset."""
    dx = (bbox[0] + bbox[2]) / 2 / width - 0.5
    dy = (bbox[1] + bbox[3]) / 2 / height - 0.5
    if max(abs(dx), abs(dy)) < 0.12:
        return "center"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def test_masks_boxes_and_colours_match_the_decoded_jpegs(corpus):
    palette = {name: np.array(rgb, dtype=np.float64) for name, rgb in vocab.COLOURS.items()}
    shapes, n_objects = set(), 0
    for name in ("cc_sbu_align", "llava_instruct", "vggss", "negative_pairs"):
        for split in ("train", "eval"):
            for image_id, scene in read_scenes(corpus, name, split).items():
                with Image.open(split_dir(corpus, name, split) / "image" / f"{image_id}.jpg") as im:
                    pixels = np.asarray(im.convert("RGB"), dtype=np.float64)
                height, width = pixels.shape[:2]
                assert (width, height) == (scene["width"], scene["height"])
                assert 160 <= width <= 320 and 160 <= height <= 320
                objects = scene["objects"]
                assert 1 <= len(objects) <= 3
                assert len({o["kind"] for o in objects}) == len(objects)
                covered = np.zeros((height, width), dtype=bool)
                for obj in objects:
                    mask = mask_utils.decode(obj["mask_rle"]).astype(bool)
                    assert mask.shape == (height, width) and obj["area"] == mask.sum() > 50
                    assert not (covered & mask).any()  # objects do not overlap
                    covered |= mask
                    ys, xs = np.nonzero(mask)
                    assert obj["bbox"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
                    mean = pixels[mask].mean(axis=0)
                    distances = {c: np.linalg.norm(mean - rgb) for c, rgb in palette.items()}
                    assert distances[obj["colour"]] < 40, (image_id, obj["colour"], mean)
                    assert min(distances, key=distances.get) == obj["colour"]
                    assert obj["position"] == expected_position(obj["bbox"], width, height)
                    shapes.add(obj["kind"])
                    n_objects += 1
                # The background (away from the shapes' edges) has no object colour anywhere.
                background = pixels[~ndimage.binary_dilation(covered, iterations=3)]
                nearest = np.min(
                    [np.linalg.norm(background - rgb, axis=1) for rgb in palette.values()], axis=0
                )
                assert nearest.min() > 60, image_id
    assert shapes == set(vocab.OBJECT_KINDS) and n_objects > 40


def test_images_vary_in_size_and_are_mostly_not_square(corpus):
    sizes = [
        (s["width"], s["height"])
        for name in ("cc_sbu_align", "llava_instruct", "vggss", "negative_pairs")
        for s in read_scenes(corpus, name, "train").values()
    ]
    assert len(set(sizes)) > len(sizes) // 2
    assert sum(w != h for w, h in sizes) > len(sizes) // 2


# ---------------------------------------------------------------------------------------------
# Sounds
# ---------------------------------------------------------------------------------------------


def test_each_sound_has_exactly_its_kinds_designed_property(corpus):
    seen = set()
    for source, kind, data, sr, _ in all_audio(corpus):
        assert classify_sound(data, sr) == [kind], source
        seen.add(kind)
    assert seen == set(vocab.SOUND_KINDS)


def test_durations_rates_and_channels_vary(corpus):
    durations, rates, channels = [], set(), set()
    for source, _, data, sr, meta in all_audio(corpus):
        durations.append(data.shape[0] / sr)
        rates.add(sr)
        channels.add(data.shape[1])
        assert abs(meta["duration"] - data.shape[0] / sr) < 1e-3, source
    assert 1.0 <= min(durations) < 2.0 and 6.0 < max(durations) <= 12.0
    assert {16000, 22050, 44100} <= rates
    assert channels == {1, 2}


def test_sound_kinds_map_one_to_one_onto_object_kinds():
    assert len(vocab.OBJECT_KINDS) >= 6 and len(vocab.SOUND_KINDS) >= 6
    assert set(vocab.SOURCE_SOUND) == set(vocab.OBJECT_KINDS)
    assert sorted(vocab.SOURCE_SOUND.values()) == sorted(vocab.SOUND_KINDS)
    colours = list(vocab.COLOURS.values())
    assert len(colours) >= 5
    gaps = [
        np.linalg.norm(np.subtract(a, b)) for i, a in enumerate(colours) for b in colours[i + 1 :]
    ]
    assert min(gaps) > 100


# ---------------------------------------------------------------------------------------------
# Localisation and negative pairs
# ---------------------------------------------------------------------------------------------


def test_localisation_sound_comes_from_exactly_one_object_named_in_caption(corpus):
    for split in ("train", "eval"):
        scenes = read_scenes(corpus, "vggss", split)
        for ann in load(split_dir(corpus, "vggss", split) / "vggss_instruction.json")[
            "annotations"
        ]:
            (heard,) = classify_sound(*audio_of(corpus, "vggss", split, ann["audio_id"]))
            objects = scenes[ann["image_id"]]["objects"]
            assert len(objects) in (2, 3)
            sources = [o for o in objects if vocab.SOURCE_SOUND[o["kind"]] == heard]
            assert len(sources) == 1, ann["image_id"]
            (source,) = sources
            assert ann["meta"]["bbox"] == source["bbox"]
            caption = ann["caption"]
            assert vocab.SOUND_PHRASES[heard] in caption.lower()
            assert (
                f"{source['colour']} {source['kind']} {vocab.POSITION_PHRASES[source['position']]}"
                in caption
            )
            assert ann["instruction"] in vocab.LOCALISATION_INSTRUCTIONS


def test_negative_pairs_sound_comes_from_no_object_and_caption_says_so(corpus):
    for split in ("train", "eval"):
        scenes = read_scenes(corpus, "negative_pairs", split)
        for ann in load(split_dir(corpus, "negative_pairs", split) / "negative_pairs.json")[
            "annotations"
        ]:
            (heard,) = classify_sound(*audio_of(corpus, "negative_pairs", split, ann["audio_id"]))
            kinds = {o["kind"] for o in scenes[ann["image_id"]]["objects"]}
            assert vocab.SOUND_SOURCE[heard] not in kinds
            first_sentence = ann["caption"].split(".")[0]
            assert re.search(r"unrelated|not seem to match", first_sentence)
            # Then it describes both: every object, and the sound.
            for obj in scenes[ann["image_id"]]["objects"]:
                assert f"{obj['colour']} {obj['kind']}" in ann["caption"]
            assert vocab.SOUND_PHRASES[heard] in ann["caption"].lower()


# ---------------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------------


def corpus_texts(root: Path) -> list[str]:
    texts = []
    for split in ("train", "eval"):
        texts += [a["caption"] for _, _, a in wavcaps_samples(root, split)]
        texts += [
            a["caption"]
            for a in load(root / "cc_sbu_align" / split / "filter_cap.json")["annotations"]
        ]
        for entry in load(root / "llava_instruct" / split / "llava_instruct.json"):
            texts += [turn["value"] for turn in entry["conversations"]]
        texts += [
            a["caption"] for a in load(root / "clotho" / split / "audio_cap.json")["annotations"]
        ]
        for name, ann_file in (
            ("vggss", "vggss_instruction.json"),
            ("negative_pairs", "negative_pairs.json"),
        ):
            for a in load(root / name / split / ann_file)["annotations"]:
                texts += [a["caption"], a["instruction"]]
    return texts


def test_corpus_words_cover_every_text_the_corpus_contains(corpus):
    known = set(all_corpus_words())
    used = {w.lower() for text in corpus_texts(corpus) for w in re.findall(r"[A-Za-z]+", text)}
    assert used - known == set()
    for word in (*vocab.OBJECT_KINDS, *vocab.COLOURS, *vocab.POSITIONS, *vocab.SOUND_KINDS[:1]):
        assert word in known
    # Every template is rendered somewhere in sample_texts (its fixed words appear in order).
    texts = "\n".join(sample_texts())
    for template in (*vocab.SCENE_CAPTIONS, *vocab.AUDIO_CAPTIONS, *vocab.LOCALISATION_CAPTIONS):
        pattern = ".*".join(
            re.escape(part) for part in re.split(r"\{\w+\}", template) if part.strip()
        )
        assert re.search(pattern, texts, flags=re.IGNORECASE), template


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def test_bad_arguments_raise_clear_errors_and_lose_nothing(tmp_path, corpus):
    with pytest.raises(ValueError, match="huge"):
        synthesize(tmp_path / "a", size="huge")
    with pytest.raises(SynthError, match="seed"):
        synthesize(tmp_path / "b", seed=-1, size="tiny")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(SynthError, match="not empty"):
        synthesize(mine, size="tiny")
    with pytest.raises(SynthError, match="not a synthetic corpus"):
        synthesize(mine, size="tiny", overwrite=True)
    assert (mine / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no half-built leftovers

    # An existing corpus is replaced only when asked.
    built = tmp_path / "built"
    synthesize(built, seed=0, size="tiny")
    with pytest.raises(SynthError, match="not empty"):
        synthesize(built, seed=1, size="tiny")
    assert load(built / "corpus.json")["seed"] == 0
    synthesize(built, seed=1, size="tiny", overwrite=True)
    assert load(built / "corpus.json")["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["built", "mine"]
