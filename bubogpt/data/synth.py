"""Synthetic multimodal corpus, written in the original corpora's on-disk formats.

The real corpora (WavCaps, cc_sbu_align, LLaVA-Instruct, Clotho, VGGSS) cannot be downloaded here,
so `synthesize` builds a small world with the same layouts: pictures of coloured shapes over grey
backgrounds, and synthesised sounds, one sound kind per shape kind (`vocab.SOURCE_SOUND`). The same
readers serve both. Ground truth (boxes, COCO-RLE masks, sound parameters) is kept alongside, in
extra fields (`meta`) and `scenes.json` files, which readers of the original formats ignore.

Layout (paths in corpus.json are relative to OUT; each set has `train` and a disjoint `eval` split):

    OUT/corpus.json
    OUT/wavcaps/<split>/shard-000000.tar     webdataset: <id>.flac + <id>.json {"caption", "meta"}
    OUT/cc_sbu_align/<split>/filter_cap.json {"annotations": [{"image_id", "caption", "meta"}]}
                        image/<image_id>.jpg, scenes.json
    OUT/llava_instruct/<split>/llava_instruct.json
                        [{"id", "image", "conversations": [{"from", "value"}], "meta"}]
                        image/<image>, scenes.json
    OUT/clotho/<split>/audio_cap.json        {"annotations": [{"audio_id", "caption", "meta"}]}
                        audio/<audio_id>.wav
    OUT/vggss/<split>/vggss_instruction.json {"annotations": [{"audio_id", "image_id", "caption",
                                              "instruction", "meta"}]}
                        audio/<audio_id>.wav, image/<image_id>.jpg, scenes.json
    OUT/negative_pairs/<split>/negative_pairs.json
                        same fields as vggss, but no object in the image makes the sound
                        audio/<audio_id>.wav, image/<image_id>.jpg, scenes.json

scenes.json: {"scenes": [{"image_id", "width", "height", "background": {"style", "shade"},
"objects": [{"kind", "colour", "rgb", "position", "bbox", "area", "mask_rle"}]}]}, where bbox is
[x0, y0, x1, y1] in pixels with x1, y1 exclusive (the tight box of the mask) and mask_rle is
pycocotools' RLE with `counts` as an ASCII string.

Deterministic: one numpy Generator per (seed, set, split) draws everything, files are written with
fixed options (JPEG quality 95 without chroma subsampling, 16-bit PCM, tar members with mtime 0) and
JSON with sorted keys, so one seed gives identical bytes.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from bubogpt.atomic import replace_directory, staging_directory
from bubogpt.data import vocab


class SynthError(ValueError):
    """Bad arguments to `synthesize` (unknown size, negative seed, output folder in use)."""


# ---------------------------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CorpusSize:
    """Train-split item counts per set; each eval split holds `eval_fraction` as many again."""

    wavcaps: int  # audio-caption pairs (stage 1)
    cc_sbu_align: int  # image-caption pairs
    llava_instruct: int  # images, each with `questions_per_image` single-turn entries
    clotho: int  # audio with detailed descriptions
    vggss: int  # image + the sound of one of its objects
    negative_pairs: int  # image + a sound that none of its objects makes
    questions_per_image: int = 2
    eval_fraction: float = 0.2
    shard_size: int = 100  # webdataset samples per tar

    def eval_count(self, train_count: int) -> int:
        return max(2, int(round(train_count * self.eval_fraction)))


SIZES = {
    # Enough of everything for the tests (every kind, a long clip, stereo, 44.1 kHz): a few seconds.
    "tiny": CorpusSize(
        wavcaps=12, cc_sbu_align=6, llava_instruct=6, clotho=8, vggss=8, negative_pairs=6,
        shard_size=8,
    ),
    # ~200 images, ~280 sounds: under a minute on one core.
    "small": CorpusSize(
        wavcaps=120, cc_sbu_align=50, llava_instruct=50, clotho=40, vggss=40, negative_pairs=30
    ),
    # ~3,800 examples for real (tiny-model) training: a few minutes. Three times as many sound
    # localisations and negative pairs as the other sets' 320-400: with 320, the tiny stage 2 would show
    # each pair ~15 times, and at ~7 times it already located its training pairs better than held-out
    # ones (benchmarks/train_quickstart.md).
    "medium": CorpusSize(
        wavcaps=960, cc_sbu_align=400, llava_instruct=400, clotho=320, vggss=960,
        negative_pairs=720,
    ),
}  # fmt: skip

SET_NAMES = ("wavcaps", "cc_sbu_align", "llava_instruct", "clotho", "vggss", "negative_pairs")
SPLITS = ("train", "eval")

# ---------------------------------------------------------------------------------------------
# Images: coloured shapes on grey backgrounds
# ---------------------------------------------------------------------------------------------

IMAGE_SIDE = (160, 320)  # width and height drawn independently, so most images are not square
RADIUS_FRACTION = (0.09, 0.15)  # of the shorter side
MIN_GAP_PX = 6  # between object boxes, so no object touches (or JPEG-bleeds into) another
COLOUR_JITTER = 12  # per channel, around the colour name's RGB
JPEG_OPTIONS = {"format": "JPEG", "quality": 95, "subsampling": 0, "optimize": False}

# Where a box centre is drawn for each position word, as fractions of (width, height). The regions
# leave margins to the thresholds of `position_word`, so the word is unambiguous.
POSITION_REGIONS = {
    "left": ((0.12, 0.30), (0.42, 0.58)),
    "right": ((0.70, 0.88), (0.42, 0.58)),
    "top": ((0.42, 0.58), (0.12, 0.30)),
    "bottom": ((0.42, 0.58), (0.70, 0.88)),
    "center": ((0.44, 0.56), (0.44, 0.56)),
}
CENTER_THRESHOLD = 0.12  # |offset from the middle| below this on both axes is "center"

BACKGROUND_LEVELS = {"light": (185, 225), "medium": (120, 160), "dark": (45, 85)}
BACKGROUND_TINT = 8  # per-channel offset from grey: backgrounds stay far from every object colour


@dataclass
class SceneObject:
    kind: str
    colour: str
    rgb: tuple[int, int, int]  # painted colour: the colour name's RGB plus a small jitter
    position: str
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 (pixels, x1/y1 exclusive), tight around mask
    mask: np.ndarray  # (H, W) bool

    def to_json(self) -> dict[str, Any]:
        rle = mask_utils.encode(np.asfortranarray(self.mask.astype(np.uint8)))
        return {
            "kind": self.kind,
            "colour": self.colour,
            "rgb": list(self.rgb),
            "position": self.position,
            "bbox": list(self.bbox),
            "area": int(self.mask.sum()),
            "mask_rle": {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")},
        }


@dataclass
class Scene:
    image_id: str
    pixels: np.ndarray  # (H, W, 3) uint8
    background_style: str
    background_shade: str
    objects: list[SceneObject]

    @property
    def height(self) -> int:
        return self.pixels.shape[0]

    @property
    def width(self) -> int:
        return self.pixels.shape[1]

    @property
    def background_phrase(self) -> str:
        return vocab.background_phrase(self.background_style, self.background_shade)

    def object_triples(self) -> list[tuple[str, str, str]]:
        """(colour, kind, position) per object, for captions."""
        return [(o.colour, o.kind, o.position) for o in self.objects]

    def to_json(self) -> dict[str, Any]:
        return {
            "image_id": self.image_id,
            "width": self.width,
            "height": self.height,
            "background": {"style": self.background_style, "shade": self.background_shade},
            "objects": [o.to_json() for o in self.objects],
        }


def position_word(bbox: tuple[int, int, int, int], width: int, height: int) -> str:
    """The position word of a box: "center" when its centre is within CENTER_THRESHOLD of the middle
    on both axes, else the side of the axis with the larger offset (fractions of the image side)."""
    dx = (bbox[0] + bbox[2]) / 2 / width - 0.5
    dy = (bbox[1] + bbox[3]) / 2 / height - 0.5
    if max(abs(dx), abs(dy)) < CENTER_THRESHOLD:
        return "center"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def _regular_polygon(cx: float, cy: float, r: float, sides: int, start_deg: float) -> list:
    angles = np.deg2rad(start_deg + 360.0 * np.arange(sides) / sides)
    return [(cx + r * np.cos(a), cy + r * np.sin(a)) for a in angles]


def _star(cx: float, cy: float, r: float) -> list:
    """Five-pointed star, one point up; inner radius 0.45 r keeps the points thick enough to see."""
    angles = np.deg2rad(-90.0 + 36.0 * np.arange(10))
    radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
    return [(cx + rr * np.cos(a), cy + rr * np.sin(a)) for a, rr in zip(angles, radii)]


def shape_mask(kind: str, cx: float, cy: float, r: float, width: int, height: int) -> np.ndarray:
    """(H, W) bool mask of one shape of circumradius r centred at (cx, cy)."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif kind == "square":
        half = 0.85 * r  # about the circle's area
        draw.rectangle([cx - half, cy - half, cx + half, cy + half], fill=255)
    elif kind == "triangle":
        draw.polygon(_regular_polygon(cx, cy, r, 3, -90.0), fill=255)
    elif kind == "star":
        draw.polygon(_star(cx, cy, r), fill=255)
    elif kind == "hexagon":
        draw.polygon(_regular_polygon(cx, cy, r, 6, 0.0), fill=255)
    elif kind == "cross":
        arm = 0.3 * r  # half the arm's thickness
        draw.rectangle([cx - r, cy - arm, cx + r, cy + arm], fill=255)
        draw.rectangle([cx - arm, cy - r, cx + arm, cy + r], fill=255)
    else:
        raise SynthError(f"unknown object kind {kind!r}; expected one of {vocab.OBJECT_KINDS}")
    return np.asarray(canvas) > 0


