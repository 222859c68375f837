"""Streamed generation for the LLM deployment (plain PyTorch + transformers, no Ray).

    media bytes --encode_image / encode_audio--> frozen encoder tokens (1, T, width)   [cached by caller]
    ChatRequest --prepare_prompt--> prompt segments + their token count (checked against the limits)
    GenerationJob --GenerationWorker.submit--> one thread that runs the model for every request:

      engine "continuous" (Llama-layout LLMs, bubogpt/generation.py): iteration-level batching. A row
          joins the running batch between two decode steps (its prompt is prefilled alone into a free
          slot of a static KV cache) and leaves as soon as it finishes, each row with its own
          max_new_tokens, stop strings, sampling and seed. A short request that arrives while a long
          answer runs starts at the next step instead of waiting for the long one to end.
      engine "calls" (any other LLM): whole `model.generate` calls. What waited while a call ran is
          merged into the next call, which runs to its largest max_new_tokens.

`RowText` turns each row's tokens into text deltas and decides where its answer ends (EOS, the
prompt format's end_sym, the request's stop strings, or its token limit), so a row's answer equals
what it gets alone.
"""

from __future__ import annotations

import itertools
import threading
from collections import Counter, deque
from dataclasses import dataclass
from typing import Callable

import torch

from bubogpt.config import BuboGPTConfig
from bubogpt.conversation import ModalitySlot, Segment, merge_text
from bubogpt.generation import ContinuousBatcher, Sampling, SlotDecoder, unsupported_reason
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
MAX_STOP_STRINGS = 4  # as OpenAI's `stop`
ENGINES = ("auto", "continuous", "calls")

__all__ = ["Sampling"]  # re-exported: the deployment builds its jobs from this module


