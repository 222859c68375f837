"""The synthetic world's generator streams: pictures, sounds and texts, drawn for pretraining.

Every item comes from its own generator seeded by `(seed, stream_key(stream), index)`. The corpus
that `bubogpt data synth` writes seeds its generators with `(seed, set index 0-5, split index 0-1)`;
a stream key is a CRC-32 of "tiny-components/<stream>", never below 2**16, so no stream ever shares a
generator, and hence an item, with any corpus of any seed (held-out splits included). Within the
pretraining, the training streams and the scoring streams (`*_held_out`) have different names.

What is drawn matches the corpus: pictures by `synth.make_scene` and sounds by `synth.draw_sound`, written
to JPEG / 16-bit WAV bytes and read back by the same preprocessing as `bubogpt data prepare` (eval
transform); texts by the corpus's renderers (`vocab`), one record per corpus dataset with the same
choices as `synth` makes (question type, object asked about, templates, instructions).
"""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from bubogpt.data import synth, vocab
from bubogpt.preprocess import AudioPreprocessConfig, audio_to_fbank_clips, decode_audio

NAMESPACE = "tiny-components"
DATASETS = ("wavcaps", "cc_sbu_align", "llava_instruct", "clotho", "vggss", "negative_pairs")


def stream_key(stream: str) -> int:
    key = zlib.crc32(f"{NAMESPACE}/{stream}".encode())
    if key < 2**16:  # never the case for the names used here; keeps keys apart from set indices
        raise ValueError(f"stream name {stream!r} gives a small key; choose another name")
    return key


def stream_rng(seed: int, stream: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream_key(stream), index])


# --------------------------------------------------------------------------------------------------
# What an item holds (ground truth)
# --------------------------------------------------------------------------------------------------


@dataclass
class WorldScene:
    objects: list[tuple[str, str, str]]  # (colour, kind, position) per object
    style: str
    shade: str

    @property
    def background(self) -> str:
        return vocab.background_phrase(self.style, self.shade)

    @property
    def kinds(self) -> list[str]:
        return [kind for _, kind, _ in self.objects]

    def description(self) -> str:
        return vocab.scene_description(self.objects, self.background)


@dataclass
class WorldSound:
    kind: str
    seconds: float
    loud: bool
    pulse_rate: int = 0

    def description(self) -> str:
        return vocab.sound_description(self.kind, self.seconds, self.loud, self.pulse_rate)


def _kinds(rng: np.random.Generator, n: int, include: str | None, exclude: str | None) -> list[str]:
    pool = [k for k in vocab.OBJECT_KINDS if k not in (include, exclude)]
    others = [pool[i] for i in rng.permutation(len(pool))[: n - (include is not None)]]
    return ([include] if include else []) + others


def sample_scene(
    rng: np.random.Generator, min_objects: int = 1, include: str | None = None, exclude: str | None = None
) -> WorldScene:
    """A scene's attributes only (no pixels), distributed as `synth.make_scene` draws them."""
    n = int(rng.integers(min_objects, 4))
    kinds = _kinds(rng, n, include, exclude)
    colours = [vocab.COLOUR_NAMES[i] for i in rng.permutation(len(vocab.COLOUR_NAMES))[:n]]
    positions = [vocab.POSITIONS[i] for i in rng.permutation(len(vocab.POSITIONS))[:n]]
    order = rng.permutation(n)
    objects = [(colours[i], kinds[i], positions[i]) for i in order]
    style = vocab.BACKGROUND_STYLES[rng.integers(len(vocab.BACKGROUND_STYLES))]
    shade = vocab.BACKGROUND_SHADES[rng.integers(len(vocab.BACKGROUND_SHADES))]
    return WorldScene(objects, style, shade)


