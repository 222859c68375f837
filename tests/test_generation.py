"""Iteration-level batching (bubogpt/generation.py + the GenerationWorker in serve/generation.py).

Every answer is checked against the same row generated ALONE by Hugging Face's `generate` (greedy),
which shares no code with the slot decoder: rows join at different steps, leave at different steps
(their own max_new_tokens, stop strings), and free slots are reused.
"""

import threading
import time

import pytest
import torch

from bubogpt.config import LLMConfig
from bubogpt.conversation import Conversation
from bubogpt.generation import ContinuousBatcher, Sampling, SlotDecoder
from bubogpt.llm import build_llm
from serve.generation import (GenerationJob, GenerationWorker, RowText, WorkerStopped, answer_end,
                              count_prompt_tokens, partial_answer, query_token_counts)  # fmt: skip

from serve_harness import build_tiny_model_dir

GREEDY = Sampling(False, 1.0, 1.0)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from bubogpt.checkpoints.native import load_model

    return load_model(build_tiny_model_dir(tmp_path_factory.mktemp("tiny_model")))


@pytest.fixture(scope="module")
def gqa_llama():
    """A tiny fp32 Llama with grouped-query attention (4 query heads, 2 key/value heads)."""
    torch.manual_seed(0)
    return build_llm(LLMConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
                               vocab_size=300)).eval()  # fmt: skip


