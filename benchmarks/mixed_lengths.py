"""Long answers against short ones: iteration-level batching vs whole generate() calls (issue 17, item 7).

Closed-loop clients send requests straight to serve/generation.py's GenerationWorker (the object the
LLM deployment runs; no HTTP, no Ray), one request per `submit`, as the deployment does. In the mix,
a quarter of the requests ask for 300 new tokens and the rest for 20; client i's k-th request is
long when (i + k) % 4 == 0. "Alone" is the same clients and requests with the long ones left out.
Both engines run in the same process, one after the other, on the same model, prompts and order:

    calls        today's engine: the rows that waited while a generate() call ran form the next call,
                 which runs until its longest row ends
    continuous   the new engine: rows join between decode steps and leave when they finish

For each engine: the short requests' p50/p95 latency (submit -> last token) alone and under the mix,
the p95 ratio (target <= 2x), the mix's throughput (completion tokens/s and requests/s over the
run's wall time) and the mean rows per decode step. Each (engine, load) is run `--repeats` times;
the table gives the median and the range.

    python benchmarks/mixed_lengths.py                          # tiny random model, 8 clients
    python benchmarks/mixed_lengths.py --quick                  # smoke: 4 clients, 1 repeat
    python benchmarks/mixed_lengths.py --model DIR              # a saved BuboGPT model directory

A random tiny model never writes the stop string, so every answer runs to its max_new_tokens (the
table checks it). Greedy decoding: the engines' answers are compared request by request.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bubogpt.conversation import Conversation  # noqa: E402
from serve.generation import (GenerationJob, GenerationWorker, Sampling, count_prompt_tokens,  # noqa: E402
                              query_token_counts)  # fmt: skip

LONG, SHORT = 300, 20
QUESTIONS = ["What is in the picture?", "Describe the scene in detail.", "hello there", "What colour is the circle?",
             "Where is the square?", "Tell me a fact about circles.", "And about squares?", "What do you hear?"]  # fmt: skip
ENGINES = ("calls", "continuous")


def load_model(model_dir: str | None):
    if model_dir:
        from bubogpt.checkpoints.native import load_model as load

        return load(model_dir).eval(), f"model {model_dir}"
    from bubogpt.config import tiny
    from bubogpt.data import sample_texts
    from bubogpt.modeling_bubogpt import BuboGPT
    from bubogpt.tokenizer import build_tiny_tokenizer

    torch.manual_seed(0)  # the serving tests' tiny model (tests/serve_harness.py: build_tiny_model_dir)
    return BuboGPT.build(tiny(), build_tiny_tokenizer(sample_texts())).eval(), "tiny preset, random weights (seed 0)"


def requests_for(model, clients: int, per_client: int, with_long: bool) -> list[list[tuple[int, GenerationJob]]]:
    """Each client's (request id, job) in order. Every third request carries an image (its vision
    query tokens in the prompt)."""
    counts = query_token_counts(model.config)
    generator = torch.Generator().manual_seed(1)
    vision = model.encode_image(torch.randn(1, 3, model.config.vision.img_size, model.config.vision.img_size,
                                            generator=generator))  # fmt: skip
    plan = []
    for client in range(clients):
        jobs = []
        for k in range(per_client):
            long = (client + k) % 4 == 0
            if long and not with_long:
                continue
            conversation = Conversation()
            image = (client + k) % 3 == 0
            conversation.add_user(QUESTIONS[(client * 3 + k) % len(QUESTIONS)], ["vision"] if image else [])
            prompt = conversation.render()
            job = GenerationJob(prompt, count_prompt_tokens(model.tokenizer, counts, prompt), LONG if long else SHORT,
                                Sampling(False, 1.0, 1.0), vision_tokens=vision if image else None)  # fmt: skip
            jobs.append((client * per_client + k, job))
        plan.append(jobs)
    return plan


def run_load(worker: GenerationWorker, plan) -> dict:
    """Closed loop: each client submits its next request when the previous one is answered."""
    results: dict[int, dict] = {}
    lock = threading.Lock()

    def client(jobs):
        for request_id, job in jobs:
            done = threading.Event()
            record = {"max_new_tokens": job.max_new_tokens}

            def deliver(item, record=record, done=done):
                if item is None:
                    done.set()
                elif isinstance(item, BaseException):
                    record["error"] = repr(item)
                elif item[0] is not None:
                    record.setdefault("first_token_s", time.perf_counter() - record["sent"])
                    if item[0].done:
                        record.update(latency_s=time.perf_counter() - record["sent"], text=item[0].text,
                                      tokens=item[0].completion_tokens)  # fmt: skip

            record["sent"] = time.perf_counter()
            worker.submit([job], deliver)
            if not done.wait(600):
                raise TimeoutError(f"request {request_id} got no answer in 600 s")
            with lock:
                results[request_id] = record

    before = worker.stats()
    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(jobs,)) for jobs in plan]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    after = worker.stats()
    errors = [r["error"] for r in results.values() if "error" in r]
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, first: {errors[0]}")
    steps = after["decode_steps"] - before["decode_steps"]
    step_rows = {k: n - before["rows_per_step_histogram"].get(k, 0) for k, n in after["rows_per_step_histogram"].items()}
    short = [r["latency_s"] for r in results.values() if r["max_new_tokens"] == SHORT]
    tokens = sum(r["tokens"] for r in results.values())
    return {
        "requests": len(results),
        "wall_s": wall,
        "short_p50_ms": float(np.percentile(short, 50)) * 1000,
        "short_p95_ms": float(np.percentile(short, 95)) * 1000,
        "tokens_per_s": tokens / wall,
        "requests_per_s": len(results) / wall,
        "mean_rows_per_step": sum(k * n for k, n in step_rows.items()) / steps if steps else 0.0,
        "ran_to_limit": sum(r["tokens"] == r["max_new_tokens"] for r in results.values()),
        "answers": {request_id: r["text"] for request_id, r in results.items()},
    }


def spread(values: list[float], fmt: str) -> str:
    """median (min-max) of a repeated measure."""
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.median(values), fmt)} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a saved BuboGPT model directory (default: the tiny random model)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests-per-client", type=int, default=16)
    parser.add_argument("--max-rows", type=int, default=8, help="the worker's rows (llm_max_batch_size)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--torch-threads", type=int, default=1, help="as a serving replica (torch_threads)")
    parser.add_argument("--quick", action="store_true", help="4 clients, 8 requests each, 1 repeat")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.clients, args.requests_per_client, args.repeats = 4, 8, 1
    torch.set_num_threads(args.torch_threads)
    model, weights = load_model(args.model)
    mix = requests_for(model, args.clients, args.requests_per_client, with_long=True)
    alone = requests_for(model, args.clients, args.requests_per_client, with_long=False)
    print(f"{weights}; {args.clients} clients x {args.requests_per_client} requests, a quarter of them "
          f"{LONG} tokens, the rest {SHORT}; max_rows {args.max_rows}; {args.repeats} repeats\n", flush=True)  # fmt: skip

    workers = {engine: GenerationWorker(model, args.max_rows, args.torch_threads, engine) for engine in ENGINES}
    for worker in workers.values():  # warm-up: first calls pay for allocation and lazy initialisation
        run_load(worker, requests_for(model, 2, 2, with_long=False))
    runs: dict[str, dict[str, list[dict]]] = {engine: {"alone": [], "mix": []} for engine in ENGINES}
    for repeat in range(args.repeats):  # interleaved, so slow phases of a shared machine hit both engines
        for engine, worker in workers.items():
            for load, plan in (("alone", alone), ("mix", mix)):
                result = run_load(worker, plan)
                runs[engine][load].append(result)
                print(f"repeat {repeat + 1} {engine:<10} {load:<5}: {result['requests']} requests in "
                      f"{result['wall_s']:.1f} s, short p95 {result['short_p95_ms']:.0f} ms, "
                      f"{result['tokens_per_s']:.0f} tokens/s", flush=True)  # fmt: skip
    for worker in workers.values():
        worker.stop(60)

    rows, summary = [], {}
    for engine in ENGINES:
        alone_runs, mix_runs = runs[engine]["alone"], runs[engine]["mix"]
        ratios = [m["short_p95_ms"] / a["short_p95_ms"] for a, m in zip(alone_runs, mix_runs)]
        summary[engine] = {
            "short_p95_ratio": statistics.median(ratios), "short_p95_ratios": ratios,
            "mix_tokens_per_s": statistics.median(m["tokens_per_s"] for m in mix_runs),
        }
        rows.append([engine,
                     spread([r["short_p50_ms"] for r in alone_runs], ".0f"), spread([r["short_p95_ms"] for r in alone_runs], ".0f"),
                     spread([r["short_p50_ms"] for r in mix_runs], ".0f"), spread([r["short_p95_ms"] for r in mix_runs], ".0f"),
                     spread(ratios, ".2f") + "x",
                     spread([r["tokens_per_s"] for r in mix_runs], ".0f"), spread([r["requests_per_s"] for r in mix_runs], ".2f"),
                     spread([r["mean_rows_per_step"] for r in mix_runs], ".2f")])  # fmt: skip
    gain = summary["continuous"]["mix_tokens_per_s"] / summary["calls"]["mix_tokens_per_s"]
    mix_answers = [run["answers"] for engine in ENGINES for run in runs[engine]["mix"]]
    same = sum(all(answers[i] == mix_answers[0][i] for answers in mix_answers) for i in mix_answers[0])
    limit = [f"{engine} {run['ran_to_limit']}/{run['requests']}" for engine in ENGINES for run in runs[engine]["mix"][:1]]

    header = ["engine", "short p50 alone (ms)", "short p95 alone (ms)", "short p50 mix (ms)", "short p95 mix (ms)",
              "short p95 mix / alone", "mix tokens/s", "mix requests/s", "mix rows per decode step"]  # fmt: skip
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\nmedian (min-max) of {args.repeats} runs. Short requests' p95 under the mix / alone: continuous "
          f"{summary['continuous']['short_p95_ratio']:.2f}x (target <= 2x), calls "
          f"{summary['calls']['short_p95_ratio']:.2f}x. Mix throughput, continuous / calls: {gain:.2f}x "
          f"(must not fall below 1).")  # fmt: skip
    print(f"answers equal across engines and repeats: {same}/{len(mix_answers[0])}; "
          f"answers that ran to max_new_tokens (first mix run): {', '.join(limit)}")
    command = "python benchmarks/mixed_lengths.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"\nreproduce: {command.strip()}")
    if args.json:
        for engine in ENGINES:
            for load in ("alone", "mix"):
                for run in runs[engine][load]:
                    run.pop("answers")
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": command.strip(),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
            "weights": weights, "clients": args.clients, "requests_per_client": args.requests_per_client,
            "max_rows": args.max_rows, "long_tokens": LONG, "short_tokens": SHORT, "torch_threads": args.torch_threads,
            "runs": runs, "summary": summary, "throughput_continuous_over_calls": gain,
            "answers_equal": [same, len(mix_answers[0])], "table": [dict(zip(header, row)) for row in rows],
        }, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
