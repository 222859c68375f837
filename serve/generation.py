"""Batched, streamed generation for the LLM deployment (plain PyTorch + transformers, no Ray).

    media bytes --encode_image / encode_audio--> frozen encoder tokens (1, T, width)   [cached by caller]
    ChatRequest --prepare_prompt--> prompt segments + their token count (checked against the limits)
    GenerationJob x B --generate_batch--> one `model.generate` per group of compatible rows, with a
                                          `BatchStreamer` turning each step's tokens into text deltas
    GenerationWorker                      one thread that runs generate_batch on all the batches
                                          that waited while it was busy

A batch mixes requests with different `max_new_tokens`: the call runs to the largest and every row
is cut at its own limit by the streamer, so each row's answer equals what it would get alone.
Requests with different sampling settings cannot share one `generate` call; they are grouped.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from dataclasses import dataclass
from typing import Callable

import torch

from bubogpt.config import BuboGPTConfig
from bubogpt.conversation import ModalitySlot, Segment, merge_text
from bubogpt.modeling_bubogpt import BuboGPT, PromptTooLongError, clean_answer
from bubogpt.preprocess import (
    AudioPreprocessConfig,
    ImagePreprocessConfig,
    audio_to_fbank_clips,
    decode_audio,
    decode_image,
    image_transform,
)

ASSISTANT_TAG = "Assistant:"  # a reply may repeat it; clean_answer drops it


@dataclass(frozen=True)
class Sampling:
    do_sample: bool
    temperature: float
    top_p: float

    @classmethod
    def of(cls, chat) -> "Sampling":
        """A request's sampling; greedy ignores temperature and top_p, so all greedy requests are
        normalised alike and can share a batch."""
        return cls(True, chat.temperature, chat.top_p) if chat.do_sample else cls(False, 1.0, 1.0)


@dataclass
class GenerationJob:
    """One request, ready for the model."""

    prompt: list[Segment]
    prompt_tokens: int
    max_new_tokens: int
    sampling: Sampling
    vision_tokens: torch.Tensor | None = None  # (1, 1 + patches, vision_width)
    audio_tokens: torch.Tensor | None = None  # (1, 1 + patches, audio_width)


@dataclass
class RowEvent:
    """What one step produced for one row: new text, and at the end the whole answer."""

    delta: str
    done: bool = False
    text: str = ""
    finish_reason: str | None = None  # "stop" (end_sym or EOS) or "length"
    completion_tokens: int = 0
    batch_size: int = 0


# --------------------------------------------------------------------------------------------------
# Media -> frozen encoder tokens
# --------------------------------------------------------------------------------------------------


def audio_preprocess_config(config: BuboGPTConfig, max_seconds: float) -> AudioPreprocessConfig:
    """The fbank layout the audio encoder was built for (as workflows/prepare.py derives it)."""
    return AudioPreprocessConfig.for_model(config, max_seconds=max_seconds)


@torch.no_grad()
def encode_image(model: BuboGPT, data: bytes, max_pixels: int) -> torch.Tensor:
    """Encoded image -> frozen vision tokens (1, 1 + patches, vision_width) on the CPU."""
    pixels = image_transform(ImagePreprocessConfig.for_model(model.config))(
        decode_image(data, max_pixels=max_pixels)
    )  # (3, S, S)
    weight = next(model.vision_encoder.parameters())
    return model.encode_image(pixels[None].to(weight.device, weight.dtype)).cpu()


@torch.no_grad()
def encode_audio(model: BuboGPT, data: bytes, max_seconds: float) -> torch.Tensor:
    """Encoded audio -> frozen audio tokens (1, 1 + patches, audio_width) on the CPU."""
    config = audio_preprocess_config(model.config, max_seconds)
    waveform, sample_rate = decode_audio(data, max_seconds=max_seconds)
    fbank = audio_to_fbank_clips(waveform, sample_rate, config)  # (clips, 1, mel, frames)
    weight = next(model.audio_encoder.parameters())
    return model.encode_audio(fbank[None].to(weight.device, weight.dtype)).cpu()


# --------------------------------------------------------------------------------------------------
# Prompt
# --------------------------------------------------------------------------------------------------


def query_token_counts(config: BuboGPTConfig) -> dict[str, int]:
    """Tokens one modality slot takes in the prompt: its Q-Former's query count."""
    return {"vision": config.vision_qformer.num_query_token, "audio": config.audio_qformer.num_query_token}


