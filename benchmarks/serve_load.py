"""Serving load: 16 closed-loop clients for 60 s against the Serve application (tiny preset).

Reports p50/p95 latency, throughput, the status codes (5xx other than deliberate 503s are
failures), the mean generation batch size (from the LLM replica's counters), and the composition
check: for requests with a new image, end-to-end latency vs. LLM latency + grounding latency.

    python benchmarks/serve_load.py --model DIR          # starts a local Ray and the application
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 [--api-key-env VAR]   # a running one
    python benchmarks/serve_load.py --model DIR --seconds 10 --clients 8               # shorter

Without --model or --url, a randomly initialised tiny model is built in a temporary directory
(speed only: the answers are noise).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve.loadgen import run_load  # noqa: E402


def synthetic_media(seed: int) -> tuple[str, str]:
    """(a JPEG scene, a WAV sound), base64, from the synthetic corpus generator."""
    from bubogpt.data.synth import audio_bytes, make_scene, make_sound

    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(make_scene(rng, f"bench-{seed}", ["circle", "square"]).pixels).save(buffer, "JPEG", quality=92)
    sound = audio_bytes(make_sound(rng, "tone", 2.0, 16000, 1), "WAV")
    return base64.b64encode(buffer.getvalue()).decode(), base64.b64encode(sound).decode()


def payloads(max_new_tokens: int) -> list[dict]:
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


def start_local(model_dir: str | None, grounding_dir: str | None, port: int):
    """A local Ray with the application (serve/config.yaml's deployment options)."""
    import ray
    import yaml
    from ray import serve

    from serve.app import compose
    from serve.local import CONFIG_YAML
    from serve.settings import ServeSettings

    if model_dir is None:
        import torch

        from bubogpt.checkpoints.native import save_model
        from bubogpt.config import tiny
        from bubogpt.data import sample_texts
        from bubogpt.modeling_bubogpt import BuboGPT
        from bubogpt.tokenizer import build_tiny_tokenizer

        torch.manual_seed(0)
        model = BuboGPT.build(tiny(), build_tiny_tokenizer(sample_texts()))
        model_dir = str(save_model(model, Path(tempfile.mkdtemp()) / "model"))
    app_config = yaml.safe_load(CONFIG_YAML.read_text())["applications"][0]
    options = {d.pop("name"): d for d in app_config["deployments"]}
    ray.init(address="local", include_dashboard=False)  # a fresh local Ray, never a running cluster
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {**app_config["args"], "model_dir": model_dir, "grounding_dir": grounding_dir, "api_key_env": None}
    settings = ServeSettings.from_dict(args)
    serve.run(compose(settings, options), name="bubogpt", route_prefix="/")
    return f"http://127.0.0.1:{port}"


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model directory: start a local Ray and the application for it")
    parser.add_argument("--grounding-dir", help="grounding weights (default: the tiny ones shipped in bubogpt/assets)")
    parser.add_argument("--url", help="a running application (e.g. started by `bubogpt serve`)")
    parser.add_argument("--api-key-env", help="environment variable holding the bearer token")
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    url = args.url or start_local(args.model, args.grounding_dir, args.port)
    api_key = os.environ[args.api_key_env] if args.api_key_env else None
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    before = requests.get(url + "/v1/metrics", headers=headers, timeout=30).json()["llm"]
    report = run_load(url, payloads(args.max_new_tokens), args.clients, args.seconds, api_key)
    after = requests.get(url + "/v1/metrics", headers=headers, timeout=30).json()["llm"]
    calls = {int(s): n - before["batch_size_histogram"].get(s, 0) for s, n in after["batch_size_histogram"].items()}
    mean_batch = sum(s * n for s, n in calls.items()) / max(1, sum(calls.values()))
    rows = composition(url, headers, 5, 24)

    print(report.table())
    print(f"{'mean rows per generate() call':<36}  {mean_batch:.2f}")
    print("\ncomposition (new image each): client_ms total_ms llm_ms grounding_ms")
    for row in rows:
        print(f"  {row['client_ms']:8.0f} {row['total_ms']:8.0f} {row['llm_ms']:6.0f} {row['grounding_ms']:12.0f}")
    median_total = statistics.median(r["total_ms"] for r in rows)
    median_sum = statistics.median(r["llm_ms"] + r["grounding_ms"] for r in rows)
    print(f"  median end-to-end {median_total:.0f} ms vs median LLM + grounding {median_sum:.0f} ms")
    print("\nreproduce: python benchmarks/serve_load.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    if args.json:
        args.json.write_text(json.dumps({
            "clients": args.clients, "seconds": report.seconds, "ok": report.ok,
            "statuses": dict(report.statuses), "no_answer": len(report.failures),
            "p50_ms": report.percentile(50), "p95_ms": report.percentile(95), "throughput_rps": report.throughput,
            "mean_batch_per_generate_call": mean_batch, "composition": rows,
        }, indent=2))  # fmt: skip
    if not args.url:  # we started Ray: stop it
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()
    return 1 if report.server_errors() or report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
