"""The LLM's attention mask: transformers' stock "sdpa" against the project's "bubogpt_sdpa" (bubogpt/llm.py).

transformers 4.57 builds SDPA's causal + padding mask with `torch.vmap` over a Python mask function
(`masking_utils.sdpa_mask`) at every forward, decode steps included; `bubogpt_sdpa` runs the same
SDPA kernel with the mask built by broadcasting (`padded_causal_mask`). Both on the same weights, in
the same run, one after the other (repeats interleaved), one torch thread:

  1. the mask alone, at a decode step of a left-padded batch (q = 1, kv = prompt + 32);
  2. greedy generation of exactly 32 new tokens, batch 1 and batch 8 (left-padded prompts of
     different lengths), the tiny starting model (the shipped pretrained components); the generated ids of the two
     implementations are checked equal;
  3. cProfile of a batch-8 generation per implementation: the share of its time spent building the
     mask (cumulative time of `sdpa_mask` / `padded_causal_mask` over the whole call; median of 3).

    python benchmarks/attention_mask.py               # writes benchmarks/results/attention_mask_<date>.json
    python benchmarks/attention_mask.py --repeats 9   # more repeats (medians are reported)

Figures are medians; ratios (stock / ours) are what to compare across machines.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import json
import platform
import pstats
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers.masking_utils import sdpa_mask

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bubogpt.conversation import Conversation  # noqa: E402
from bubogpt.llm import PADDED_SDPA, padded_causal_mask  # noqa: E402
from bubogpt.pretraining.assets import load_pretrained_tiny  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
STOCK = "sdpa"
NEW_TOKENS = 32
QUESTIONS = (
    "Hi.", "What colour is the circle?", "Describe the image, please.", "What do you hear in this clip?",
    "Is the sound related to the picture? Answer briefly.", "Where is the red square in the picture?",
    "Count the shapes.", "Tell me about the triangle in the corner of the picture and its colour.",
)  # fmt: skip


def prompt_batch(model, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded inputs_embeds (B, L, d) and attention_mask (B, L) of text-only chat prompts."""
    prompts = []
    for text in QUESTIONS[:batch_size]:
        conversation = Conversation()
        conversation.add_user(text, [])
        prompts.append(conversation.render())
    batch = model.assemble(prompts, {}, padding_side="left")
    return batch.inputs_embeds, batch.attention_mask


