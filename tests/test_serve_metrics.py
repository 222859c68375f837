"""Prometheus metrics: after a few requests, Ray's metrics agent serves every application series on
the node's metrics export port (`bubogpt serve --metrics-port`; the test session's Ray sets one in
tests/conftest.py), with values that account for the requests this test made.

Ray's exporter prefixes every name with `ray_` (the PodMonitor in cluster/kuberay renames
`ray_bubogpt_*` to `bubogpt_*`); it reports with a delay of seconds, so the test polls.
"""

import time
import urllib.request

import pytest
import ray
from prometheus_client.parser import text_string_to_metric_families

from serve_harness import b64, image_bytes, scene, sound_bytes

SERIES = [
    "ray_bubogpt_requests_total",
    "ray_bubogpt_time_to_first_token_seconds_bucket",
    "ray_bubogpt_generated_tokens_total",
    "ray_bubogpt_generation_batch_rows_bucket",
    "ray_bubogpt_cache_hits_total",
    "ray_bubogpt_cache_misses_total",
    "ray_bubogpt_queue_depth",
]


def metrics_url() -> str:
    node = next(n for n in ray.nodes() if n["Alive"])
    return f"http://127.0.0.1:{node['MetricsExportPort']}/metrics"


def scrape(url: str) -> list[tuple[str, dict, float]]:
    """(sample name, labels, value) of every sample the endpoint serves."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples]


def total(samples, name: str, **labels) -> float:
    return sum(value for n, l, value in samples if n == name and labels.items() <= l.items())


def test_application_series_on_the_metrics_port(serve_app):
    url = metrics_url()
    before = scrape(url)
    image = b64(image_bytes(scene(501).pixels))  # new to the server: a miss, then hits
    audio = b64(sound_bytes("buzz", seed=9))
    tokens = 0
    for i in range(3):
        body = serve_app.chat(message=f"Metrics question {i}?", image=image, audio=audio, max_new_tokens=6)
        tokens += body["usage"]["completion_tokens"]
    refused = serve_app.post("/v1/chat", json={"message": "x", "temperature": -1})
    assert refused.status_code == 400

    wanted = {  # name and labels -> at least this much more than before
        ("ray_bubogpt_requests_total", (("route", "/v1/chat"), ("status", "200"))): 3,
        ("ray_bubogpt_requests_total", (("route", "/v1/chat"), ("status", "400"))): 1,
        ("ray_bubogpt_generated_tokens_total", ()): tokens,
        ("ray_bubogpt_time_to_first_token_seconds_count", ()): 3,
        ("ray_bubogpt_generation_batch_rows_count", ()): 1,
        ("ray_bubogpt_cache_misses_total", (("cache", "vision_encoder"),)): 1,
        ("ray_bubogpt_cache_hits_total", (("cache", "vision_encoder"),)): 2,
        ("ray_bubogpt_cache_hits_total", (("cache", "audio_encoder"),)): 2,
        ("ray_bubogpt_cache_misses_total", (("cache", "grounding"),)): 1,
        ("ray_bubogpt_cache_hits_total", (("cache", "grounding"),)): 2,
    }
    deadline = time.monotonic() + 90
    while True:
        after = scrape(url)
        short = {key: need for key, need in wanted.items()
                 if total(after, key[0], **dict(key[1])) - total(before, key[0], **dict(key[1])) < need}  # fmt: skip
        names = {name for name, _, _ in after}
        if not short and set(SERIES) <= names or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert set(SERIES) <= names, f"missing series: {set(SERIES) - names}"
    assert not short, f"series below what this test's requests account for: {short}"
    depth = {labels.get("deployment") for name, labels, _ in after if name == "ray_bubogpt_queue_depth"}
    assert {"LLM", "Grounding", "Ingress"} <= depth, depth
    # Serve's tags are on the application's series
    assert all("replica" in labels for name, labels, _ in after if name == "ray_bubogpt_generated_tokens_total")


@pytest.mark.parametrize("port", [9464, None])
def test_bubogpt_serve_metrics_port_starts_ray_with_that_port(port, monkeypatch):
    from serve.local import ray_init_options
    from serve.settings import SettingsError
    from workflows.cli import parse

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    argv = ["serve", "--model", "m"] + (["--metrics-port", str(port)] if port else [])
    options = ray_init_options(parse(argv)[1].metrics_port)
    if port is None:
        assert options is None  # `serve run` finds or starts Ray itself
        return
    assert options["_metrics_export_port"] == port and options["address"] == "local"
    monkeypatch.setenv("RAY_ADDRESS", "ray://elsewhere:10001")
    with pytest.raises(SettingsError, match="RAY_ADDRESS"):
        ray_init_options(port)