def sample_sound(rng: np.random.Generator, kind: str | None = None) -> WorldSound:
    """A sound's attributes only, distributed as `synth.draw_sound` draws them (1 in 8 long)."""
    kind = kind or vocab.SOUND_KINDS[rng.integers(len(vocab.SOUND_KINDS))]
    long = rng.random() < 1 / 8
    seconds = round(float(rng.uniform(*(synth.LONG_SECONDS if long else synth.SHORT_SECONDS))), 2)
    rate = int(rng.choice(synth.PULSE_RATES)) if kind == "pulses" else 0
    return WorldSound(kind, seconds, bool(rng.random() < 0.5), rate)


# --------------------------------------------------------------------------------------------------
# Pictures and sounds as the prepared corpus holds them
# --------------------------------------------------------------------------------------------------


@dataclass
class Picture:
    pixels: np.ndarray  # (S, S, 3) uint8: the JPEG, decoded and resized as the eval transform does
    scene: WorldScene
    kind_cover: np.ndarray  # (kinds, g, g) float32: share of each patch covered by each kind
    colour_cover: np.ndarray  # (colours, g, g) float32


def draw_picture(rng: np.random.Generator, kinds: list[str], image_size: int, grid: int) -> Picture:
    """A corpus-like picture of one object of each of `kinds`, with per-patch coverage maps."""
    scene = synth.make_scene(rng, "stream", kinds)
    buffer = io.BytesIO()
    Image.fromarray(scene.pixels).save(buffer, **synth.JPEG_OPTIONS)
    buffer.seek(0)
    image = Image.open(buffer).convert("RGB")
    # The eval transform's geometry (transforms.Resize on a PIL image = PIL bicubic with antialias).
    pixels = np.asarray(image.resize((image_size, image_size), Image.Resampling.BICUBIC))
    kind_cover = np.zeros((len(vocab.OBJECT_KINDS), grid, grid), np.float32)
    colour_cover = np.zeros((len(vocab.COLOUR_NAMES), grid, grid), np.float32)
    for obj in scene.objects:
        mask = torch.from_numpy(obj.mask.astype(np.float32))[None, None]
        cover = F.interpolate(mask, size=(grid, grid), mode="area")[0, 0].numpy()
        kind_cover[vocab.OBJECT_KINDS.index(obj.kind)] += cover
        colour_cover[vocab.COLOUR_NAMES.index(obj.colour)] += cover
    world = WorldScene(scene.object_triples(), scene.background_style, scene.background_shade)
    return Picture(pixels, world, kind_cover, colour_cover)


def picture_kinds(rng: np.random.Generator) -> list[str]:
    """1-3 distinct kinds, as the corpus's image sets draw them."""
    return _kinds(rng, int(rng.integers(1, 4)), None, None)


@dataclass
class Recording:
    fbank: torch.Tensor  # (clips, 1, mels, frames) float16, as `bubogpt data prepare` stores it
    sound: WorldSound


def draw_recording(rng: np.random.Generator, kind: str, index: int, config: AudioPreprocessConfig) -> Recording:
    """A corpus-like sound (`index` cycles durations, sample rates and channels as the corpus does),
    written as 16-bit WAV, decoded and cut into evenly spaced fbank clips."""
    sound = synth.draw_sound(rng, kind, index)
    waveform, sample_rate = decode_audio(synth.audio_bytes(sound, "WAV"))
    fbank = audio_to_fbank_clips(waveform, sample_rate, config, train=False).to(torch.float16)
    return Recording(fbank, WorldSound(kind, sound.seconds, sound.loud, sound.pulse_rate))


# --------------------------------------------------------------------------------------------------
# Records: (instruction, answer, meta) per corpus dataset, as `synth` writes them
# --------------------------------------------------------------------------------------------------


@dataclass
class Record:
    dataset: str
    instruction: str  # the record's own instruction ("" where the corpus has none)
    answer: str
    meta: dict = field(default_factory=dict)  # the evaluation's ground truth (bubogpt/evaluation.py)
    scene: WorldScene | None = None
    sound: WorldSound | None = None

    @property
    def modalities(self) -> list[str]:
        return [m for m, item in (("vision", self.scene), ("audio", self.sound)) if item is not None]


def _variant(rng: np.random.Generator) -> int:
    return int(rng.integers(1 << 16))


