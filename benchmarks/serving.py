"""Serving: the Ray Serve application against reference-style servers, same weights, same requests.

    baseline          (the issue's) one process, one request at a time (a lock), in the reference
                      demo's order: tagging -> detection -> segmentation (a new SAM embedding) ->
                      encoders -> LLM -> matching; nothing kept, so every turn of a chat redoes it all
    baseline+session  the same, but each chat's media encodings and grounding are computed on its
                      first turn and reused on later ones, as the original Gradio demo keeps them in
                      its session state (upload_x / grounding_fn run once per upload)
    Serve             serve/config.yaml's application: LLM and grounding deployments in parallel,
                      batched generation, encoder and grounding caches keyed by content hash

All three answer POST /v1/chat (the same body and response format) and are driven by the same closed-loop
client (serve/loadgen.py) with the same request mix at each client count. The mix is a chat mix: each
client runs conversations one after another, each with its own new media, turn after turn (the
history grows): three turns about an image, one text-only message, two turns about a sound, three
turns about another image, two turns about an image with a sound, two text-only turns. Media come
from the synthetic corpus generator and are new at every client count, so no level starts with
another level's cache.

    python benchmarks/serving.py                                  # tiny model, shipped grounding weights
    python benchmarks/serving.py --model DIR --grounding-dir DIR  # trained weights
    python benchmarks/serving.py --dev-grounding --quick          # smoke: 5 s per level, 1 and 4 clients

Without --model a randomly initialised tiny model is built (seed 0; speed only, its answers are
noise and always run to max_new_tokens). --dev-grounding uses tests/serve_harness.py's grounding
weights: the shipped ones when present, else the same architecture with random weights.
"""

from __future__ import annotations

import argparse
import base64
import functools
import http.server
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.serve_load import free_port, machine, replica_stats, rows_per_step, start_local, synthetic_media  # noqa: E402
from serve.loadgen import LoadReport, run_load  # noqa: E402

BASELINE, SESSION, SERVE = "baseline", "baseline+session", "Serve"  # the systems compared

# --------------------------------------------------------------------------------------------------
# The request mix
# --------------------------------------------------------------------------------------------------

# One client's conversations, in order: (media, [(user message, the assistant's reply in the history)]).
# The replies only fill the history of later turns; what the model answers does not matter here.
CONVERSATIONS = [
    ("image", [("What is in the picture?", "A circle and a square."),
               ("What colour is the circle?", "It is red."),
               ("Where is the square?", "")]),
    ("text", [("Hello, what can you do?", "")]),
    ("audio", [("What do you hear?", "A steady tone."),
               ("Is it loud?", "")]),
    ("image", [("Describe the image.", "Two shapes on a grey background."),
               ("Which shape is larger?", "The square."),
               ("What colour is it?", "")]),
    ("image+audio", [("Which object makes the sound?", "The circle on the left."),
                     ("Describe the picture.", "")]),
    ("text", [("Tell me a fact about circles.", "A circle has no corners."),
              ("And about squares?", "")]),
]  # fmt: skip
TURNS = [(c, t) for c, (_, turns) in enumerate(CONVERSATIONS) for t in range(len(turns))]  # one cycle


@functools.lru_cache(maxsize=None)
def media_for(key: str) -> tuple[str, str]:
    """(JPEG, WAV) as base64 for one conversation, the same bytes for each of its turns."""
    return synthetic_media(zlib.crc32(key.encode()))  # a stable seed per conversation


