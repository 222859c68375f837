"""The LLM deployment: the frozen encoders, the joiner and the language model of one BuboGPT.

    generate_stream(chat)   prompt budget -> media encodings (LRU cache by content hash)
                            -> a GenerationJob -> the GenerationWorker, where rows join and leave
                            the running batch between decode steps
                            -> text deltas as they come, then the Completion
    check_health()          Serve calls it every health_check_period_s: it fails when the
                            generation worker's thread is gone or the device cannot run a kernel,
                            and Serve then replaces the replica

Its options (resources, queue limits, autoscaling) are in serve/config.yaml, not here.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any, AsyncIterator

import torch
from ray import serve

from bubogpt.checkpoints.native import load_model

from serve.cache import LRUCache
from serve.errors import ReplicaUnhealthyError
from serve.generation import GenerationJob, GenerationWorker, RowEvent, Sampling, encode_audio, encode_image
from serve.metrics import LLMMetrics
from serve.prompt_budget import PromptBudget
from serve.protocol import ChatRequest, Completion
from serve.replica import DTYPES, probe_device, replica_identity, resolve_device
from serve.settings import ServeSettings


@serve.deployment(name="LLM")
class LLMDeployment:
    def __init__(self, settings: dict):
        self.settings = ServeSettings.from_dict(settings)
        torch.set_num_threads(self.settings.torch_threads)
        dtype = DTYPES[self.settings.dtype]
        self.device = resolve_device(self.settings.device)
        # dtype "auto": the model's frozen_dtype on this device (bf16 LLM and encoders for 7b/13b on a GPU).
        model = load_model(self.settings.model_dir, dtype=dtype, device=self.device)
        self.model = model.to(device=self.device, dtype=dtype).eval()
        self.budget = PromptBudget(self.model.config, self.model.tokenizer)
        self.encoder_cache = LRUCache(self.settings.encoder_cache_entries)
        self.worker = GenerationWorker(self.model, self.settings.llm_max_batch_size, self.settings.torch_threads)
        self.requests = 0
        self.metrics = LLMMetrics()

    async def ping(self) -> dict[str, Any]:
        return replica_identity()

    async def check_health(self) -> None:
        if not self.worker.is_alive():
            raise ReplicaUnhealthyError("the generation worker's thread is not running")
        await asyncio.to_thread(probe_device, self.device)

    async def stop_generation(self) -> None:
        """Stops the generation worker (an operator's, or a test's, way to take a replica out): it
        fails its next health checks and Serve replaces it. Requests meanwhile get a 503."""
        await asyncio.to_thread(self.worker.stop)

    async def stats(self) -> dict[str, Any]:
        generate_calls = Counter(self.worker.calls)
        calls = sum(generate_calls.values())
        rows = sum(size * n for size, n in generate_calls.items())
        return {
            **replica_identity(),
            "requests": self.requests,
            "generate_calls": calls,
            "mean_batch_size": rows / calls if calls else 0.0,
            "batch_size_histogram": dict(sorted(generate_calls.items())),
            "encoder_cache": self.encoder_cache.stats(),
            "generation": self.worker.stats(),
        }

    async def generate(self, chat: ChatRequest) -> Completion:
        """The whole answer at once (the same batches as streaming requests)."""
        completion = None
        async for item in self.generate_stream(chat):
            if isinstance(item, Completion):
                completion = item
        return completion

    async def generate_stream(self, chat: ChatRequest) -> AsyncIterator[str | Completion]:
        """Text deltas as they are generated, then the `Completion`."""
        if not self.worker.is_alive():
            raise ReplicaUnhealthyError("this LLM replica's generation worker is not running; Serve replaces it")
        with self.metrics.queue.held():
            async for item in self._generate_stream(chat):
                yield item

    async def _generate_stream(self, chat: ChatRequest) -> AsyncIterator[str | Completion]:
        arrived = time.perf_counter()
        job, cache_report, encode_ms = await self._prepare(chat)
        self.requests += 1
        queued = time.perf_counter()
        first_token_ms = None
        async for event in self._generate_rows(job):
            if first_token_ms is None:
                first_token_ms = (time.perf_counter() - queued) * 1000
                self.metrics.first_token.observe(time.perf_counter() - arrived)
            if event.delta:
                yield event.delta
            if event.done:
                if event.completion_tokens:
                    self.metrics.tokens.inc(event.completion_tokens)
                self.metrics.record_generate_calls(dict(self.worker.calls))
                yield Completion(
                    text=event.text,
                    finish_reason=event.finish_reason,
                    prompt_tokens=job.prompt_tokens,
                    completion_tokens=event.completion_tokens,
                    batch_size=event.batch_size,
                    encoder_cache=cache_report,
                    encode_ms=encode_ms,
                    first_token_ms=first_token_ms,
                    generate_ms=(time.perf_counter() - queued) * 1000,
                )

    async def _prepare(self, chat: ChatRequest) -> tuple[GenerationJob, dict[str, str], float]:
        """Everything that can fail for one request alone happens here, before it joins a batch."""
        prompt_tokens = self.budget.check(chat, self.settings.max_prompt_tokens)
        start = time.perf_counter()
        vision, audio, report = await asyncio.to_thread(self._encoder_tokens, chat)
        for modality, state in report.items():
            self.metrics.cache.record(f"{modality}_encoder", state == "hit")
        job = GenerationJob(
            prompt=chat.conversation().render(),
            prompt_tokens=prompt_tokens,
            max_new_tokens=chat.max_new_tokens,
            sampling=Sampling.of(chat),
            vision_tokens=vision,
            audio_tokens=audio,
            stop=chat.stop,
            seed=chat.seed,
        )
        return job, report, (time.perf_counter() - start) * 1000

    def _encoder_tokens(self, chat: ChatRequest):
        """Frozen-encoder outputs for the request's media, from the cache when seen before."""
        tokens, report = {}, {}
        for modality, media, encode, limit in (
            ("vision", chat.image, encode_image, self.settings.max_image_pixels),
            ("audio", chat.audio, encode_audio, self.settings.max_audio_seconds),
        ):
            if media is None:
                continue
            cached = self.encoder_cache.get((modality, media.sha256))
            report[modality] = "hit" if cached is not None else "miss"
            if cached is None:
                cached = encode(self.model, media.data, limit)  # (1, T, width)
                self.encoder_cache.put((modality, media.sha256), cached)
            tokens[modality] = cached
        return tokens.get("vision"), tokens.get("audio"), report

    async def _generate_rows(self, job: GenerationJob) -> AsyncIterator[RowEvent]:
        """The job's `RowEvent`s. Each request goes to the GenerationWorker on its own: the worker
        batches rows between decode steps, so no request waits for a batch to form or for another
        batch's longest answer. Leaving early (client gone, timeout) frees its row at the next step."""
        loop = asyncio.get_running_loop()
        steps: asyncio.Queue = asyncio.Queue()
        submission = self.worker.submit([job], lambda item: loop.call_soon_threadsafe(steps.put_nowait, item))
        try:
            while (item := await steps.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                if item[0] is not None:
                    yield item[0]
        finally:
            submission.cancel()