@dataclass
class GenerationJob:
    """One request, ready for the model."""

    prompt: list[Segment]
    prompt_tokens: int
    max_new_tokens: int
    sampling: Sampling
    vision_tokens: torch.Tensor | None = None  # (1, 1 + patches, vision_width)
    audio_tokens: torch.Tensor | None = None  # (1, 1 + patches, audio_width)
    stop: tuple[str, ...] = ()  # up to 4 strings; the answer ends before the first one
    seed: int | None = None  # sampled rows: the same seed and request give the same answer

    def __post_init__(self) -> None:
        self.stop = tuple(self.stop)
        if len(self.stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be up to {MAX_STOP_STRINGS} non-empty strings, got {self.stop!r}")


@dataclass
class RowEvent:
    """What one step produced for one row: new text, and at the end the whole answer."""

    delta: str
    done: bool = False
    text: str = ""
    finish_reason: str | None = None  # "stop" (EOS, end_sym or a stop string) or "length"
    completion_tokens: int = 0
    batch_size: int = 0  # the most rows it shared one forward pass with (itself included)


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
# Streaming: tokens -> text deltas, and where the answer ends
# --------------------------------------------------------------------------------------------------


def partial_answer(raw: str, end_sym: str, stop: tuple[str, ...] = ()) -> str:
    """The part of an unfinished reply that is certain to stay in the final `clean_answer`.

    Holds back a tail that may be the start of `end_sym` or of a stop string, an incomplete UTF-8
    character, trailing whitespace (clean_answer strips it) and a reply that may still turn into a
    leading "Assistant:".
    """
    held = 0
    for marker in (end_sym, *stop):
        for k in range(min(len(marker) - 1, len(raw)), held, -1):
            if raw.endswith(marker[:k]):
                held = k
                break
    text = raw[: len(raw) - held].rstrip("\ufffd")
    if text.strip() and ASSISTANT_TAG.startswith(text.lstrip()):
        return ""
    return clean_answer(text, end_sym)


def answer_end(raw: str, end_sym: str, stop: tuple[str, ...]) -> int | None:
    """Where the answer ends in a raw reply: at the first stop string in the visible answer (after
    a leading role tag, which clean_answer drops), else at end_sym; None while neither appeared."""
    end = raw.find(end_sym)
    reply = raw if end < 0 else raw[:end]
    start = reply.rindex(ASSISTANT_TAG) + len(ASSISTANT_TAG) if reply.lstrip().startswith(ASSISTANT_TAG) else 0
    found = [i for i in (reply.find(s, start) for s in stop) if i >= 0]
    if found:
        return min(found)
    return None if end < 0 else end


class RowText:
    """One row's answer as its tokens arrive: `add(token)` -> a RowEvent with new text, or None."""

    def __init__(self, tokenizer, end_sym: str, limit: int, stop: tuple[str, ...] = (), batch_size: int = 1):
        self.tokenizer = tokenizer
        self.end_sym = end_sym
        self.limit = limit
        self.stop = stop
        self.stop_ids = {i for i in (tokenizer.eos_token_id, tokenizer.pad_token_id) if i is not None}
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
        end = answer_end(raw, self.end_sym, self.stop)
        if end is not None:
            return self.finish("stop", raw[:end])
        if len(self.tokens) >= self.limit:
            return self.finish("length")
        visible = partial_answer(raw, self.end_sym, self.stop)
        if len(visible) > len(self.emitted) and visible.startswith(self.emitted):
            delta, self.emitted = visible[len(self.emitted):], visible
            return RowEvent(delta)
        return None

    def finish(self, reason: str, raw: str | None = None) -> RowEvent:
        self.done = True
        text = clean_answer(self._decode() if raw is None else raw, self.end_sym)
        # The deltas so far are a prefix of the answer, except in a pathological reply (a second
        # "Assistant:" after streaming began); then `text` is authoritative.
        delta = text[len(self.emitted):] if text.startswith(self.emitted) else ""
        return RowEvent(delta, True, text, reason, len(self.tokens), self.batch_size)


# --------------------------------------------------------------------------------------------------
# Engine "calls": whole model.generate calls
# --------------------------------------------------------------------------------------------------


class BatchStreamer:
    """A transformers streamer for a whole batch: `put` receives every row's new token per step.

    transformers calls `put(prompt_ids)` once first ((B, 0) when generating from embeddings), then
    `put(next_tokens)` with shape (B,) per step, then `end()`. `on_step` gets one list per step with
    a `RowEvent` or None for each row.
    """

    def __init__(self, tokenizer, end_sym: str, jobs: list[GenerationJob],
                 on_step: Callable[[list[RowEvent | None]], None]):  # fmt: skip
        self.rows = [RowText(tokenizer, end_sym, job.max_new_tokens, job.stop, len(jobs)) for job in jobs]
        self.on_step = on_step
        self.steps = 0

    def put(self, value: torch.Tensor) -> None:
        if value.ndim == 2:  # the prompt
            return
        self.steps += 1
        events = [row.add(int(token)) for row, token in zip(self.rows, value.view(-1).tolist())]
        if any(e is not None for e in events):
            self.on_step(events)

    def end(self) -> None:
        events = [None if row.done else row.finish("length" if len(row.tokens) >= row.limit else "stop")
                  for row in self.rows]  # fmt: skip
        if any(e is not None for e in events):
            self.on_step(events)


def plan_groups(jobs: list[GenerationJob], context_tokens: int) -> list[list[int]]:
    """Indices of jobs that can share one `generate` call: same sampling settings, and the longest
    prompt plus the largest max_new_tokens within the context (else the rows run one by one). A
    sampled row with a seed runs alone: its sample must not depend on the rows beside it."""
    by_sampling: dict[Sampling, list[int]] = {}
    groups = []
    for i, job in enumerate(jobs):
        if job.sampling.do_sample and job.seed is not None:
            groups.append([i])
        else:
            by_sampling.setdefault(job.sampling, []).append(i)
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
) -> list[tuple[int, int]]:
    """Generate every job with `model.generate`; `on_step` gets a list of len(jobs) events (None
    where nothing new). Returns (rows, decode steps) of each `generate` call made."""
    device = model.llm.get_input_embeddings().weight.device
    calls = []
    for group in plan_groups(jobs, model.config.max_context_tokens):

        def scatter(events: list[RowEvent | None], group=group) -> None:
            full: list[RowEvent | None] = [None] * len(jobs)
            for index, event in zip(group, events):
                full[index] = event
            on_step(full)

        first = jobs[group[0]]
        streamer = BatchStreamer(model.tokenizer, model.config.end_sym, [jobs[i] for i in group], scatter)
        vision = _stack([jobs[i].vision_tokens for i in group])
        audio = _stack([jobs[i].audio_tokens for i in group])
        model.generate(
            [jobs[i].prompt for i in group],
            vision_tokens=None if vision is None else vision.to(device),
            audio_tokens=None if audio is None else audio.to(device),
            max_new_tokens=max(jobs[i].max_new_tokens for i in group),
            do_sample=first.sampling.do_sample,
            temperature=first.sampling.temperature,
            top_p=first.sampling.top_p,
            streamer=streamer,
            seed=first.seed if first.sampling.do_sample else None,
        )
        calls.append((len(group), streamer.steps))
    return calls


