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

from benchmarks.serve_load import start_local, synthetic_media  # noqa: E402
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


def measure(system: str, url: str, levels: list[int], seconds: float, max_new_tokens: int) -> list[dict]:
    rows = []
    for clients in levels:
        report = run_load(url, RequestMix(f"level{clients}", clients, max_new_tokens), clients, seconds)
        rows.append(row(system, report))
        print(f"  {system:<16} {clients:>2} clients: {rows[-1]['requests']} ok, {rows[-1]['throughput']:.2f} req/s, "
              f"p50 {rows[-1]['p50_ms']:.0f} ms, p95 {rows[-1]['p95_ms']:.0f} ms", flush=True)  # fmt: skip
    return rows


def row(system: str, report: LoadReport) -> dict:
    errors = sum(n for status, n in report.statuses.items() if status != 200) + len(report.failures)
    return {"system": system, "clients": report.clients, "requests": report.ok, "errors": errors,
            "seconds": report.seconds, "throughput": report.throughput,
            "p50_ms": report.percentile(50), "p95_ms": report.percentile(95)}  # fmt: skip


def ratios(ours: dict, base: dict | None) -> list[str]:
    """[throughput ratio, p50 ratio] of `ours` over `base`."""
    if base is None:
        return ["", ""]
    return [f"{ours['throughput'] / base['throughput']:.2f}x", f"{ours['p50_ms'] / base['p50_ms']:.2f}x"]


def table(results: dict[str, list[dict]]) -> str:
    """One row per system and client count; ratios against the baseline and the session baseline."""
    lines = [
        "| system | clients | requests | errors | throughput (req/s) | p50 (ms) | p95 (ms) | throughput "
        "vs baseline | p50 vs baseline | throughput vs session baseline | p50 vs session baseline |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    baseline, session = results[BASELINE], results.get(SESSION)
    for i, base in enumerate(baseline):
        for name, rows in results.items():
            r = rows[i]
            cells = ratios(r, None if name == BASELINE else base)
            cells += ratios(r, session[i] if session and name == SERVE else None)
            lines.append(f"| {name} | {r['clients']} | {r['requests']} | {r['errors']} | {r['throughput']:.2f} "
                         f"| {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | " + " | ".join(cells) + " |")  # fmt: skip
    return "\n".join(lines)


def checks(results: dict[str, list[dict]]) -> list[str]:
    """The issue's two targets (against its baseline), where this run measured their client counts."""
    by_clients = {b["clients"]: (b, s) for b, s in zip(results[BASELINE], results[SERVE])}
    lines = []
    if 16 in by_clients:
        b, s = by_clients[16]
        ratio = s["throughput"] / b["throughput"]
        verdict = "met" if ratio >= 3 else "NOT met"
        lines.append(f"16 clients: Serve throughput {ratio:.2f}x the baseline's (target >= 3x): {verdict}")
    if 1 in by_clients:
        b, s = by_clients[1]
        ratio = s["p50_ms"] / b["p50_ms"]
        verdict = "met" if ratio <= 1.2 else "NOT met"
        lines.append(f"1 client: Serve p50 latency {ratio:.2f}x the baseline's (target <= 1.2x): {verdict}")
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
    parser.add_argument("--seconds", type=float, default=30.0, help="per client count and system")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--reference-threads", type=int, default=0,
                        help="torch threads of the reference-style server (0: torch's default for the machine)")
    parser.add_argument("--no-session-baseline", dest="session_baseline", action="store_false",
                        help="skip the baseline that keeps each chat's encodings and grounding (the demo's state)")
    parser.add_argument("--quick", action="store_true", help="smoke: 5 s per level, 1 and 4 clients")
    parser.add_argument("--port", type=int, default=8013, help="Serve's port; the reference-style server uses +1")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.clients = 5.0, "1,4"
    levels = [int(c) for c in args.clients.split(",")]

    workdir = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    model_dir, grounding_dir, weights = resolve_weights(args, workdir)
    print(f"weights: {weights}\nmix: {describe_mix()}\nmax_new_tokens {args.max_new_tokens}, greedy; "
          f"{args.seconds:g} s per level\n", flush=True)  # fmt: skip

    # The baselines first, alone on the machine; then Ray and the application.
    results: dict[str, list[dict]] = {}
    answers: dict[str, list[dict]] = {}
    for name, session_state in ((BASELINE, False), (SESSION, True)):
        if name == SESSION and not args.session_baseline:
            continue
        process, url, health = start_reference(
            model_dir, grounding_dir, session_state, args.port + 1, args.reference_threads
        )
        print(f"{name} server up ({health['torch_threads']} torch threads); warming up", flush=True)
        answers[name] = warm_up(url, args.max_new_tokens)
        results[name] = measure(name, url, levels, args.seconds, args.max_new_tokens)
        process.terminate()
        process.join()

    os.environ.setdefault("RAY_LOG_TO_DRIVER", "0")  # the replicas' request logs would bury the table
    url = start_local(model_dir, grounding_dir, args.port)
    print("Serve application up; warming up", flush=True)
    answers[SERVE] = warm_up(url, args.max_new_tokens)
    results[SERVE] = measure(SERVE, url, levels, args.seconds, args.max_new_tokens)
    metrics = requests.get(url + "/v1/metrics", timeout=30).json()

    same = {name: sum(a == b for a, b in zip(answers[BASELINE], got)) for name, got in answers.items()}
    print(f"\n{weights}\nmix: {describe_mix()}; max_new_tokens {args.max_new_tokens}, greedy; "
          f"{args.seconds:g} s per system and client count; baseline torch threads {health['torch_threads']}\n")
    print(table(results))
    print()
    for line in checks(results):
        print(line)
    print("warm-up answers (text, entity and span counts) equal to the baseline's: "
          + ", ".join(f"{name} {n}/{len(TURNS)}" for name, n in same.items() if name != BASELINE))
    llm, grounding = metrics["llm"], metrics["grounding"]
    print(f"Serve (one replica each, as sampled): LLM mean rows per generate() {llm['mean_batch_size']:.2f}, "
          f"encoder cache {llm['encoder_cache']}, grounding cache {grounding['cache']}")  # fmt: skip
    print("\nreproduce: python benchmarks/serving.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    if args.json:
        args.json.write_text(json.dumps({
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "weights": weights,
            "max_new_tokens": args.max_new_tokens, "seconds": args.seconds, "mix": describe_mix(),
            "results": results, "checks": checks(results), "answers_equal": same, "serve_metrics": metrics,
        }, indent=2))  # fmt: skip

    import ray
    from ray import serve as ray_serve

    ray_serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