def tight_bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _boxes_apart(a: tuple[int, ...], b: tuple[int, ...], gap: int) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _background(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, str, str]:
    """(H, W, 3) float32 grey background (plain, linear gradient or light noise), style, shade."""
    style = vocab.BACKGROUND_STYLES[rng.integers(len(vocab.BACKGROUND_STYLES))]
    shade = vocab.BACKGROUND_SHADES[rng.integers(len(vocab.BACKGROUND_SHADES))]
    low, high = BACKGROUND_LEVELS[shade]
    tint = rng.integers(-BACKGROUND_TINT, BACKGROUND_TINT + 1, size=3)
    level = rng.uniform(low, high)
    pixels = np.full((height, width, 3), level, dtype=np.float32) + tint
    if style == "shaded":
        # A ramp of up to the shade's own range along a random direction.
        angle = rng.uniform(0.0, 2.0 * np.pi)
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        ramp = (xs / width - 0.5) * np.cos(angle) + (ys / height - 0.5) * np.sin(angle)
        pixels += (ramp * (high - low))[..., None]
    elif style == "speckled":
        pixels += rng.normal(0.0, 6.0, size=(height, width, 1)).astype(np.float32)
    return pixels, style, shade


def make_scene(rng: np.random.Generator, image_id: str, kinds: list[str]) -> Scene:
    """One picture holding one object of each of `kinds` (distinct), with distinct colours and
    distinct position words, never touching each other."""
    if len(set(kinds)) != len(kinds) or not 1 <= len(kinds) <= len(vocab.POSITIONS):
        raise SynthError(f"a scene needs 1-{len(vocab.POSITIONS)} distinct kinds, got {kinds}")
    width, height = (int(v) for v in rng.integers(IMAGE_SIDE[0], IMAGE_SIDE[1] + 1, size=2))
    pixels, style, shade = _background(rng, width, height)
    colours = [vocab.COLOUR_NAMES[i] for i in rng.permutation(len(vocab.COLOURS))[: len(kinds)]]

    objects: list[SceneObject] = []
    for attempt in range(1000):
        shrink = 0.85 ** (attempt // 100)  # crowded small images: try smaller shapes
        positions = [
            vocab.POSITIONS[i] for i in rng.permutation(len(vocab.POSITIONS))[: len(kinds)]
        ]
        objects = []
        for kind, colour, position in zip(kinds, colours, positions):
            r = rng.uniform(*RADIUS_FRACTION) * min(width, height) * shrink
            (x_lo, x_hi), (y_lo, y_hi) = POSITION_REGIONS[position]
            cx = np.clip(rng.uniform(x_lo, x_hi) * width, r + 2, width - r - 3)
            cy = np.clip(rng.uniform(y_lo, y_hi) * height, r + 2, height - r - 3)
            mask = shape_mask(kind, cx, cy, r, width, height)
            bbox = tight_bbox(mask)
            if position_word(bbox, width, height) != position:
                break
            if not all(_boxes_apart(bbox, o.bbox, MIN_GAP_PX) for o in objects):
                break
            base = np.array(vocab.COLOURS[colour])
            jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
            rgb = tuple(int(v) for v in np.clip(base + jitter, 0, 255))
            objects.append(SceneObject(kind, colour, rgb, position, bbox, mask))
        if len(objects) == len(kinds):
            break
    else:
        raise RuntimeError(f"could not place {kinds} in a {width}x{height} image")

    for obj in objects:
        # The mask is the only thing painted, so pixels of colour are exactly the mask.
        pixels[obj.mask] = obj.rgb
    image = np.clip(np.round(pixels), 0, 255).astype(np.uint8)
    return Scene(image_id, image, style, shade, objects)


def write_jpeg(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, **JPEG_OPTIONS)  # (H, W, 3) uint8 -> RGB


# ---------------------------------------------------------------------------------------------
# Sounds
# ---------------------------------------------------------------------------------------------

SAMPLE_RATES = (16000, 22050, 44100)
SHORT_SECONDS = (1.0, 4.0)
LONG_SECONDS = (6.0, 12.0)
FADE_SECONDS = 0.01
NOISE_FLOOR = 0.001  # keeps silent gaps from being digital zeros, like a real recording

# The design each sound kind follows (Hz, seconds). The steady kinds' bands do not overlap, the
# chirp rises, the pulses leave gaps and the hiss has no pitch: the dominant frequency, its change
# over time, the envelope and the spectral flatness tell the kinds apart (tests/test_synth.py).
TONE_HZ = (400.0, 600.0)  # steady sine
BUZZ_HZ = (100.0, 160.0)  # square wave fundamental
CHIRP_START_HZ = (300.0, 400.0)  # linear sweep up ...
CHIRP_END_HZ = (2800.0, 3500.0)  # ... to here, over 85% of each period, then a short rest
CHIRP_PERIOD_S = (0.8, 1.2)
PULSE_HZ = (2000.0, 2400.0)  # beep carrier
PULSE_RATES = (3, 4, 5, 6)  # beeps per second
PULSE_LENGTH_S = (0.04, 0.07)
SIREN_LOW_HZ = (800.0, 900.0)
SIREN_RATIO = 1.4  # high pitch = 1.4 x low pitch
SIREN_HALF_PERIOD_S = (0.25, 0.4)
QUIET_PEAK = (0.25, 0.45)
LOUD_PEAK = (0.55, 0.85)


@dataclass
class Sound:
    kind: str
    waveform: np.ndarray  # (frames, channels) float32 in [-1, 1]
    sample_rate: int
    peak: float  # of the loudest channel
    pulse_rate: int  # beeps per second for "pulses", else 0

    @property
    def seconds(self) -> float:
        return self.waveform.shape[0] / self.sample_rate

    @property
    def channels(self) -> int:
        return self.waveform.shape[1]

    @property
    def loud(self) -> bool:
        return self.peak >= LOUD_PEAK[0]

    def meta(self) -> dict[str, Any]:
        return {
            "sound_kind": self.kind,
            "source_kind": vocab.SOUND_SOURCE[self.kind],
            "duration": round(self.seconds, 4),
            "sample_rate": self.sample_rate,
            "channels": self.channels,
            "peak": round(self.peak, 4),
            "pulse_rate": self.pulse_rate,
        }


def _sweep_phase(frequency: np.ndarray, sample_rate: int) -> np.ndarray:
    """Phase (radians) of a sine whose instantaneous frequency is `frequency` (Hz per sample)."""
    return 2.0 * np.pi * np.cumsum(frequency) / sample_rate


def sound_waveform(
    rng: np.random.Generator, kind: str, n_frames: int, sample_rate: int
) -> tuple[np.ndarray, int]:
    """(n_frames,) float64 mono signal of peak about 1 following the kind's design, and the pulse
    rate (0 unless kind is "pulses")."""
    t = np.arange(n_frames) / sample_rate
    if kind == "tone":
        return np.sin(2.0 * np.pi * rng.uniform(*TONE_HZ) * t), 0
    if kind == "buzz":
        return np.sign(np.sin(2.0 * np.pi * rng.uniform(*BUZZ_HZ) * t)), 0
    if kind == "chirp":
        period = rng.uniform(*CHIRP_PERIOD_S)
        start, end = rng.uniform(*CHIRP_START_HZ), rng.uniform(*CHIRP_END_HZ)
        progress = (t % period) / (0.85 * period)  # 0 -> 1 over the sweep, > 1 in the rest
        frequency = start + (end - start) * np.minimum(progress, 1.0)
        gate = _smooth_gate(progress <= 1.0, sample_rate)
        return np.sin(_sweep_phase(frequency, sample_rate)) * gate, 0
    if kind == "pulses":
        rate = int(rng.choice(PULSE_RATES))
        length = rng.uniform(*PULSE_LENGTH_S)
        gate = _smooth_gate((t % (1.0 / rate)) < length, sample_rate)
        return np.sin(2.0 * np.pi * rng.uniform(*PULSE_HZ) * t) * gate, rate
    if kind == "hiss":
        noise = rng.standard_normal(n_frames)
        return noise / np.abs(noise).max(), 0
    if kind == "siren":
        low = rng.uniform(*SIREN_LOW_HZ)
        half_period = rng.uniform(*SIREN_HALF_PERIOD_S)
        high_half = (t // half_period) % 2 == 1
        frequency = np.where(high_half, low * SIREN_RATIO, low)
        return np.sin(_sweep_phase(frequency, sample_rate)), 0  # phase-continuous: no clicks
    raise SynthError(f"unknown sound kind {kind!r}; expected one of {vocab.SOUND_KINDS}")


def _smooth_gate(on: np.ndarray, sample_rate: int) -> np.ndarray:
    """A 0/1 gate with 2 ms ramps, so pulses and sweeps start and stop without clicks."""
    ramp = max(1, int(0.002 * sample_rate))
    kernel = np.ones(ramp) / ramp
    return np.convolve(on.astype(np.float64), kernel, mode="same")


def make_sound(
    rng: np.random.Generator, kind: str, seconds: float, sample_rate: int, channels: int
) -> Sound:
    n_frames = int(round(seconds * sample_rate))
    signal, pulse_rate = sound_waveform(rng, kind, n_frames, sample_rate)
    fade = min(int(FADE_SECONDS * sample_rate), n_frames // 2)
    envelope = np.ones(n_frames)
    envelope[:fade] = np.linspace(0.0, 1.0, fade)
    envelope[n_frames - fade :] = np.linspace(1.0, 0.0, fade)
    peak = rng.uniform(*(LOUD_PEAK if rng.random() < 0.5 else QUIET_PEAK))
    signal = signal * envelope * peak
    if channels == 2:
        # Pan: the louder channel keeps the peak, the other is 40-100% as loud.
        gains = np.array([1.0, rng.uniform(0.4, 1.0)])[rng.permutation(2)]
    else:
        gains = np.ones(1)
    waveform = signal[:, None] * gains[None, :]
    waveform += NOISE_FLOOR * rng.standard_normal(waveform.shape)
    return Sound(
        kind, np.clip(waveform, -1.0, 1.0).astype(np.float32), sample_rate, peak, pulse_rate
    )


def sound_plan(index: int) -> tuple[tuple[float, float], int, int]:
    """(duration range, sample rate, channels) of the index-th sound of a split. Cycled rather than
    drawn so that every split, however small, has long clips, stereo and every sample rate."""
    seconds = LONG_SECONDS if index % 8 == 3 else SHORT_SECONDS
    return seconds, SAMPLE_RATES[index % len(SAMPLE_RATES)], 2 if index % 5 == 2 else 1


def draw_sound(rng: np.random.Generator, kind: str, index: int) -> Sound:
    seconds_range, sample_rate, channels = sound_plan(index)
    seconds = round(float(rng.uniform(*seconds_range)), 2)
    return make_sound(rng, kind, seconds, sample_rate, channels)


def audio_bytes(sound: Sound, file_format: str) -> bytes:
    """The sound as a 16-bit WAV or FLAC file."""
    buffer = io.BytesIO()
    soundfile.write(buffer, sound.waveform, sound.sample_rate, format=file_format, subtype="PCM_16")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------------------------


def json_text(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=False) + "\n"


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json_text(obj), encoding="utf-8")


def write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def write_tar_shards(
    folder: Path, samples: list[tuple[str, bytes, dict]], shard_size: int
) -> list[Path]:
    """webdataset shards shard-000000.tar, ...: per sample `<id>.flac` then `<id>.json`, in order,
    with fixed member metadata (mtime 0, root-owned, 0644) so the bytes depend only on content."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard, start in enumerate(range(0, len(samples), shard_size)):
        path = folder / f"shard-{shard:06d}.tar"
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for key, flac, annotation in samples[start : start + shard_size]:
                for name, data in (
                    (f"{key}.flac", flac),
                    (f"{key}.json", json_text(annotation).encode()),
                ):
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------
# The sets
# ---------------------------------------------------------------------------------------------


def balanced(rng: np.random.Generator, items: tuple[str, ...], n: int) -> list[str]:
    """n items, each appearing equally often (up to one), in random order: shuffled full rounds."""
    rounds = -(-n // len(items))
    return [items[i] for _ in range(rounds) for i in rng.permutation(len(items))][:n]


def _variant(rng: np.random.Generator) -> int:
    return int(rng.integers(1 << 16))  # template choice; each renderer takes it modulo its count


def _scene_kinds(
    rng: np.random.Generator, n: int, include: str | None, exclude: str | None
) -> list[str]:
    """n distinct object kinds: `include` first (if given), never `exclude`."""
    pool = [k for k in vocab.OBJECT_KINDS if k not in (include, exclude)]
    others = [pool[i] for i in rng.permutation(len(pool))[: n - (include is not None)]]
    return ([include] if include else []) + others


def _n_objects(rng: np.random.Generator, low: int = 1) -> int:
    return int(rng.integers(low, 4))  # 1-3 objects (2-3 for localisation)


def build_wavcaps(rng: np.random.Generator, folder: Path, ids: list[str], shard_size: int) -> dict:
    samples = []
    for i, (audio_id, kind) in enumerate(zip(ids, balanced(rng, vocab.SOUND_KINDS, len(ids)))):
        sound = draw_sound(rng, kind, i)
        caption = vocab.audio_caption(kind, sound.seconds, sound.loud, _variant(rng))
        samples.append(
            (audio_id, audio_bytes(sound, "FLAC"), {"caption": caption, "meta": sound.meta()})
        )
    shards = write_tar_shards(folder, samples, shard_size)
    return {"count": len(samples), "shards": shards}


def build_cc_sbu_align(rng: np.random.Generator, folder: Path, ids: list[str]) -> dict:
    annotations, scenes = [], []
    for image_id in ids:
        scene = make_scene(rng, image_id, _scene_kinds(rng, _n_objects(rng), None, None))
        write_jpeg(folder / "image" / f"{image_id}.jpg", scene.pixels)
        caption = vocab.scene_caption(
            scene.object_triples(), scene.background_phrase, _variant(rng)
        )
        annotations.append({"image_id": image_id, "caption": caption,
                            "meta": {"object_kinds": [o.kind for o in scene.objects],
                                     "colours": [o.colour for o in scene.objects]}})  # fmt: skip
        scenes.append(scene.to_json())
    write_json(folder / "filter_cap.json", {"annotations": annotations})
    write_json(folder / "scenes.json", {"scenes": scenes})
    return {"count": len(annotations), "annotations": folder / "filter_cap.json",
            "image_dir": folder / "image", "scenes": folder / "scenes.json"}  # fmt: skip


def build_llava_instruct(
    rng: np.random.Generator, folder: Path, ids: list[str], questions_per_image: int
) -> dict:
    entries, scenes = [], []
    for image_id in ids:
        scene = make_scene(rng, image_id, _scene_kinds(rng, _n_objects(rng), None, None))
        image_name = f"{image_id}.jpg"
        write_jpeg(folder / "image" / image_name, scene.pixels)
        scenes.append(scene.to_json())
        qtypes = [vocab.QUESTION_TYPES[i] for i in rng.permutation(len(vocab.QUESTION_TYPES))]
        for q, qtype in enumerate(qtypes[:questions_per_image]):
            obj = scene.objects[rng.integers(len(scene.objects))]
            question, answer = vocab.question_answer(
                qtype, obj.colour, obj.kind, obj.position, len(scene.objects), _variant(rng)
            )
            answer_key = {
                "colour": obj.colour,
                "kind": obj.kind,
                "position": obj.position,
                "count": vocab.NUMBER_WORDS[len(scene.objects)],
            }[qtype]
            about = None if qtype == "count" else {"kind": obj.kind, "colour": obj.colour}
            entries.append({
                "id": f"{image_id}_{q}",
                "image": image_name,
                "conversations": [
                    {"from": "human", "value": f"<image>\n{question}"},
                    {"from": "gpt", "value": answer},
                ],
                "meta": {"qtype": qtype, "answer_key": answer_key, "object": about,
                         "n_objects": len(scene.objects)},
            })  # fmt: skip
    write_json(folder / "llava_instruct.json", entries)
    write_json(folder / "scenes.json", {"scenes": scenes})
    return {"count": len(entries), "images": len(ids),
            "annotations": folder / "llava_instruct.json", "image_dir": folder / "image",
            "scenes": folder / "scenes.json"}  # fmt: skip


def build_clotho(rng: np.random.Generator, folder: Path, ids: list[str]) -> dict:
    annotations = []
    for i, (audio_id, kind) in enumerate(zip(ids, balanced(rng, vocab.SOUND_KINDS, len(ids)))):
        sound = draw_sound(rng, kind, i)
        write_bytes(folder / "audio" / f"{audio_id}.wav", audio_bytes(sound, "WAV"))
        caption = vocab.detailed_audio_caption(
            kind, sound.seconds, sound.loud, sound.pulse_rate, _variant(rng)
        )
        annotations.append({"audio_id": audio_id, "caption": caption, "meta": sound.meta()})
    write_json(folder / "audio_cap.json", {"annotations": annotations})
    return {"count": len(annotations), "annotations": folder / "audio_cap.json",
            "audio_dir": folder / "audio"}  # fmt: skip


def build_vggss(rng: np.random.Generator, folder: Path, ids: list[str]) -> dict:
    """Each image holds 2-3 objects; the audio is the sound of exactly one of them."""
    annotations, scenes = [], []
    for i, (item_id, sound_kind) in enumerate(zip(ids, balanced(rng, vocab.SOUND_KINDS, len(ids)))):
        source_kind = vocab.SOUND_SOURCE[sound_kind]
        scene = make_scene(rng, item_id, _scene_kinds(rng, _n_objects(rng, 2), source_kind, None))
        source = next(o for o in scene.objects if o.kind == source_kind)
        sound = draw_sound(rng, sound_kind, i)
        write_jpeg(folder / "image" / f"{item_id}.jpg", scene.pixels)
        write_bytes(folder / "audio" / f"{item_id}.wav", audio_bytes(sound, "WAV"))
        caption = vocab.localisation_caption(
            sound_kind, source.colour, source.kind, source.position, _variant(rng)
        )
        instructions = vocab.LOCALISATION_INSTRUCTIONS
        annotations.append({
            "audio_id": item_id,
            "image_id": item_id,
            "caption": caption,
            "instruction": instructions[rng.integers(len(instructions))],
            "meta": sound.meta() | {"related": True, "colour": source.colour,
                                    "bbox": list(source.bbox), "position": source.position},
        })  # fmt: skip
        scenes.append(scene.to_json())
    write_json(folder / "vggss_instruction.json", {"annotations": annotations})
    write_json(folder / "scenes.json", {"scenes": scenes})
    return {"count": len(annotations), "annotations": folder / "vggss_instruction.json",
            "audio_dir": folder / "audio", "image_dir": folder / "image",
            "scenes": folder / "scenes.json"}  # fmt: skip


def build_negative_pairs(rng: np.random.Generator, folder: Path, ids: list[str]) -> dict:
    """Each image holds 1-3 objects, none of which makes the paired sound."""
    annotations, scenes = [], []
    for i, (item_id, sound_kind) in enumerate(zip(ids, balanced(rng, vocab.SOUND_KINDS, len(ids)))):
        absent_kind = vocab.SOUND_SOURCE[sound_kind]
        scene = make_scene(rng, item_id, _scene_kinds(rng, _n_objects(rng), None, absent_kind))
        sound = draw_sound(rng, sound_kind, i)
        write_jpeg(folder / "image" / f"{item_id}.jpg", scene.pixels)
        write_bytes(folder / "audio" / f"{item_id}.wav", audio_bytes(sound, "WAV"))
        image_caption = vocab.scene_caption(
            scene.object_triples(), scene.background_phrase, _variant(rng)
        )
        sound_caption = vocab.audio_caption(sound_kind, sound.seconds, sound.loud, _variant(rng))
        instructions = vocab.NEGATIVE_INSTRUCTIONS
        annotations.append({
            "audio_id": item_id,
            "image_id": item_id,
            "caption": vocab.negative_caption(image_caption, sound_caption, _variant(rng)),
            "instruction": instructions[rng.integers(len(instructions))],
            "meta": sound.meta() | {"related": False,
                                    "object_kinds": [o.kind for o in scene.objects]},
        })  # fmt: skip
        scenes.append(scene.to_json())
    write_json(folder / "negative_pairs.json", {"annotations": annotations})
    write_json(folder / "scenes.json", {"scenes": scenes})
    return {"count": len(annotations), "annotations": folder / "negative_pairs.json",
            "audio_dir": folder / "audio", "image_dir": folder / "image",
            "scenes": folder / "scenes.json"}  # fmt: skip


# (format, training stage) per set, for corpus.json.
SET_FORMATS = {
    "wavcaps": ("WavCaps: webdataset tars of <id>.flac + <id>.json {caption}", 1),
    "cc_sbu_align": ("cc_sbu_align: filter_cap.json {annotations: [{image_id, caption}]}", 2),
    "llava_instruct": ("LLaVA-Instruct: JSON list of {id, image, conversations}", 2),
    "clotho": ("Clotho: audio_cap.json {annotations: [{audio_id, caption}]}", 2),
    "vggss": ("VGGSS: {annotations: [{audio_id, image_id, caption}]}", 2),
    "negative_pairs": ("negative pairs: {annotations: [{image_id, audio_id, caption}]}", 2),
}


def _build_set(
    name: str, rng: np.random.Generator, folder: Path, ids: list[str], size: CorpusSize
) -> dict[str, Any]:
    if name == "wavcaps":
        return build_wavcaps(rng, folder, ids, size.shard_size)
    if name == "cc_sbu_align":
        return build_cc_sbu_align(rng, folder, ids)
    if name == "llava_instruct":
        return build_llava_instruct(rng, folder, ids, size.questions_per_image)
    if name == "clotho":
        return build_clotho(rng, folder, ids)
    if name == "vggss":
        return build_vggss(rng, folder, ids)
    if name == "negative_pairs":
        return build_negative_pairs(rng, folder, ids)
    raise SynthError(f"unknown set {name!r}; expected one of {SET_NAMES}")


ID_PREFIXES = {
    "wavcaps": "wavcaps",
    "cc_sbu_align": "cc",
    "llava_instruct": "llava",
    "clotho": "clotho",
    "vggss": "vggss",
    "negative_pairs": "neg",
}


def _relative(value: Any, root: Path) -> Any:
    if isinstance(value, Path):
        return value.relative_to(root).as_posix()
    if isinstance(value, list):
        return [_relative(v, root) for v in value]
    return value


def synthesize(
    out_dir: str | os.PathLike, seed: int = 0, size: str = "small", overwrite: bool = False
) -> dict:
    """Writes the synthetic corpus under out_dir and returns corpus.json's content.

    size: "tiny" (tests), "small" (default data, < 1 min) or "medium" (training, a few minutes).
    out_dir must not exist or be empty, unless overwrite=True (then only a folder that already holds
    a corpus.json is replaced). The corpus is built in a temporary sibling folder and moved into
    place at the end, so a failed build leaves nothing behind and an existing one untouched.
    """
    if size not in SIZES:
        raise SynthError(f"unknown corpus size {size!r}; expected one of {sorted(SIZES)}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise SynthError(f"seed must be a non-negative integer, got {seed!r}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SynthError(f"output path {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise SynthError(f"output folder {out} is not empty; pass overwrite=True to replace it")
        if not (out / "corpus.json").is_file():
            raise SynthError(
                f"refusing to overwrite {out}: it is not a synthetic corpus (no corpus.json)"
            )

    counts = SIZES[size]
    staging = staging_directory(out)
    try:
        sets: dict[str, Any] = {}
        for set_index, name in enumerate(SET_NAMES):
            n_train = getattr(counts, name)
            n_split = {"train": n_train, "eval": counts.eval_count(n_train)}
            description, stage = SET_FORMATS[name]
            entry: dict[str, Any] = {"format": description, "stage": stage, "splits": {}}
            first_index = 0
            for split_index, split in enumerate(SPLITS):
                # ids number on across splits, so train and eval never share one.
                ids = [f"{ID_PREFIXES[name]}_{first_index + i:06d}" for i in range(n_split[split])]
                first_index += n_split[split]
                rng = np.random.default_rng([seed, set_index, split_index])
                folder = staging / name / split
                result = _build_set(name, rng, folder, ids, counts)
                result["path"] = folder
                entry["splits"][split] = {k: _relative(v, staging) for k, v in result.items()}
            sets[name] = entry
        corpus = {
            "name": "bubogpt-synthetic",
            "version": 1,
            "seed": int(seed),
            "size": size,
            "sets": sets,
            "vocab": {
                "object_kinds": list(vocab.OBJECT_KINDS),
                "colours": {k: list(v) for k, v in vocab.COLOURS.items()},
                "sound_kinds": list(vocab.SOUND_KINDS),
                "source_sound": dict(vocab.SOURCE_SOUND),
                "positions": list(vocab.POSITIONS),
            },
        }
        write_json(staging / "corpus.json", corpus)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replace_directory(staging, out)  # empty, or a corpus we wrote (checked above)
    return corpus