# --------------------------------------------------------------------------------------------------
# The generation thread
# --------------------------------------------------------------------------------------------------


class WorkerStopped(RuntimeError):
    """The generation thread has ended (`stop()` or a fault): the request cannot finish."""


class Submission:
    """The rows of one `submit` call, their progress, and the callback that reaches the submitter.
    Its fields change under the worker's lock or in the worker thread only."""

    def __init__(self, jobs: list[GenerationJob], deliver: Callable, wake: threading.Condition):
        self.jobs, self.deliver, self._wake = jobs, deliver, wake
        self.admitted = 0  # rows handed to the model so far
        self.finished = 0  # rows whose answer is complete (or dropped)
        self.cancelled = False
        self.closed = False  # `deliver(None)` was sent

    def cancel(self) -> None:
        """The submitter no longer reads: its rows leave the batch before the next step."""
        with self._wake:
            self.cancelled = True
            self._wake.notify()


class GenerationWorker:
    """One thread that runs the model for every submitted request (see the module docstring).

    `submit(jobs, deliver)` returns a `Submission` (`cancel()` frees its rows). `deliver` is called
    from the worker thread with a list of len(jobs) `RowEvent | None` whenever one of its rows has
    news, with an exception if its generation failed, and finally with None.

    Batch size: under "continuous", a row shares each decode step with the rows running at that step,
    so the measure is the mean rows per decode step (`stats()`). Under "calls" every row of a
    `generate` call is computed at each of its steps until the longest row ends; rows per call then
    depend on how many requests happened to arrive while the previous call ran.
    """

    def __init__(self, model: BuboGPT, max_rows: int, torch_threads: int | None = None, engine: str = "auto"):
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        reason = unsupported_reason(model.llm)
        if engine == "continuous" and reason is not None:
            raise ValueError(f"the continuous engine cannot run this language model: {reason}")
        self.engine = engine if engine != "auto" else ("continuous" if reason is None else "calls")
        self.model = model
        self.max_rows = max_rows
        self.torch_threads = torch_threads
        self.step_rows: Counter[int] = Counter()  # rows computed in one decode step -> steps
        # Rows per batched model call -> calls: a decode step ("continuous") or a generate() call ("calls").
        self.calls: Counter[int] = self.step_rows if self.engine == "continuous" else Counter()
        self.prefills = 0
        self.active_rows = 0
        self._decoder = None
        if self.engine == "continuous":  # built here, so a cache that does not fit fails the replica's start
            self._decoder = SlotDecoder(model.llm, max_rows, model.config.max_context_tokens)
            self._decoder.capture_all()  # on a GPU: every decode shape's CUDA graph, before the first request
        self._pending: deque[Submission] = deque()  # rows not all admitted yet, first come first
        self._running: list[Submission] = []  # admitted rows not all finished
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="generation", daemon=True)
        self._thread.start()

    # -- the submitters' side ------------------------------------------------------------------------

    def submit(self, jobs: list[GenerationJob], deliver: Callable) -> Submission:
        if not jobs:
            raise ValueError("submit needs at least one job")
        submission = Submission(jobs, deliver, self._wake)
        with self._wake:
            if not self.is_alive():
                raise WorkerStopped("the generation worker is not running")
            self._pending.append(submission)
            self._wake.notify()
        return submission

    def is_alive(self) -> bool:
        """False once the generation thread has ended or is ending: the replica cannot answer."""
        return self._thread.is_alive() and not self._stopping

    def stop(self, timeout: float | None = None) -> None:
        """End the thread after the current step; unfinished requests get a `WorkerStopped` error."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout)

    def stats(self) -> dict:
        """Counters since start. `mean_rows_per_step`: rows computed per decode step, the batch
        size of the continuous engine (comparable across engines: under "calls" it counts the rows
        of a generate() call that still compute after finishing)."""
        histogram = dict(self.step_rows)  # one copy: the worker thread adds to it meanwhile
        steps = sum(histogram.values())
        rows = sum(size * n for size, n in histogram.items())
        with self._wake:
            waiting = sum(len(s.jobs) - s.admitted for s in self._pending)
        stats = {
            "engine": self.engine,
            "decode_steps": steps,
            "mean_rows_per_step": rows / steps if steps else 0.0,
            "rows_per_step_histogram": dict(sorted(histogram.items())),
            "active_rows": self.active_rows,
            "waiting_rows": waiting,
        }
        if self.engine == "calls":
            per_call = dict(self.calls)
            calls = sum(per_call.values())
            stats["generate_calls"] = calls
            stats["mean_rows_per_generate_call"] = sum(k * n for k, n in per_call.items()) / calls if calls else 0.0
        else:
            stats["prefills"] = self.prefills
        return stats

    # -- the thread ----------------------------------------------------------------------------------

    def _run(self) -> None:
        if self.torch_threads:  # OpenMP's thread count is per calling thread
            torch.set_num_threads(self.torch_threads)
        error = WorkerStopped("the generation worker stopped")
        try:
            with torch.no_grad():
                if self.engine == "continuous":
                    self._run_continuous()
                else:
                    self._run_calls()
        except BaseException as err:  # a fault of the loop itself: nothing more can run here
            error = WorkerStopped(f"the generation worker failed: {err!r}")
            raise
        finally:
            with self._wake:
                self._stopping = True
                left = list(dict.fromkeys([*self._running, *self._pending]))
                self._pending.clear()
                self._running.clear()
            for submission in left:
                self._close(submission, error)

    @staticmethod
    def _send(submission: Submission, item) -> None:
        if submission.closed:
            return
        try:
            submission.deliver(item)
        except Exception:  # the submitter is gone (its event loop closed): drop its rows
            submission.cancelled = True

    def _close(self, submission: Submission, error: BaseException | None = None) -> None:
        if error is not None:
            self._send(submission, error)
        self._send(submission, None)
        submission.closed = True

    def _wait_for_work(self) -> bool:
        """Block until something is submitted; False when the worker is stopping."""
        with self._wake:
            while not self._pending and not self._stopping:
                self._wake.wait()
            return not self._stopping

    # -- engine "continuous" -------------------------------------------------------------------------

    def _admit(self, free: int) -> list[tuple[Submission, int]]:
        """Up to `free` waiting rows, first come first."""
        with self._wake:
            rows = []
            while self._pending and len(rows) < free:
                submission = self._pending[0]
                if submission.admitted == 0:
                    self._running.append(submission)
                rows.append((submission, submission.admitted))
                submission.admitted += 1
                if submission.admitted == len(submission.jobs):
                    self._pending.popleft()
            return rows

    def _drop_cancelled(self, batcher: ContinuousBatcher, rows: dict) -> None:
        """Cancelled submissions: running rows leave the batch, waiting rows never join."""
        with self._wake:
            cancelled = [s for s in dict.fromkeys([*self._running, *self._pending]) if s.cancelled]
            for submission in cancelled:
                submission.finished += len(submission.jobs) - submission.admitted
                submission.admitted = len(submission.jobs)
                if submission in self._pending:
                    self._pending.remove(submission)
                if submission not in self._running:
                    self._running.append(submission)
        for key in [k for k, (s, _, _) in rows.items() if s.cancelled]:
            batcher.finish(key)
            rows.pop(key)[0].finished += 1

    def _run_continuous(self) -> None:
        model = self.model
        tokenizer, end_sym = model.tokenizer, model.config.end_sym
        batcher = ContinuousBatcher(self._decoder, tokenizer.eos_token_id, model.llm.generation_config.top_k)
        rows: dict[int, tuple[Submission, int, RowText]] = {}  # key -> its submission, job index, text
        keys = itertools.count()
        outbox: dict[Submission, list[RowEvent | None]] = {}

        def record(key: int, token: int, engine_done: bool, batch: int) -> None:
            submission, index, text = rows[key]
            text.batch_size = max(text.batch_size, batch)
            event = text.add(token)
            if engine_done and not text.done:  # EOS or the limit, where RowText stops as well
                event = text.finish("length" if len(text.tokens) >= text.limit else "stop")
            if event is not None:  # a row joining has two events in one round: its first token, then a step's
                events = outbox.setdefault(submission, [None] * len(submission.jobs))
                if events[index] is not None:
                    event.delta = events[index].delta + event.delta
                events[index] = event
            if text.done:
                if not engine_done:
                    batcher.finish(key)  # a stop string: the row leaves now
                del rows[key]
                submission.finished += 1

        def fail(submission: Submission, err: Exception) -> None:
            for key in [k for k, (s, _, _) in rows.items() if s is submission]:
                batcher.finish(key)
                del rows[key]
            with self._wake:
                submission.admitted = submission.finished = len(submission.jobs)
                if submission in self._pending:
                    self._pending.remove(submission)
            outbox.pop(submission, None)
            self._close(submission, err)

        while rows or self._wait_for_work():
            if self._stopping:
                return
            self._drop_cancelled(batcher, rows)
            for submission, index in self._admit(batcher.free_slots):
                if submission.closed:  # an earlier row of it failed
                    continue
                job, key = submission.jobs[index], next(keys)
                try:
                    embeds = model.prompt_embeddings(job.prompt, job.audio_tokens, job.vision_tokens)
                    token, done = batcher.add(key, embeds, job.max_new_tokens, job.sampling, job.seed)
                except Exception as err:  # this request fails alone
                    fail(submission, err)
                    continue
                self.prefills += 1
                rows[key] = submission, index, RowText(tokenizer, end_sym, job.max_new_tokens, job.stop)
                record(key, token, done, len(batcher) + done)
            if batcher.rows:
                try:
                    results = batcher.step()
                except Exception as err:  # the cache is in an unknown state: every running row fails
                    for submission in {s for s, _, _ in rows.values()}:
                        fail(submission, err)
                    batcher.clear()
                    continue
                self.step_rows[len(results)] += 1
                for key, token, done in results:
                    record(key, token, done, len(results))
            self.active_rows = len(rows)
            for submission, events in outbox.items():
                self._send(submission, events)
            outbox.clear()
            self._close_finished()

    def _close_finished(self) -> None:
        with self._wake:
            finished = [s for s in self._running if s.finished == len(s.jobs)]
            self._running = [s for s in self._running if s.finished < len(s.jobs)]
        for submission in finished:
            self._close(submission)

    # -- engine "calls" ------------------------------------------------------------------------------

    def _take_submissions(self) -> list[Submission]:
        """Everything waiting, up to `max_rows` rows (at least one submission), first come first."""
        with self._wake:
            taken: list[Submission] = []
            rows = 0
            while self._pending and (not taken or rows + len(self._pending[0].jobs) <= self.max_rows):
                submission = self._pending.popleft()
                if submission.cancelled:
                    self._close(submission)
                    continue
                taken.append(submission)
                rows += len(submission.jobs)
            self._running = list(taken)
            return taken

    def _run_calls(self) -> None:
        while self._wait_for_work():
            taken = self._take_submissions()
            if not taken:
                continue
            jobs = [job for submission in taken for job in submission.jobs]
            slices, start = [], 0
            for submission in taken:
                slices.append((start, start + len(submission.jobs), submission))
                start += len(submission.jobs)

            def on_step(events: list[RowEvent | None]) -> None:
                for first, last, submission in slices:
                    if any(e is not None for e in events[first:last]):
                        self._send(submission, events[first:last])

            self.active_rows = len(jobs)
            try:
                for rows, steps in generate_batch(self.model, jobs, on_step):
                    self.calls[rows] += 1
                    self.step_rows[rows] += steps
            except Exception as err:  # every submitter's requests fail with it
                for submission in taken:
                    self._close(submission, err)
            finally:
                self.active_rows = 0
                for submission in taken:
                    if not submission.closed:
                        self._close(submission)
                with self._wake:
                    self._running = []