def count_prompt_tokens(tokenizer, query_tokens: dict[str, int], prompt: list[Segment]) -> int:
    """Length of the assembled prompt: BOS + text tokens + Q query tokens per modality slot
    (what `BuboGPT.assemble` builds)."""
    total = 1
    for segment in merge_text(prompt):
        if isinstance(segment, ModalitySlot):
            total += query_tokens[segment.modality]
        else:
            total += len(tokenizer(segment, add_special_tokens=False).input_ids)
    return total


def check_prompt_budget(prompt_tokens: int, max_new_tokens: int, max_prompt_tokens: int, context_tokens: int) -> None:
    if prompt_tokens > max_prompt_tokens:
        raise PromptTooLongError(
            f"the prompt is {prompt_tokens} tokens (conversation + media tokens), more than the "
            f"{max_prompt_tokens} allowed; shorten the message or the history"
        )
    if prompt_tokens + max_new_tokens > context_tokens:
        raise PromptTooLongError(
            f"the prompt is {prompt_tokens} tokens; with max_new_tokens {max_new_tokens} that exceeds "
            f"the model's context of {context_tokens} tokens"
        )


# --------------------------------------------------------------------------------------------------
# Streaming
# --------------------------------------------------------------------------------------------------


def partial_answer(raw: str, end_sym: str) -> str:
    """The part of an unfinished reply that is certain to stay in the final `clean_answer`.

    Holds back a tail that may be the start of `end_sym`, an incomplete UTF-8 character, trailing
    whitespace (clean_answer strips it) and a reply that may still turn into a leading "Assistant:".
    """
    text = raw
    for k in range(min(len(end_sym) - 1, len(text)), 0, -1):
        if text.endswith(end_sym[:k]):
            text = text[:-k]
            break
    text = text.rstrip("\ufffd")
    if text.strip() and ASSISTANT_TAG.startswith(text.lstrip()):
        return ""
    return clean_answer(text, end_sym)


class _Row:
    def __init__(self, tokenizer, end_sym: str, limit: int, stop_ids: set[int], batch_size: int):
        self.tokenizer = tokenizer
        self.end_sym = end_sym
        self.limit = limit
        self.stop_ids = stop_ids
        self.batch_size = batch_size
        self.tokens: list[int] = []
        self.emitted = ""
        self.done = False

    def _decode(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True)

    def add(self, token: int) -> RowEvent | None:
        if self.done:
            return None
        if token in self.stop_ids:  # EOS, or padding after generate() stopped this row
            return self.finish("stop")
        self.tokens.append(token)
        raw = self._decode()
        if self.end_sym in raw:
            return self.finish("stop")
        if len(self.tokens) >= self.limit:
            return self.finish("length")
        visible = partial_answer(raw, self.end_sym)
        if len(visible) > len(self.emitted) and visible.startswith(self.emitted):
            delta, self.emitted = visible[len(self.emitted):], visible
            return RowEvent(delta)
        return None

    def finish(self, reason: str) -> RowEvent:
        self.done = True
        text = clean_answer(self._decode(), self.end_sym)
        # The deltas so far are a prefix of the answer, except in a pathological reply (a second
        # "Assistant:" after streaming began); then `text` is authoritative.
        delta = text[len(self.emitted):] if text.startswith(self.emitted) else ""
        return RowEvent(delta, True, text, reason, len(self.tokens), self.batch_size)


class BatchStreamer:
    """A transformers streamer for a whole batch: `put` receives every row's new token per step.

    transformers calls `put(prompt_ids)` once first ((B, 0) when generating from embeddings), then
    `put(next_tokens)` with shape (B,) per step, then `end()`. `on_step` gets one list per step with
    a `RowEvent` or None for each row.
    """

    def __init__(self, tokenizer, end_sym: str, limits: list[int], on_step: Callable[[list[RowEvent | None]], None]):
        stop_ids = {i for i in (tokenizer.eos_token_id, tokenizer.pad_token_id) if i is not None}
        self.rows = [_Row(tokenizer, end_sym, limit, stop_ids, len(limits)) for limit in limits]
        self.on_step = on_step

    def put(self, value: torch.Tensor) -> None:
        if value.ndim == 2:  # the prompt
            return
        events = [row.add(int(token)) for row, token in zip(self.rows, value.view(-1).tolist())]
        if any(e is not None for e in events):
            self.on_step(events)

    def end(self) -> None:
        events = [None if row.done else row.finish("length" if len(row.tokens) >= row.limit else "stop")
                  for row in self.rows]  # fmt: skip
        if any(e is not None for e in events):
            self.on_step(events)


# --------------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------------