class RequestMix(Sequence):
    """The payloads for `clients` closed-loop clients, in the order serve/loadgen.py reads them.

    run_load gives client i the payloads i, i + clients, i + 2 * clients, ...: so payload n is turn
    n // clients of client n % clients's own stream. Clients start at different points of the
    cycle, and `tag` (the run's name) makes every level's media new. Payloads are built on demand
    (before the client's clock starts) and are the same for every system.
    """

    def __init__(self, tag: str, clients: int, max_new_tokens: int):
        self.tag, self.clients, self.max_new_tokens = tag, clients, max_new_tokens

    def __len__(self) -> int:
        return 10**9  # endless for run_load's cycling; a run never gets near it

    def __getitem__(self, n: int) -> dict:
        client, k = n % self.clients, n // self.clients
        position = k + client * 5  # start each client elsewhere in the cycle
        cycle = position // len(TURNS)
        conversation, turn = TURNS[position % len(TURNS)]
        kind, turns = CONVERSATIONS[conversation]
        history = []
        for message, reply in turns[:turn]:
            history += [{"role": "user", "content": message}, {"role": "assistant", "content": reply}]
        # temperature 0: greedy, the same decoding for every system
        payload = {"message": turns[turn][0], "history": history, "max_new_tokens": self.max_new_tokens,
                   "temperature": 0}  # fmt: skip
        image, audio = media_for(f"{self.tag}/{client}/{cycle}/{conversation}")
        if "image" in kind:
            payload["image"] = image
        if "audio" in kind:
            payload["audio"] = audio
        return payload


def describe_mix() -> str:
    counts: dict[str, int] = {}
    for kind, turns in CONVERSATIONS:
        counts[kind] = counts.get(kind, 0) + len(turns)
    return ", ".join(f"{kind} {n}" for kind, n in counts.items()) + f" (of {len(TURNS)} requests per cycle)"


# --------------------------------------------------------------------------------------------------
# The reference-style server
# --------------------------------------------------------------------------------------------------


class ReferenceStyleServer:
    """The reference demo's way of answering: one request at a time, every step in sequence.

    The same models, prompt format, limits and greedy decoding as the Serve application (the
    generation is serve/generation.py's, one row at a time), and the same response body.

    `session_state=False` (the issue's baseline): nothing is kept between requests, so every turn
    of a chat decodes, tags, detects, segments (a new SAM embedding) and encodes its media again.
    `session_state=True`: what the original Gradio demo actually keeps in a chat session: each
    upload's encoder output and grounding are computed once and reused for that chat's later
    turns (here keyed by the media's content, as the client resends it every turn).
    """

    def __init__(self, model_dir: str, grounding_dir: str | None, session_state: bool = False):
        import torch

        from bubogpt.checkpoints.native import load_model
        from serve.grounding import Grounder
        from serve.generation import query_token_counts
        from serve.local import local_config
        from serve.settings import ServeSettings

        args = local_config(model_dir)["applications"][0]["args"]
        self.settings = ServeSettings.from_dict(args)  # serve/config.yaml's limits
        self.model = load_model(model_dir).eval()
        self.query_tokens = query_token_counts(self.model.config)
        self.grounder = Grounder(grounding_dir, torch.device("cpu"))  # serve/app.py's, called in sequence
        self.session_state = session_state
        self.sessions: dict[tuple[str, str], object] = {}
        self.lock = threading.Lock()  # one request at a time: the others wait their turn

    def chat(self, fields: dict) -> dict:
        from serve.protocol import chat_body, parse_chat

        chat = parse_chat(fields, {}, self.settings)  # the web layer parses requests as they arrive
        with self.lock:
            return chat_body(self.answer(chat))

    def remember(self, step: str, media, compute):
        """compute(), or with session state what it gave for this media in an earlier turn."""
        if not self.session_state:
            return compute()
        key = (step, media.sha256)
        if key not in self.sessions:
            self.sessions[key] = compute()
        return self.sessions[key]

    def answer(self, chat):
        from serve.generation import encode_audio, encode_image
        from serve.protocol import Answer

        start = time.perf_counter()
        grounding, entities = None, []
        if chat.image is not None:  # 1-3: tagging -> detection -> segmentation
            grounding, entities = self.remember("grounding", chat.image, lambda: self.ground(chat.image.data))
        grounded = time.perf_counter()
        vision = audio = None  # 4: the encoders, then the LLM
        if chat.image is not None:
            vision = self.remember("vision", chat.image, lambda: encode_image(
                self.model, chat.image.data, self.settings.max_image_pixels))  # fmt: skip
        if chat.audio is not None:
            audio = self.remember("audio", chat.audio, lambda: encode_audio(
                self.model, chat.audio.data, self.settings.max_audio_seconds))  # fmt: skip
        completion = self.generate(chat, vision, audio)
        generated = time.perf_counter()
        spans = self.grounder.match(completion.text, entities) if entities else []
        done = time.perf_counter()  # 5: matching
        timings = {"grounding_ms": (grounded - start) * 1000, "llm_ms": (generated - grounded) * 1000,
                   "matching_ms": (done - generated) * 1000, "total_ms": (done - start) * 1000}  # fmt: skip
        return Answer(completion, grounding, spans, timings)

    def ground(self, data: bytes) -> tuple[dict, list[dict]]:
        """Image bytes -> (the response's grounding: entities and annotated PNG, the entities)."""
        from bubogpt.preprocess import decode_image

        image = decode_image(data, self.settings.max_image_pixels)
        [(entities, png)] = self.grounder.ground([image])  # SAM: one image embedding, all boxes
        grounding = {"entities": entities, "annotated_image": base64.b64encode(png).decode(), "cache": "none"}
        return grounding, entities

    def generate(self, chat, vision, audio):
        from serve.generation import GenerationJob, Sampling, count_prompt_tokens, generate_batch
        from serve.protocol import Completion

        prompt = chat.conversation().render()
        job = GenerationJob(
            prompt=prompt,
            prompt_tokens=count_prompt_tokens(self.model.tokenizer, self.query_tokens, prompt),
            max_new_tokens=chat.max_new_tokens,
            sampling=Sampling.of(chat),
            vision_tokens=vision,
            audio_tokens=audio,
        )
        events = []
        generate_batch(self.model, [job], lambda step: events.append(step[0]))
        last = next(e for e in reversed(events) if e is not None and e.done)
        return Completion(last.text, last.finish_reason, job.prompt_tokens, last.completion_tokens, batch_size=1)


