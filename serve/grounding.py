"""The grounding deployment: tagger -> detector -> segmenter on an image, and the entity matcher.

    ground(image)            LRU cache by content hash, else decode -> @serve.batch -> the pipeline
                             (batch at once; image by image if that fails, so one bad image fails
                             only its own request) -> entities + the annotated PNG
    match(answer, entities)  the spans of the answer that name an entity

Its options (resources, queue limits, autoscaling) are in serve/config.yaml, not here.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
from collections import Counter
from typing import Any

import torch
from ray import serve

from bubogpt.preprocess import ImageDecodeError, decode_image

from serve.cache import LRUCache
from serve.metrics import GroundingMetrics
from serve.protocol import Media
from serve.replica import probe_device, replica_identity, resolve_device
from serve.settings import ServeSettings


class Grounder:
    """The one place that calls into `bubogpt.grounding`: load the pipeline, ground images, match
    answers, draw the annotated image. Entities and spans leave it as JSON-ready dicts."""

    def __init__(self, grounding_dir: str | None, device: torch.device):
        from bubogpt.grounding.pipeline import load_grounding

        # The deterministic matcher (RuleMatcher): no second LLM in the grounding replica. The tiny
        # assets (None), a tiny-layout folder, a `bubogpt convert-grounding` folder or the released files.
        self.pipeline = load_grounding(grounding_dir)
        for module in (self.pipeline.tagger.model, self.pipeline.detector.model, self.pipeline.segmenter.sam):
            module.to(device)  # each component runs where its parameters are

    def ground(self, images: list) -> list[tuple[list[dict], bytes]]:
        """RGB PIL images -> per image: (entities as dicts, annotated PNG bytes)."""
        from bubogpt.grounding.result import annotate_image

        results = []
        for image, entities in zip(images, self.pipeline.ground_images(images)):
            png = io.BytesIO()
            annotate_image(image, entities).save(png, format="PNG")
            results.append(([dataclasses.asdict(entity) for entity in entities], png.getvalue()))
        return results

    def match(self, answer: str, entities: list[dict]) -> list[dict]:
        from bubogpt.grounding.result import Entity

        spans = self.pipeline.match(answer, [Entity(**entity) for entity in entities])
        return [dataclasses.asdict(span) for span in spans]


@serve.deployment(name="Grounding")
class GroundingDeployment:
    def __init__(self, settings: dict):
        self.settings = ServeSettings.from_dict(settings)
        torch.set_num_threads(self.settings.torch_threads)
        self.device = resolve_device(self.settings.device)
        self.grounder = Grounder(self.settings.grounding_dir, self.device)
        self.cache = LRUCache(self.settings.grounding_cache_entries)
        self._ground_batch.set_max_batch_size(self.settings.grounding_max_batch_size)
        self._ground_batch.set_batch_wait_timeout_s(self.settings.grounding_batch_wait_s)
        self.batch_sizes: Counter[int] = Counter()
        self.metrics = GroundingMetrics()

    async def ping(self) -> dict[str, Any]:
        return replica_identity()

    async def check_health(self) -> None:
        """Serve calls it every health_check_period_s; a failure makes Serve replace the replica.
        Grounding runs in the request's own thread (no worker to lose): the models' device is checked."""
        await asyncio.to_thread(probe_device, self.device)

    async def stats(self) -> dict[str, Any]:
        return {**replica_identity(), "batch_size_histogram": dict(sorted(self.batch_sizes.items())),
                "cache": self.cache.stats()}  # fmt: skip

    async def ground(self, image: Media) -> dict[str, Any]:
        """{"entities": [...], "annotated_image": base64 PNG, "cache": "hit"|"miss", "batch_size": n}."""
        cached = self.cache.get(image.sha256)
        self.metrics.cache.record("grounding", cached is not None)
        if cached is not None:
            return {**cached, "cache": "hit"}
        with self.metrics.queue.held():
            pixels = await asyncio.to_thread(decode_image, image.data, self.settings.max_image_pixels)
            result = await self._ground_batch(pixels)
        if isinstance(result, ValueError):  # an image the grounding models cannot use: the client's 400
            raise ImageDecodeError(f"grounding cannot use this image: {result}")
        if isinstance(result, Exception):
            raise result
        self.cache.put(image.sha256, result)
        return {**result, "cache": "miss"}

    # The batch size and wait are the settings' (set in __init__).
    @serve.batch
    async def _ground_batch(self, images: list) -> list[dict[str, Any] | Exception]:
        self.batch_sizes[len(images)] += 1
        return await asyncio.to_thread(self._ground_each, images)

    def _ground_each(self, images: list) -> list[dict[str, Any] | Exception]:
        """The batch at once; if that fails, image by image, so one bad image fails only its request."""
        try:
            grounded = self.grounder.ground(images)
        except Exception as err:
            if len(images) == 1:
                return [err]
            grounded = []
            for image in images:
                try:
                    grounded += self.grounder.ground([image])
                except Exception as one_err:
                    grounded.append(one_err)
        return [
            result if isinstance(result, Exception) else
            {"entities": result[0], "annotated_image": base64.b64encode(result[1]).decode(), "batch_size": len(images)}
            for result in grounded
        ]  # fmt: skip

    async def match(self, answer: str, entities: list[dict]) -> list[dict]:
        if not entities or not answer:
            return []
        return await asyncio.to_thread(self.grounder.match, answer, entities)
