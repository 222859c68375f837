"""Synthetic grounding scenes with ground truth: what the tiny grounding models train and are scored on.

A scene is a picture of 1-3 coloured shapes (`bubogpt.data.synth.make_scene`, the same generator as
the synthetic corpus) after a JPEG round trip with the corpus's options, so a model sees exactly what
the corpus files hold. Ground truth per object: its kind (the tag and the phrase), its colour name,
its tight box (pixel xyxy, x1/y1 exclusive) and its (H, W) bool mask.

Two sources:
- `draw_scene(seed, stream, index)`: the index-th scene of a stream, from its own generator seeded by
  (seed, stream, index), so any process draws the same scene (`draw_scenes_parallel`). Training,
  calibration, validation and the tests' held-out scenes use different `stream` names, so they
  never share a scene.
- `read_corpus_scenes(split_dir)`: the `scenes.json` + `image/` of a split of a synthetic corpus
  written by `bubogpt data synth` (its eval splits are held out from everything here).
"""

from __future__ import annotations

import io
import json
import zlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from bubogpt.data import synth, vocab

TAGS = vocab.OBJECT_KINDS  # the tiny tagger's tag list = the detector's phrases


@dataclass
class SceneObject:
    kind: str
    colour: str
    box: tuple[float, float, float, float]  # pixel xyxy in the image
    mask: np.ndarray  # (H, W) bool


@dataclass
class GroundingScene:
    image_id: str
    image: Image.Image  # RGB, as decoded from the JPEG
    objects: list[SceneObject]

    @property
    def tags(self) -> list[str]:
        """The scene's kinds in tag-list order."""
        present = {o.kind for o in self.objects}
        return [t for t in TAGS if t in present]


def _jpeg_round_trip(pixels: np.ndarray) -> Image.Image:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buffer, **synth.JPEG_OPTIONS)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def _stream_key(stream: str) -> int:
    return zlib.crc32(stream.encode())  # a stable number per stream name (hash() is salted)


def draw_scene(seed: int, stream: str, index: int) -> GroundingScene:
    """The index-th scene of (seed, stream), drawn from its own generator: the same scene whatever
    process draws it, so scenes can be made in parallel."""
    rng = np.random.default_rng([seed, _stream_key(stream), index])
    n_objects = int(rng.integers(1, 4))
    kinds = [TAGS[i] for i in rng.permutation(len(TAGS))[:n_objects]]
    scene = synth.make_scene(rng, f"{stream}_{index:06d}", kinds)
    objects = [SceneObject(o.kind, o.colour, tuple(float(v) for v in o.bbox), o.mask) for o in scene.objects]
    return GroundingScene(scene.image_id, _jpeg_round_trip(scene.pixels), objects)


def draw_scenes(seed: int, count: int | None, stream: str = "train", start: int = 0) -> Iterator[GroundingScene]:
    """Scenes start, start + 1, ... of (seed, stream): `count` of them, or endless for None."""
    index = start
    while count is None or index < start + count:
        yield draw_scene(seed, stream, index)
        index += 1


def _draw_chunk(seed: int, stream: str, start: int, count: int) -> list[GroundingScene]:
    return list(draw_scenes(seed, count, stream, start))


def draw_scenes_parallel(seed: int, stream: str, workers: int, start: int = 0,
                         chunk: int = 16, prefetch: int = 4) -> Iterator[GroundingScene]:
    """The same endless sequence as `draw_scenes(seed, None, stream, start)`, drawn by `workers`
    processes (0: in this process), at most `prefetch` chunks per worker ahead of the consumer."""
    if workers <= 0:
        yield from draw_scenes(seed, None, stream, start)
        return
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # no forked copies of torch's thread pools
    with context.Pool(workers) as pool:  # closing the generator terminates the workers
        pending: deque = deque()
        next_start = start
        while True:
            while len(pending) < prefetch * workers:
                pending.append(pool.apply_async(_draw_chunk, (seed, stream, next_start, chunk)))
                next_start += chunk
            yield from pending.popleft().get()


def read_corpus_scenes(split_dir: str | Path) -> list[GroundingScene]:
    """The scenes of one split of a synthetic corpus (a folder holding scenes.json and image/)."""
    split_dir = Path(split_dir)
    scenes_file = split_dir / "scenes.json"
    if not scenes_file.is_file():
        raise FileNotFoundError(f"{split_dir} holds no scenes.json: not an image split of a synthetic corpus")
    scenes = []
    for entry in json.loads(scenes_file.read_text())["scenes"]:
        image = Image.open(split_dir / "image" / f"{entry['image_id']}.jpg").convert("RGB")
        objects = []
        for obj in entry["objects"]:
            rle = {"size": obj["mask_rle"]["size"], "counts": obj["mask_rle"]["counts"].encode("ascii")}
            mask = mask_utils.decode(rle).astype(bool)
            objects.append(SceneObject(obj["kind"], obj["colour"], tuple(float(v) for v in obj["bbox"]), mask))
        scenes.append(GroundingScene(entry["image_id"], image, objects))
    return scenes