def run_reference_server(model_dir: str, grounding_dir: str | None, session_state: bool, port: int,
                         threads: int) -> None:
    """The reference-style server behind POST /v1/chat (a child process of the benchmark)."""
    import torch

    from serve.errors import APIError

    if threads:
        torch.set_num_threads(threads)
    server = ReferenceStyleServer(model_dir, grounding_dir, session_state)

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the load generator's sessions expect

        def do_GET(self) -> None:  # /healthz
            self.reply(200, {"status": "ok", "torch_threads": torch.get_num_threads()})

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            try:
                self.reply(200, server.chat(json.loads(body)))
            except APIError as err:
                self.reply(err.status, err.body())
            except Exception as err:  # noqa: BLE001 - counted as a 500 by the client
                self.reply(500, {"error": {"message": repr(err)}})

        def reply(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args) -> None:
            pass

    class Server(http.server.ThreadingHTTPServer):
        request_queue_size = 128  # every client gets connected; the lock makes them wait their turn
        daemon_threads = True

    Server(("127.0.0.1", port), Handler).serve_forever()


def start_reference(model_dir: str, grounding_dir: str | None, session_state: bool, port: int, threads: int):
    process = multiprocessing.get_context("spawn").Process(
        target=run_reference_server, args=(model_dir, grounding_dir, session_state, port, threads), daemon=True
    )
    process.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            return process, url, requests.get(url + "/healthz", timeout=5).json()
        except requests.RequestException:
            if not process.is_alive():
                raise RuntimeError("the reference-style server exited while starting") from None
            time.sleep(0.5)
    raise TimeoutError("the reference-style server did not start in 300 s")


# --------------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------------