def plan_groups(jobs: list[GenerationJob], context_tokens: int) -> list[list[int]]:
    """Indices of jobs that can share one `generate` call: same sampling settings, and the longest
    prompt plus the largest max_new_tokens within the context (else the rows run one by one)."""
    by_sampling: dict[Sampling, list[int]] = {}
    for i, job in enumerate(jobs):
        by_sampling.setdefault(job.sampling, []).append(i)
    groups = []
    for indices in by_sampling.values():
        longest = max(jobs[i].prompt_tokens for i in indices)
        largest = max(jobs[i].max_new_tokens for i in indices)
        groups += [indices] if longest + largest <= context_tokens else [[i] for i in indices]
    return groups


def _stack(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
    present = [t for t in tensors if t is not None]
    return torch.cat(present) if present else None  # compact: one row per prompt with that slot


def generate_batch(
    model: BuboGPT, jobs: list[GenerationJob], on_step: Callable[[list[RowEvent | None]], None]
) -> list[int]:
    """Generate every job; `on_step` gets a list of len(jobs) events (None where nothing new).
    Returns the number of rows of each `generate` call made."""
    device = model.llm.get_input_embeddings().weight.device
    groups = plan_groups(jobs, model.config.max_context_tokens)
    for group in groups:

        def scatter(events: list[RowEvent | None], group=group) -> None:
            full: list[RowEvent | None] = [None] * len(jobs)
            for index, event in zip(group, events):
                full[index] = event
            on_step(full)

        sampling = jobs[group[0]].sampling
        limits = [jobs[i].max_new_tokens for i in group]
        streamer = BatchStreamer(model.tokenizer, model.config.end_sym, limits, scatter)
        vision = _stack([jobs[i].vision_tokens for i in group])
        audio = _stack([jobs[i].audio_tokens for i in group])
        model.generate(
            [jobs[i].prompt for i in group],
            vision_tokens=None if vision is None else vision.to(device),
            audio_tokens=None if audio is None else audio.to(device),
            max_new_tokens=max(limits),
            do_sample=sampling.do_sample,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            streamer=streamer,
        )
    return [len(group) for group in groups]


# --------------------------------------------------------------------------------------------------
# One generation thread that merges waiting batches
# --------------------------------------------------------------------------------------------------

class GenerationWorker:
    """Runs `generate_batch` in one thread. Batches submitted while it generates wait; when it is
    free, everything waiting (up to `max_rows` rows, first come first) goes into the next call.

    Why: Ray Serve's `@serve.batch` forms the next batch while the current one runs, from what arrives
    within its short wait, so under load it hands over many small batches, each of which would make
    its own `generate` call. Merging them here makes the calls as large as the queue allows.

    `submit(jobs, deliver)`: `deliver` is called from the worker thread with a list of len(jobs)
    `RowEvent | None` per step, an exception if generation failed, and finally None.
    """

    def __init__(self, model: BuboGPT, max_rows: int, torch_threads: int | None = None):
        self.model = model
        self.max_rows = max_rows
        self.torch_threads = torch_threads
        self.calls: Counter[int] = Counter()  # rows per model.generate call -> calls
        self._pending: deque[tuple[list[GenerationJob], Callable]] = deque()
        self._wake = threading.Condition()
        threading.Thread(target=self._run, name="generation", daemon=True).start()

    def submit(self, jobs: list[GenerationJob], deliver: Callable) -> None:
        with self._wake:
            self._pending.append((jobs, deliver))
            self._wake.notify()

    def _take(self) -> list[tuple[list[GenerationJob], Callable]]:
        with self._wake:
            while not self._pending:
                self._wake.wait()
            taken = [self._pending.popleft()]
            rows = len(taken[0][0])
            while self._pending and rows + len(self._pending[0][0]) <= self.max_rows:
                taken.append(self._pending.popleft())
                rows += len(taken[-1][0])
            return taken

    def _run(self) -> None:
        if self.torch_threads:  # OpenMP's thread count is per calling thread
            torch.set_num_threads(self.torch_threads)
        while True:
            taken = self._take()
            jobs = [job for submitted, _ in taken for job in submitted]
            slices, start = [], 0
            for submitted, deliver in taken:
                slices.append((start, start + len(submitted), deliver))
                start += len(submitted)

            def on_step(events: list[RowEvent | None]) -> None:
                for first, last, deliver in slices:
                    if any(e is not None for e in events[first:last]):
                        deliver(events[first:last])

            try:
                for size in generate_batch(self.model, jobs, on_step):
                    self.calls[size] += 1
            except BaseException as err:  # every submitter's requests fail with it
                for _, _, deliver in slices:
                    deliver(err)
            finally:
                for _, _, deliver in slices:
                    deliver(None)