def hf_greedy(llm, ids: torch.Tensor, new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = llm.generate(ids[None], attention_mask=torch.ones_like(ids[None]), max_new_tokens=new_tokens,
                           do_sample=False, pad_token_id=0, eos_token_id=None)  # fmt: skip
    return out[0, len(ids):].tolist()


def conversation(text, modalities=()):
    conv = Conversation()
    conv.add_user(text, modalities)
    return conv.render()


# -- the slot decoder against Hugging Face greedy ---------------------------------------------------


@pytest.mark.parametrize("round_batches", [False, True])
def test_slot_decoder_rows_joining_and_leaving_equal_hf_greedy_alone(gqa_llama, round_batches):
    """Rows with prompts of 7, 3, 12 and 5 tokens join at steps 0, 2, 5 and 5 and stop after 20,
    10, 20 and 15 tokens; every row's tokens equal `generate` greedy for that row alone. With
    `round_batches` (what CUDA graphs use) steps run on power-of-two batches whose extra rows are
    free slots computing garbage at position 0."""
    torch.manual_seed(1)
    prompts = [torch.randint(3, 300, (n,)) for n in (7, 3, 12, 5)]
    limits = [20, 10, 20, 15]
    join_at = {0: [0], 2: [1], 5: [2, 3]}
    decoder = SlotDecoder(gqa_llama, slots=4, max_len=64, cuda_graphs=False)
    decoder.round_batches = round_batches
    batcher = ContinuousBatcher(decoder, eos_token_id=None)
    got = {i: [] for i in range(4)}
    rows_per_step = []
    for step in range(30):
        for i in join_at.get(step, []):
            with torch.no_grad():
                token, done = batcher.add(i, gqa_llama.model.embed_tokens(prompts[i]), limits[i], GREEDY)
            got[i].append(token)
        results = batcher.step()
        rows_per_step.append(len(results))
        for key, token, _ in results:
            got[key].append(token)
    for i, ids in enumerate(prompts):
        assert got[i] == hf_greedy(gqa_llama, ids, limits[i]), i
    assert len(batcher) == 0
    assert max(rows_per_step) == 4 and rows_per_step[0] == 1 and rows_per_step[-1] == 0
    assert len(set(rows_per_step)) >= 4  # the batch grew and shrank


def test_a_freed_slot_is_reused_by_a_new_row(gqa_llama):
    """Two slots, three rows: the third joins in the slot the first left (the survivor moves)."""
    torch.manual_seed(2)
    prompts = [torch.randint(3, 300, (n,)) for n in (9, 4, 6)]
    decoder = SlotDecoder(gqa_llama, slots=2, max_len=40, cuda_graphs=False)
    batcher = ContinuousBatcher(decoder, eos_token_id=None)
    embed = gqa_llama.model.embed_tokens
    got = {i: [] for i in range(3)}
    with torch.no_grad():
        for i, limit in ((0, 3), (1, 12)):
            got[i].append(batcher.add(i, embed(prompts[i]), limit, GREEDY)[0])
    with pytest.raises(RuntimeError, match="all 2 slots are taken"):
        batcher.add(2, embed(prompts[2]), 5, GREEDY)
    while 0 in batcher:
        for key, token, _ in batcher.step():
            got[key].append(token)
    assert [row.key for row in batcher.rows] == [1]  # row 1 moved into slot 0
    with torch.no_grad():
        got[2].append(batcher.add(2, embed(prompts[2]), 8, GREEDY)[0])
    while len(batcher):
        for key, token, _ in batcher.step():
            got[key].append(token)
    for i, limit in enumerate((3, 12, 8)):
        assert got[i] == hf_greedy(gqa_llama, prompts[i], limit), i


def test_slot_decoder_runs_the_models_prompt_embeddings_like_its_generate(tiny_model):
    """Multimodal prompts (vision and audio query tokens in the embeddings): the batcher's tokens
    decode to what `BuboGPT.generate` (Hugging Face, greedy) answers for each prompt alone."""
    torch.manual_seed(3)
    vision = tiny_model.encode_image(torch.randn(1, 3, 112, 112))
    audio = tiny_model.encode_audio(torch.randn(1, 3, 1, 128, 204))
    rows = [(conversation("What is in the picture?", ["vision"]), vision, None, 12),
            (conversation("What do you hear?", ["vision", "audio"]), vision, audio, 9),
            (conversation("hello there"), None, None, 15)]  # fmt: skip
    decoder = SlotDecoder(tiny_model.llm, slots=3, max_len=tiny_model.config.max_context_tokens)
    batcher = ContinuousBatcher(decoder, tiny_model.tokenizer.eos_token_id)
    tokens = {i: [] for i in range(3)}
    with torch.no_grad():
        for i, (prompt, v, a, limit) in enumerate(rows):
            tokens[i].append(batcher.add(i, tiny_model.prompt_embeddings(prompt, a, v), limit, GREEDY)[0])
            for key, token, _ in batcher.step():
                tokens[key].append(token)
    while len(batcher):
        for key, token, _ in batcher.step():
            tokens[key].append(token)
    for i, (prompt, v, a, limit) in enumerate(rows):
        alone = tiny_model.generate([prompt], vision_tokens=v, audio_tokens=a, max_new_tokens=limit)[0]
        ours = tiny_model.tokenizer.decode(tokens[i], skip_special_tokens=True)
        assert ours.strip() == alone, i


# -- the worker: rows join between steps ------------------------------------------------------------


def make_job(model, text, limit, sampling=GREEDY, stop=(), seed=None, vision=None):
    prompt = conversation(text, ["vision"] if vision is not None else [])
    tokens = count_prompt_tokens(model.tokenizer, query_token_counts(model.config), prompt)
    return GenerationJob(prompt, tokens, limit, sampling, vision_tokens=vision, stop=stop, seed=seed)


class Collector:
    """A `deliver` callback: every event of every row, and a flag when the submission closes."""

    def __init__(self, rows: int, on_event=None):
        self.events = [[] for _ in range(rows)]
        self.done_at = [None] * rows  # time.monotonic() of each row's last event
        self.error = None
        self.closed = threading.Event()
        self.on_event = on_event

    def __call__(self, item):
        if item is None:
            self.closed.set()
        elif isinstance(item, BaseException):
            self.error = item
        else:
            for row, event in enumerate(item):
                if event is not None:
                    self.events[row].append(event)
                    if event.done:
                        self.done_at[row] = time.monotonic()
            if self.on_event:
                self.on_event(self)

    def final(self, row=0):
        done = [e for e in self.events[row] if e.done]
        assert len(done) == 1, self.events[row]
        return done[0]


def alone(model, job):
    return model.generate([job.prompt], vision_tokens=job.vision_tokens, max_new_tokens=job.max_new_tokens)[0]


def cut_at_stop(answer: str, stop: tuple[str, ...]) -> str:
    """The independent reference for `stop`: the answer alone, cut before the first stop string."""
    found = [answer.find(s) for s in stop if s in answer]
    return answer[: min(found)].strip() if found else answer


def test_short_rows_join_a_running_long_row_and_answer_as_alone(tiny_model):
    """A long row runs; at its 5th and 12th tokens new requests arrive (from its own callback, so
    exactly then). They join between decode steps, finish (limits, stop strings) long before the
    long row does, and every answer equals the row generated alone."""
    torch.manual_seed(4)
    vision = tiny_model.encode_image(torch.randn(1, 3, 112, 112))
    worker = GenerationWorker(tiny_model, max_rows=4)
    assert worker.engine == "continuous" and worker.is_alive()
    long_job = make_job(tiny_model, "hello there", 60)
    wave1 = [make_job(tiny_model, "What is in the picture?", 7, vision=vision), make_job(tiny_model, "hi", 4)]
    wave2 = [make_job(tiny_model, "Tell me about the circle.", 25, stop=("plain", "dark")),
             make_job(tiny_model, "bye", 9, stop=("tell",)),
             make_job(tiny_model, "And the square?", 5)]  # fmt: skip
    waves = {5: (wave1, Collector(2)), 12: (wave2, Collector(3))}
    submitted = [(wave, collector) for wave, collector in waves.values()]

    def on_long(collector):  # at most one new event per delivery: each count is seen once
        if len(collector.events[0]) in waves:
            worker.submit(*waves.pop(len(collector.events[0])))

    long = Collector(1, on_long)
    worker.submit([long_job], long)
    submitted.append(([long_job], long))
    for jobs, collector in submitted:
        assert collector.closed.wait(120) and collector.error is None
    assert not waves  # both waves were sent while the long row ran
    long_done = long.final()
    for jobs, collector in submitted:
        for row, job in enumerate(jobs):
            final = collector.final(row)
            reference = cut_at_stop(alone(tiny_model, job), job.stop)
            assert final.text == reference, (job.prompt[-1], final.text, reference)
            assert "".join(e.delta for e in collector.events[row]) == final.text
            if reference != alone(tiny_model, job):  # a stop string cut it
                assert final.finish_reason == "stop"
                assert not any(s in e.delta for s in job.stop for e in collector.events[row])
            elif final.finish_reason == "length":
                assert final.completion_tokens == job.max_new_tokens
            if job is not long_job:  # it finished while the long row still ran: not held back by it
                assert collector.done_at[row] < long.done_at[0] and final.batch_size >= 2
    assert long_done.completion_tokens == 60 and long_done.finish_reason == "length"
    # joined mid-run: the long row shared steps with others, and the short rows were not held back
    assert long_done.batch_size >= 3
    stats = worker.stats()
    assert stats["prefills"] == 6 and stats["active_rows"] == 0
    assert stats["decode_steps"] < 60 + 7 + 4 + 25 + 9 + 5  # rows shared steps
    assert 1 < stats["mean_rows_per_step"] <= 4
    worker.stop(30)
    assert not worker.is_alive()


def test_stop_strings_end_the_answer_before_the_first_one(tiny_model):
    worker = GenerationWorker(tiny_model, max_rows=2)
    reference = alone(tiny_model, make_job(tiny_model, "hello there", 30))
    words = reference.split()
    assert len(set(words)) > 2, reference  # the random model's answer has words to stop at
    stop = (words[3], "zzz-never")
    collector = Collector(1)
    worker.submit([make_job(tiny_model, "hello there", 30, stop=stop)], collector)
    assert collector.closed.wait(60)
    final = collector.final()
    assert final.finish_reason == "stop"
    assert final.text == reference[: reference.find(words[3])].strip()
    assert final.completion_tokens < 30  # it stopped generating there
    worker.stop(30)


def test_same_seed_same_sample_whatever_shares_the_batch(tiny_model):
    """A sampled row with a seed gives the same answer alone and beside other (greedy, sampled,
    seeded) rows; another seed gives another answer."""
    sampled = Sampling(True, 1.0, 0.95)

    def run(jobs):
        worker = GenerationWorker(tiny_model, max_rows=len(jobs))
        collector = Collector(len(jobs))
        worker.submit(jobs, collector)
        assert collector.closed.wait(120) and collector.error is None
        worker.stop(30)
        return [collector.final(row).text for row in range(len(jobs))]

    seeded = make_job(tiny_model, "hello there", 24, sampled, seed=7)
    [by_itself] = run([seeded])
    crowded = run([make_job(tiny_model, "hi", 30), make_job(tiny_model, "hello there", 24, sampled, seed=8),
                   make_job(tiny_model, "hello there", 24, sampled, seed=7),
                   make_job(tiny_model, "What?", 10, sampled)])  # fmt: skip
    assert crowded[2] == by_itself
    assert crowded[1] != by_itself  # another seed, another sample
    assert by_itself != alone(tiny_model, seeded)  # sampled, not greedy


def test_a_bad_request_fails_alone_and_others_finish(tiny_model):
    """A job whose vision tokens have the wrong width fails its own submission; a row running
    beside it finishes with its own answer; the worker stays alive."""
    worker = GenerationWorker(tiny_model, max_rows=4)
    good_job = make_job(tiny_model, "hello there", 20)
    bad_job = make_job(tiny_model, "What is in the picture?", 8, vision=torch.randn(1, 197, 13))
    good, bad = Collector(1), Collector(2)
    worker.submit([good_job], good)
    worker.submit([make_job(tiny_model, "hi", 5), bad_job], bad)
    assert good.closed.wait(60) and bad.closed.wait(60)
    assert bad.error is not None and "13" in str(bad.error)
    assert good.error is None and good.final().text == alone(tiny_model, good_job)
    assert worker.is_alive()
    worker.stop(30)


def test_cancel_frees_the_slot_and_stop_fails_what_is_left(tiny_model):
    worker = GenerationWorker(tiny_model, max_rows=1)
    started = threading.Event()
    long = Collector(1, lambda c: started.set())
    handle = worker.submit([make_job(tiny_model, "hello there", 500)], long)
    waiting_job = make_job(tiny_model, "hi", 6)
    waiting = Collector(1)
    assert started.wait(60)
    worker.submit([waiting_job], waiting)  # only one slot: it waits for the long row
    handle.cancel()
    assert waiting.closed.wait(60) and long.closed.wait(60)
    assert waiting.final().text == alone(tiny_model, waiting_job)
    assert len(long.events[0]) < 499  # it left early
    stuck = Collector(1)
    worker.stop(30)
    assert not worker.is_alive()
    with pytest.raises(WorkerStopped):
        worker.submit([waiting_job], stuck)


def test_stopping_fails_running_requests_with_a_clear_error(tiny_model):
    worker = GenerationWorker(tiny_model, max_rows=1)
    started = threading.Event()
    running = Collector(1, lambda c: started.set())
    queued = Collector(1)
    worker.submit([make_job(tiny_model, "hello there", 500)], running)
    assert started.wait(60)
    worker.submit([make_job(tiny_model, "hi", 4)], queued)
    worker.stop(30)
    for collector in (running, queued):
        assert collector.closed.is_set() and isinstance(collector.error, WorkerStopped)


# -- text: where an answer ends ---------------------------------------------------------------------


def test_answer_end_and_partial_answer_with_stop_strings():
    assert answer_end(" red circle###", "###", ()) == len(" red circle")
    assert answer_end(" red circle. blue", "###", ("circle", "blue")) == len(" red ")
    assert answer_end(" Assistant: Ass yes", "###", ("Ass",)) == len(" Assistant: ")  # not inside the tag
    assert answer_end(" red", "###", ("blue",)) is None
    assert partial_answer(" The red ci", "###", ("circle",)) == "The red"  # maybe the stop string
    assert partial_answer(" The red ci", "###") == "The red ci"


def test_row_text_cuts_before_the_stop_string(tiny_model):
    tokenizer = tiny_model.tokenizer
    ids = tokenizer(" plain from tell plain", add_special_tokens=False).input_ids
    row = RowText(tokenizer, "###", limit=50, stop=("tell",))
    events = [e for e in (row.add(i) for i in ids) if e is not None]
    assert events[-1].done and events[-1].finish_reason == "stop"
    assert events[-1].text == "plain from"
    assert "".join(e.delta for e in events) == "plain from"