def image_record(rng: np.random.Generator, dataset: str, scene: WorldScene) -> Record:
    """cc_sbu_align (a caption) or llava_instruct (one question of a random type about a random
    object) for a scene."""
    if dataset == "cc_sbu_align":
        return Record(dataset, "", vocab.scene_caption(scene.objects, scene.background, _variant(rng)), scene=scene)
    if dataset != "llava_instruct":
        raise ValueError(f"{dataset} is not an image dataset")
    qtype = vocab.QUESTION_TYPES[rng.integers(len(vocab.QUESTION_TYPES))]
    colour, kind, position = scene.objects[rng.integers(len(scene.objects))]
    question, answer = vocab.question_answer(qtype, colour, kind, position, len(scene.objects), _variant(rng))
    key = {"colour": colour, "kind": kind, "position": position, "count": vocab.NUMBER_WORDS[len(scene.objects)]}
    meta = {"qtype": qtype, "answer_key": key[qtype]}
    return Record(dataset, question, answer, meta, scene=scene)


def audio_record(rng: np.random.Generator, dataset: str, sound: WorldSound) -> Record:
    """wavcaps (a short caption) or clotho (a detailed description) of a sound."""
    if dataset == "wavcaps":
        answer = vocab.audio_caption(sound.kind, sound.seconds, sound.loud, _variant(rng))
    elif dataset == "clotho":
        answer = vocab.detailed_audio_caption(sound.kind, sound.seconds, sound.loud, sound.pulse_rate, _variant(rng))
    else:
        raise ValueError(f"{dataset} is not an audio dataset")
    return Record(dataset, "", answer, {"sound_kind": sound.kind}, sound=sound)


def pair_record(rng: np.random.Generator, scene: WorldScene, sound: WorldSound) -> Record:
    """vggss when an object of the scene makes the sound (its localisation), else negative_pairs."""
    source = vocab.SOUND_SOURCE[sound.kind]
    if source in scene.kinds:
        colour, kind, position = next(obj for obj in scene.objects if obj[1] == source)
        answer = vocab.localisation_caption(sound.kind, colour, kind, position, _variant(rng))
        own = vocab.LOCALISATION_INSTRUCTIONS[rng.integers(len(vocab.LOCALISATION_INSTRUCTIONS))]
        meta = {"related": True, "source_kind": kind, "colour": colour, "position": position, "sound_kind": sound.kind}
        return Record("vggss", own, answer, meta, scene=scene, sound=sound)
    image_caption = vocab.scene_caption(scene.objects, scene.background, _variant(rng))
    sound_caption = vocab.audio_caption(sound.kind, sound.seconds, sound.loud, _variant(rng))
    answer = vocab.negative_caption(image_caption, sound_caption, _variant(rng))
    own = vocab.NEGATIVE_INSTRUCTIONS[rng.integers(len(vocab.NEGATIVE_INSTRUCTIONS))]
    return Record("negative_pairs", own, answer, {"related": False, "sound_kind": sound.kind}, scene=scene, sound=sound)


def pair_scene(rng: np.random.Generator, sound: WorldSound, related: bool) -> WorldScene:
    """A scene for a sound: 2-3 objects, one of them its source (vggss), or 1-3, none its source."""
    source = vocab.SOUND_SOURCE[sound.kind]
    return sample_scene(rng, 2, include=source) if related else sample_scene(rng, 1, exclude=source)


def sample_record(rng: np.random.Generator, dataset: str) -> Record:
    """A record of `dataset` with freshly drawn attributes (no pixels, no waveform)."""
    if dataset in ("cc_sbu_align", "llava_instruct"):
        return image_record(rng, dataset, sample_scene(rng))
    if dataset in ("wavcaps", "clotho"):
        return audio_record(rng, dataset, sample_sound(rng))
    if dataset in ("vggss", "negative_pairs"):
        sound = sample_sound(rng)
        return pair_record(rng, pair_scene(rng, sound, dataset == "vggss"), sound)
    raise ValueError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")