def warm_up(url: str, max_new_tokens: int) -> list[dict]:
    """One client through a whole cycle of the mix (media no level uses): loads every code path,
    and returns the answers so the systems can be compared."""
    mix = RequestMix("warmup", 1, max_new_tokens)
    answers = []
    for n in range(len(TURNS)):
        response = requests.post(url + "/v1/chat", json=mix[n], timeout=300)
        response.raise_for_status()
        body = response.json()
        answers.append({"answer": body["answer"], "entities": len(body["entities"]), "spans": len(body["spans"])})
    return answers


def row(system: str, report: LoadReport) -> dict:
    errors = sum(n for status, n in report.statuses.items() if status != 200) + len(report.failures)
    return {"system": system, "clients": report.clients, "requests": report.ok, "errors": errors,
            "seconds": report.seconds, "throughput": report.throughput,
            "p50_ms": report.percentile(50), "p95_ms": report.percentile(95)}  # fmt: skip


class RayCPU:
    """CPU seconds used by the local Ray this process started (its child processes, the reference
    servers excepted): what Ray costs while it idles beside a baseline's measurement."""

    def __init__(self, exclude: set[int]):
        import psutil

        self.me, self.exclude = psutil.Process(), exclude

    def seconds(self) -> float:
        import psutil

        total = 0.0
        for child in self.me.children(recursive=True):
            try:
                if child.pid in self.exclude or child.parent().pid in self.exclude:
                    continue
                times = child.cpu_times()
                total += times.user + times.system
            except psutil.Error:  # ended meanwhile
                pass
        return total


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def fmt(stat: dict, digits: int = 0, suffix: str = "") -> str:
    """median (min-max)"""
    return f"{stat['median']:.{digits}f}{suffix} ({stat['min']:.{digits}f}-{stat['max']:.{digits}f})"


def summarise(runs: list[dict]) -> dict:
    """Per client count and system: median and range over the repeats of throughput, p50 and p95;
    Serve's ratios to each baseline taken within a repeat (same minute, same machine state)."""
    summary: dict = {}
    for clients in sorted({r["clients"] for r in runs}):
        level = [r for r in runs if r["clients"] == clients]
        by_system: dict = {}
        for system in dict.fromkeys(r["system"] for r in level):
            rows = [r for r in level if r["system"] == system]
            by_system[system] = {key: spread([r[key] for r in rows]) for key in ("throughput", "p50_ms", "p95_ms")}
            if system == SERVE:
                by_system[system]["rows_per_step"] = spread([r["rows_per_step"] for r in rows])
            else:
                by_system[system]["ray_idle_cpu_share"] = spread([r["ray_cpu_share"] for r in rows])
        serve_rows = {r["repeat"]: r for r in level if r["system"] == SERVE}
        for base in (SESSION, BASELINE):
            pairs = [(serve_rows[r["repeat"]], r) for r in level if r["system"] == base and r["repeat"] in serve_rows]
            if pairs:
                by_system[base]["serve_throughput_ratio"] = spread([s["throughput"] / b["throughput"] for s, b in pairs])
                by_system[base]["serve_p50_ratio"] = spread([s["p50_ms"] / b["p50_ms"] for s, b in pairs])
        summary[clients] = by_system
    return summary


def table(summary: dict) -> str:
    """One row per client count and system, the session baseline first: median (min-max) of the repeats."""
    lines = ["| clients | system | throughput (req/s) | p50 (ms) | p95 (ms) | Serve throughput / this | "
             "Serve p50 / this | LLM rows per decode step |",
             "|---:|---|---|---|---|---|---|---|"]  # fmt: skip
    for clients, systems in summary.items():
        for system, stats in systems.items():
            ratio = [fmt(stats[k], 2, "x") if k in stats else "" for k in ("serve_throughput_ratio", "serve_p50_ratio")]
            rows = fmt(stats["rows_per_step"], 2) if "rows_per_step" in stats else ""
            lines.append(f"| {clients} | {system} | {fmt(stats['throughput'], 2)} | {fmt(stats['p50_ms'])} | "
                         f"{fmt(stats['p95_ms'])} | {ratio[0]} | {ratio[1]} | {rows} |")  # fmt: skip
    return "\n".join(lines)