def generate(model, embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Exactly NEW_TOKENS greedy tokens per row (no stop strings, EOS suppressed by min_new_tokens)."""
    return model.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask, max_new_tokens=NEW_TOKENS,
                              min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=model.tokenizer.pad_token_id,
                              eos_token_id=model.tokenizer.eos_token_id)  # fmt: skip


def timings_ms(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return times


def mask_share(model, implementation: str, embeds: torch.Tensor, attention_mask: torch.Tensor, mask_function) -> float:
    """Share of one generation's time spent in `mask_function` (cumulative), by cProfile."""
    model.llm.set_attn_implementation(implementation)
    profiler = cProfile.Profile()
    profiler.enable()
    generate(model, embeds, attention_mask)
    profiler.disable()
    stats = pstats.Stats(profiler)  # .stats: {(file, line, name): (cc, nc, tottime, cumtime, callers)}
    code = mask_function.__code__
    _, _, _, in_mask, _ = stats.stats[(code.co_filename, code.co_firstlineno, code.co_name)]
    return in_mask / stats.total_tt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per implementation (interleaved)")
    parser.add_argument("--out", type=Path, default=None,
                        help="result JSON (default benchmarks/results/attention_mask_<date>.json)")
    args = parser.parse_args(argv)
    command = ("python benchmarks/attention_mask.py " + shlex.join(argv if argv is not None else sys.argv[1:])).strip()

    torch.set_num_threads(1)
    model = load_pretrained_tiny().eval()  # the tiny starting model (the shipped components)
    results: dict = {"mask_only": {}, "generate": {}, "mask_share_of_generate": {}}
    rows = []

    # 1. the mask alone, at a decode step of the batch-8 prompts
    embeds, attention_mask = prompt_batch(model, 8)
    kv_length = embeds.shape[1] + NEW_TOKENS
    step_mask = torch.cat([attention_mask, torch.ones(8, NEW_TOKENS, dtype=attention_mask.dtype)], dim=1)
    cache_position = torch.tensor([kv_length - 1])
    stock_mask = sdpa_mask(8, cache_position, kv_length, attention_mask=step_mask)
    our_mask = padded_causal_mask(8, cache_position, kv_length, attention_mask=step_mask)
    same_mask = torch.equal(our_mask, stock_mask.expand_as(our_mask))
    calls = 200
    stock_t, our_t = [], []
    with torch.no_grad():
        for _ in range(args.repeats):
            stock_t += timings_ms(lambda: [sdpa_mask(8, cache_position, kv_length, attention_mask=step_mask)
                                          for _ in range(calls)], 1)  # fmt: skip
            our_t += timings_ms(lambda: [padded_causal_mask(8, cache_position, kv_length, attention_mask=step_mask)
                                        for _ in range(calls)], 1)  # fmt: skip
    stock_us, our_us = statistics.median(stock_t) * 1000 / calls, statistics.median(our_t) * 1000 / calls
    results["mask_only"] = {"batch": 8, "kv_length": kv_length, "equal": same_mask,
                            "stock_us": stock_us, "ours_us": our_us, "ratio": stock_us / our_us}  # fmt: skip
    rows.append(("mask alone, batch 8 decode step (us per call)", f"{stock_us:.0f}", f"{our_us:.0f}",
                 f"{stock_us / our_us:.1f}x"))  # fmt: skip

    # 2. generation of 32 tokens
    with torch.no_grad():
        for batch_size in (1, 8):
            embeds, attention_mask = prompt_batch(model, batch_size)
            outputs, times = {}, {STOCK: [], PADDED_SDPA: []}
            for implementation in (STOCK, PADDED_SDPA):  # warm-up, and the ids to compare
                model.llm.set_attn_implementation(implementation)
                outputs[implementation] = generate(model, embeds, attention_mask)
            for _ in range(args.repeats):
                for implementation in (STOCK, PADDED_SDPA):
                    model.llm.set_attn_implementation(implementation)
                    times[implementation] += timings_ms(lambda: generate(model, embeds, attention_mask), 1)
            stock_ms, our_ms = statistics.median(times[STOCK]), statistics.median(times[PADDED_SDPA])
            same = torch.equal(outputs[STOCK], outputs[PADDED_SDPA])
            results["generate"][f"batch_{batch_size}"] = {
                "prompt_tokens": list(attention_mask.sum(dim=1).tolist()), "new_tokens": NEW_TOKENS,
                "stock_ms": stock_ms, "ours_ms": our_ms, "ratio": stock_ms / our_ms, "same_ids": same,
                "stock_ms_all": times[STOCK], "ours_ms_all": times[PADDED_SDPA],
            }  # fmt: skip
            rows.append((f"generate {NEW_TOKENS} tokens, batch {batch_size} (ms)", f"{stock_ms:.0f}",
                         f"{our_ms:.0f}", f"{stock_ms / our_ms:.2f}x"))  # fmt: skip

        # 3. where a batch-8 generation's time goes
        embeds, attention_mask = prompt_batch(model, 8)
        shares = {name: statistics.median(mask_share(model, name, embeds, attention_mask, function) for _ in range(3))
                  for name, function in ((STOCK, sdpa_mask), (PADDED_SDPA, padded_causal_mask))}  # fmt: skip
        results["mask_share_of_generate"] = {"batch": 8, **shares}
        rows.append(("share of a batch-8 generation in the mask (cProfile)", f"{shares[STOCK]:.0%}",
                     f"{shares[PADDED_SDPA]:.0%}", ""))  # fmt: skip
    model.llm.set_attn_implementation(PADDED_SDPA)

    print("| measure | stock sdpa | bubogpt_sdpa | stock / ours |\n|---|---:|---:|---:|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    checks = {"masks_equal": same_mask, "generated_ids_equal": all(g["same_ids"] for g in results["generate"].values())}
    print(f"\nchecks: {checks}\n$ {command}")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    out = args.out or REPO / "benchmarks" / "results" / f"attention_mask_{datetime.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": command, "date": datetime.date.today().isoformat(), "commit": commit,
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "transformers": transformers.__version__, "threads": 1,
                    "processor": platform.processor() or platform.machine()},
        "repeats": args.repeats, "checks": checks, **results,
    }, indent=2) + "\n")  # fmt: skip
    print(f"wrote {out}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
