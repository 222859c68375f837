"""Serving load: 16 closed-loop clients for 60 s against the Serve application, at 1 and at 2 LLM replicas.

For each LLM replica count the application is (re)deployed with serve/config.yaml's options, except
that replica counts are fixed (the LLM's at that count, the others at 1; no autoscaling, so the rows
compare like with like). Each request of the mix is first sent alone (its reference answer); then
the clients run, and every 200 answer is compared with its request's answer alone (greedy).
Reported per row: statuses (a 4xx, a 5xx other than 503, or no answer is a failure; 503 = queue full,
retry later), p50/p95 latency, throughput, mean rows per decode step of the LLM replicas
(`GenerationWorker.stats()`, summed over the replicas), and answers that differ. Then the
composition check: for requests with a new image, end-to-end latency vs LLM latency + grounding
latency (they run concurrently). The load average at start and end goes into the result file:
figures from a busy machine are not comparable with an idle one's.

    python benchmarks/serve_load.py                                   # tiny random-weight model
    python benchmarks/serve_load.py --model DIR --json benchmarks/results/serve_load_DATE.json
    python benchmarks/serve_load.py --seconds 10 --llm-replicas 1     # shorter
    python benchmarks/serve_load.py --url http://127.0.0.1:8000      # a running application, as it is

Without --model or --url, a randomly initialised tiny model is built (seed 0; speed only: its answers
are noise and run to max_new_tokens).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import requests
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve.loadgen import LoadReport, run_load  # noqa: E402

APP_NAME = "bubogpt"


def synthetic_media(seed: int) -> tuple[str, str]:
    """(a JPEG scene, a WAV sound), base64, from the synthetic corpus generator."""
    from bubogpt.data.synth import audio_bytes, make_scene, make_sound

    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(make_scene(rng, f"bench-{seed}", ["circle", "square"]).pixels).save(buffer, "JPEG", quality=92)
    sound = audio_bytes(make_sound(rng, "tone", 2.0, 16000, 1), "WAV")
    return base64.b64encode(buffer.getvalue()).decode(), base64.b64encode(sound).decode()


def payloads(max_new_tokens: int) -> list[dict]:
    """16 requests: 8 with an image, 4 with a sound, 4 text only; 4 images and sounds in all (so
    the caches also see hits); greedy."""
    media = [synthetic_media(seed) for seed in range(4)]
    mix = []
    for i in range(16):
        payload = {"message": f"Tell me about item {i}.", "max_new_tokens": max_new_tokens, "temperature": 0}
        image, audio = media[i % len(media)]
        if i % 2:
            payload["image"] = image
        if i % 4 == 2:
            payload["audio"] = audio
        mix.append(payload)
    return mix


def tiny_model_dir() -> str:
    """A randomly initialised tiny BuboGPT (seed 0) in a temporary directory."""
    import torch

    from bubogpt.checkpoints.native import save_model
    from bubogpt.config import tiny
    from bubogpt.data import sample_texts
    from bubogpt.modeling_bubogpt import BuboGPT
    from bubogpt.tokenizer import build_tiny_tokenizer

    torch.manual_seed(0)
    model = BuboGPT.build(tiny(), build_tiny_tokenizer(sample_texts()))
    return str(save_model(model, Path(tempfile.mkdtemp()) / "model"))


def fixed_replicas(options: dict[str, dict], llm_replicas: int) -> dict[str, dict]:
    """serve/config.yaml's options with fixed replica counts: the LLM's `llm_replicas`, the others 1."""
    fixed = {}
    for name, option in options.items():
        option = {k: v for k, v in option.items() if k != "autoscaling_config"}
        fixed[name] = option | {"num_replicas": llm_replicas if name == "LLM" else 1}
    return fixed


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cpus_needed(llm_replicas: int) -> float:
    """Logical CPUs that fixed_replicas(config options, llm_replicas) reserves."""
    from serve.local import deployment_options

    options = fixed_replicas(deployment_options(), llm_replicas)
    return sum(o["num_replicas"] * o["ray_actor_options"].get("num_cpus", 1) for o in options.values())


def start_local(model_dir: str | None, grounding_dir: str | None, port: int, llm_replicas: int | None = None,
                ray_cpus: float | None = None) -> str:
    """A local Ray with the application on `port` (0: a free one), with serve/config.yaml's deployment
    options (with `llm_replicas`, fixed replica counts); or the application redeployed on the Ray this
    process already started. `ray_cpus`: the logical CPUs of that Ray (default: the machine's cores)."""
    import ray
    from ray import serve

    from serve.app import compose
    from serve.local import CONFIG_YAML, deployment_options
    from serve.settings import ServeSettings

    app_config = yaml.safe_load(CONFIG_YAML.read_text())["applications"][0]
    options = deployment_options(CONFIG_YAML)
    if llm_replicas is not None:
        options = fixed_replicas(options, llm_replicas)
    if not ray.is_initialized():
        ray.init(address="local", include_dashboard=False, num_cpus=ray_cpus)  # fresh, never a running cluster
        serve.start(http_options={"host": "127.0.0.1", "port": port or free_port()})
    port = serve.context._get_global_client().http_config.port
    args = {**app_config["args"], "model_dir": model_dir or tiny_model_dir(), "grounding_dir": grounding_dir,
            "api_key_env": None}  # fmt: skip
    serve.run(compose(ServeSettings.from_dict(args), options), name=APP_NAME, route_prefix="/")
    return f"http://127.0.0.1:{port}"


def replica_stats(replicas: int | None = None, tries: int = 60) -> dict[str, dict]:
    """{replica id: LLMDeployment.stats()} of every LLM replica (asked through a handle until all
    `replicas` have answered; None: as many as the controller reports running)."""
    from ray import serve

    if replicas is None:
        states = serve.status().applications[APP_NAME].deployments["LLM"].replica_states
        replicas = max(1, sum(n for state, n in states.items() if state == "RUNNING"))  # a str enum, or a str
    handle = serve.get_deployment_handle("LLM", app_name=APP_NAME)
    found: dict[str, dict] = {}
    for _ in range(tries):
        stats = handle.stats.remote().result(timeout_s=60)
        found[stats["replica_id"]] = stats
        if len(found) >= replicas:
            break
    return found


def rows_per_step(before: dict[str, dict], after: dict[str, dict]) -> float:
    """Mean rows per decode step over every LLM replica between two `replica_stats`."""
    rows = steps = 0
    for replica, stats in after.items():
        old = before.get(replica, {}).get("generation", {}).get("rows_per_step_histogram", {})
        for size, n in stats["generation"]["rows_per_step_histogram"].items():
            rows += int(size) * (n - old.get(size, 0))
            steps += n - old.get(size, 0)
    return rows / steps if steps else float("nan")


def alone_answers(url: str, headers: dict, mix: list[dict]) -> list[str]:
    """Each request sent on its own, one after another: the answers the load's must equal."""
    answers = []
    for payload in mix:
        response = requests.post(url + "/v1/chat", headers=headers, json=payload, timeout=300)
        response.raise_for_status()
        answers.append(response.json()["answer"])
    return answers


def summarise(report: LoadReport, alone: list[str], llm_replicas, mean_rows: float) -> dict:
    answered = sum(report.statuses.values())
    wrong = sum(answer != alone[i] for i, answer in report.answers)
    return {
        "llm_replicas": llm_replicas, "clients": report.clients, "seconds": report.seconds, "ok": report.ok,
        "statuses": {str(s): n for s, n in sorted(report.statuses.items())}, "no_answer": len(report.failures),
        "failed": answered - report.ok - report.statuses.get(503, 0) + len(report.failures),
        "share_503": report.statuses.get(503, 0) / max(1, answered),
        "p50_ms": report.percentile(50), "p95_ms": report.percentile(95), "throughput_rps": report.throughput,
        "mean_rows_per_decode_step": mean_rows, "answers_checked": len(report.answers), "answers_differing": wrong,
    }  # fmt: skip


def composition(url: str, headers: dict, n: int, max_new_tokens: int) -> list[dict]:
    rows = []
    for i in range(n):
        image, _ = synthetic_media(1000 + int(time.time() * 1000) % 100000 + i)  # new: nothing cached
        start = time.perf_counter()
        payload = {"message": "What is in the picture?", "image": image, "max_new_tokens": max_new_tokens}
        response = requests.post(url + "/v1/chat", headers=headers, json=payload, timeout=120)
        response.raise_for_status()
        rows.append({"client_ms": (time.perf_counter() - start) * 1000, **response.json()["timings"]})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| LLM replicas | clients | duration | requests ok | statuses | failed | p50 (ms) | p95 (ms) | "
             "throughput (req/s) | vs 1 replica | rows per decode step | answers differing from alone |",
             "|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    base = rows[0]["throughput_rps"]
    for r in rows:
        statuses = ", ".join(f"{s}: {n}" for s, n in r["statuses"].items())
        lines.append(f"| {r['llm_replicas']} | {r['clients']} | {r['seconds']:.1f} s | {r['ok']} | {statuses} | "
                     f"{r['failed']} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['throughput_rps']:.2f} | "
                     f"{r['throughput_rps'] / base:.2f}x | {r['mean_rows_per_decode_step']:.2f} | "
                     f"{r['answers_differing']} of {r['answers_checked']} |")  # fmt: skip
    return "\n".join(lines)


def machine() -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()  # fmt: skip
    return {"cpus": os.cpu_count(), "commit": commit, "python": sys.version.split()[0]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model directory (default: a random-weight tiny model)")
    parser.add_argument("--grounding-dir", help="grounding weights (default: the tiny ones shipped in bubogpt/assets)")
    parser.add_argument("--url", help="a running application (e.g. `bubogpt serve`), measured as it is")
    parser.add_argument("--api-key-env", help="environment variable holding the bearer token")
    parser.add_argument("--port", type=int, default=0, help="Serve's HTTP port (default: a free one)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--llm-replicas", default="1,2", help="LLM replica counts, comma-separated (not with --url)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    load_start = os.getloadavg()
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    api_key = os.environ[args.api_key_env] if args.api_key_env else None
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    mix = payloads(args.max_new_tokens)
    os.environ.setdefault("RAY_LOG_TO_DRIVER", "0")  # the replicas' request logs would bury the table
    model_dir = None if args.url else (args.model or tiny_model_dir())
    rows, url = [], args.url
    counts = [None] if args.url else [int(n) for n in args.llm_replicas.split(",")]
    # Ray schedules by logical CPUs: give it enough for the largest row's replicas, even where they
    # then share fewer cores (recorded in the result file).
    ray_cpus = None if args.url else max(os.cpu_count() or 1, math.ceil(cpus_needed(max(counts))))
    for replicas in counts:
        if not args.url:
            url = start_local(model_dir, args.grounding_dir, args.port, replicas, ray_cpus)
        alone = alone_answers(url, headers, mix)
        before = None if args.url else replica_stats(replicas)
        report = run_load(url, mix, args.clients, args.seconds, api_key)
        after = None if args.url else replica_stats(replicas)
        mean_rows = float("nan") if args.url else rows_per_step(before, after)  # a remote app: no handle to it
        rows.append(summarise(report, alone, replicas or "as deployed", mean_rows))
        print(f"LLM replicas {replicas}: {report.ok} ok, {report.throughput:.2f} req/s, "
              f"p50 {report.percentile(50):.0f} ms", flush=True)  # fmt: skip
    composed = composition(url, headers, 5, 24)
    load_end = os.getloadavg()

    print("\n" + table(rows))
    print("\ncomposition (new image each): client_ms total_ms llm_ms grounding_ms")
    for row in composed:
        print(f"  {row['client_ms']:8.0f} {row['total_ms']:8.0f} {row['llm_ms']:6.0f} {row['grounding_ms']:12.0f}")
    median_total = statistics.median(r["total_ms"] for r in composed)
    median_sum = statistics.median(r["llm_ms"] + r["grounding_ms"] for r in composed)
    print(f"  median end-to-end {median_total:.0f} ms vs median LLM + grounding {median_sum:.0f} ms")
    print(f"load average (1, 5, 15 min) at start {load_start}, at end {load_end}; {os.cpu_count()} cores"
          + (f", {ray_cpus} logical CPUs given to Ray" if ray_cpus else ""))
    command = "python benchmarks/serve_load.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"\nreproduce: {command}")
    if args.json:
        args.json.write_text(json.dumps({
            "date": started, "command": command, "machine": machine(), "ray_logical_cpus": ray_cpus,
            "load_average_start": load_start,
            "load_average_end": load_end, "model": args.model or ("as deployed" if args.url else "tiny, random (seed 0)"),
            "max_new_tokens": args.max_new_tokens, "rows": rows, "composition": composed,
            "composition_median_total_ms": median_total, "composition_median_llm_plus_grounding_ms": median_sum,
        }, indent=2))  # fmt: skip
    if not args.url:  # we started Ray: stop it
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()
    return 1 if any(r["failed"] or r["answers_differing"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