def checks(summary: dict) -> list[str]:
    """The targets, against the session baseline (the headline) and, second, the stateless one."""
    lines = []
    for base in (SESSION, BASELINE):
        if 16 in summary and base in summary[16]:
            ratio = summary[16][base]["serve_throughput_ratio"]
            verdict = "met" if ratio["median"] >= 3 else "NOT met"
            lines.append(f"16 clients: Serve throughput {fmt(ratio, 2, 'x')} the {base}'s (target >= 3x): {verdict}")
        if 1 in summary and base in summary[1]:
            ratio = summary[1][base]["serve_p50_ratio"]
            verdict = "met" if ratio["median"] <= 1.2 else "NOT met"
            lines.append(f"1 client: Serve p50 latency {fmt(ratio, 2, 'x')} the {base}'s (target <= 1.2x): {verdict}")
    return lines


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def resolve_weights(args, workdir: Path) -> tuple[str, str | None, str]:
    """(model dir, grounding dir or None for the shipped one, a description of both)."""
    from bubogpt.grounding.pipeline import RAM_FILES, TINY_ASSETS

    if args.model:
        model_dir, model_note = args.model, args.model
    else:
        from tests.serve_harness import build_tiny_model_dir

        model_dir, model_note = str(build_tiny_model_dir(workdir / "model")), "tiny, random weights (seed 0)"
    if args.grounding_dir:
        return model_dir, args.grounding_dir, f"model {model_note}; grounding {args.grounding_dir}"
    if args.dev_grounding:
        from tests.serve_harness import grounding_dir_for_tests

        grounding = grounding_dir_for_tests(workdir / "grounding")
        note = "shipped tiny weights" if grounding is None else "tiny, random weights (seed 0, permissive thresholds)"
        return model_dir, grounding, f"model {model_note}; grounding {note}"
    if not (TINY_ASSETS / RAM_FILES[0]).is_file():
        raise SystemExit(f"no grounding weights in {TINY_ASSETS} yet: pass --grounding-dir DIR or --dev-grounding")
    return model_dir, None, f"model {model_note}; grounding shipped tiny weights"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model directory (default: a random-weight tiny model)")
    parser.add_argument("--grounding-dir", help="grounding weights (default: bubogpt/assets/grounding_tiny)")
    parser.add_argument("--dev-grounding", action="store_true",
                        help="tests/serve_harness.py's grounding weights (random ones until the tiny ones ship)")
    parser.add_argument("--clients", default="1,4,16", help="client counts, comma-separated")
    parser.add_argument("--seconds", type=float, default=30.0, help="per client count, system and repeat")
    parser.add_argument("--repeats", type=int, default=3, help="runs of every level and system (median and range)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--reference-threads", type=int, default=0,
                        help="torch threads of the reference-style servers (0: torch's default for the machine)")
    parser.add_argument("--quick", action="store_true", help="smoke: 5 s per level, 1 and 4 clients, 1 repeat")
    parser.add_argument("--port", type=int, default=0, help="Serve's port (default: a free one; the reference-style "
                        "servers always take free ones)")
    parser.add_argument("--json", type=Path, help="also write the runs and the summary here")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.clients, args.repeats = 5.0, "1,4", 1
    levels = [int(c) for c in args.clients.split(",")]
    command = "python benchmarks/serving.py " + " ".join(argv if argv is not None else sys.argv[1:])
    load_start, started = os.getloadavg(), datetime.now(timezone.utc).isoformat(timespec="seconds")

    workdir = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    model_dir, grounding_dir, weights = resolve_weights(args, workdir)
    print(f"weights: {weights}\nmix: {describe_mix()}\nmax_new_tokens {args.max_new_tokens}, greedy; "
          f"{args.seconds:g} s per level, {args.repeats} repeats; load average at start {load_start}\n", flush=True)

    # All three servers stay up; each measurement runs one system while the others idle, and every
    # repeat measures every level of every system, so the ratios compare minutes next to each other.
    urls, processes = {}, []
    for name, session_state in ((SESSION, True), (BASELINE, False)):
        process, urls[name], health = start_reference(
            model_dir, grounding_dir, session_state, free_port(), args.reference_threads
        )
        processes.append(process)
        print(f"{name} server up ({health['torch_threads']} torch threads)", flush=True)
    os.environ.setdefault("RAY_LOG_TO_DRIVER", "0")  # the replicas' request logs would bury the table
    urls[SERVE] = start_local(model_dir, grounding_dir, args.port)
    print("Serve application up; warming up every system", flush=True)
    answers = {name: warm_up(url, args.max_new_tokens) for name, url in urls.items()}
    ray_cpu = RayCPU({p.pid for p in processes})

    runs = []
    for repeat in range(args.repeats):
        for clients in levels:
            for name, url in urls.items():
                mix = RequestMix(f"run{repeat}/level{clients}", clients, args.max_new_tokens)  # new media
                before, cpu_before, t0 = replica_stats() if name == SERVE else None, ray_cpu.seconds(), time.monotonic()
                result = row(name, run_load(url, mix, clients, args.seconds))
                if name == SERVE:
                    result["rows_per_step"] = rows_per_step(before, replica_stats())
                else:
                    result["ray_cpu_share"] = (ray_cpu.seconds() - cpu_before) / (time.monotonic() - t0) / os.cpu_count()
                runs.append({"repeat": repeat, **result})
                extra = (f"rows per decode step {result['rows_per_step']:.2f}" if name == SERVE
                         else f"idle Ray used {result['ray_cpu_share']:.1%} of the CPUs")  # fmt: skip
                print(f"  run {repeat} {name:<16} {clients:>2} clients: {result['requests']} ok, {result['errors']} errors, "
                      f"{result['throughput']:.2f} req/s, p50 {result['p50_ms']:.0f} ms, p95 {result['p95_ms']:.0f} ms; "
                      f"{extra}", flush=True)  # fmt: skip
    metrics = requests.get(urls[SERVE] + "/v1/metrics", timeout=30).json()
    load_end = os.getloadavg()

    summary = summarise(runs)
    same = {name: sum(a == b for a, b in zip(answers[SESSION], got)) for name, got in answers.items()}
    print(f"\n{weights}\nmix: {describe_mix()}; max_new_tokens {args.max_new_tokens}, greedy; {args.seconds:g} s per "
          f"system, client count and repeat; median (min-max) of {args.repeats} repeats\n")  # fmt: skip
    print(table(summary))
    print()
    for line in checks(summary):
        print(line)
    print("warm-up answers (text, entity and span counts) equal to the session baseline's: "
          + ", ".join(f"{name} {n}/{len(TURNS)}" for name, n in same.items() if name != SESSION))
    errors = sum(r["errors"] for r in runs)
    print(f"errors (non-200 or no answer) over all runs: {errors}")
    llm, grounding = metrics["llm"], metrics["grounding"]
    print(f"Serve (one replica each, as sampled): encoder cache {llm['encoder_cache']}, grounding cache {grounding['cache']}")
    print(f"load average (1, 5, 15 min) at start {load_start}, at end {load_end}")
    print(f"\nreproduce: {command}")
    if args.json:
        args.json.write_text(json.dumps({
            "date": started, "command": command, "machine": machine(), "load_average_start": load_start,
            "load_average_end": load_end, "weights": weights, "max_new_tokens": args.max_new_tokens,
            "seconds": args.seconds, "repeats": args.repeats, "mix": describe_mix(), "runs": runs,
            "summary": summary, "checks": checks(summary), "answers_equal_to_session_baseline": same,
            "serve_metrics": metrics,
        }, indent=2))  # fmt: skip

    for process in processes:
        process.terminate()
        process.join()
    import ray
    from ray import serve as ray_serve

    ray_serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
