"""The application's Prometheus metrics, recorded with `ray.serve.metrics` and exported by Ray's
metrics agent on every node's metrics port (`ray start --metrics-export-port`, `bubogpt serve
--metrics-port`), the convention KubeRay, the Ray dashboard and Grafana use.

Ray's exporter puts `ray_` before every name (`ray_bubogpt_requests_total`); the PodMonitor in
cluster/kuberay/ renames them back to the names below. Serve adds the `deployment`, `replica` and
`application` tags to each series.

    bubogpt_requests_total{route, status}        Ingress: HTTP requests answered
    bubogpt_time_to_first_token_seconds          LLM: from the request reaching the replica to its first token
    bubogpt_generated_tokens_total               LLM: completion tokens
    bubogpt_generation_batch_rows                LLM: rows per generate call
    bubogpt_cache_hits_total{cache}              LLM (vision_encoder, audio_encoder), Grounding (grounding)
    bubogpt_cache_misses_total{cache}
    bubogpt_queue_depth                          every deployment: requests a replica holds, waiting or
                                                 in progress (compare with its max_ongoing_requests)
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Iterator

from ray.serve.metrics import Counter, Gauge, Histogram

SECONDS_BOUNDARIES = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
ROWS_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128]


class QueueDepth:
    """`bubogpt_queue_depth` of this replica: `with depth.held():` around each request's work.

    Ray's metrics agent keeps a gauge's value only for about two report intervals after it was last
    set, so a thread sets it again every `report_every_s`: an idle replica reports 0, not nothing."""

    def __init__(self, report_every_s: float = 5.0):
        self.gauge = Gauge("bubogpt_queue_depth", description="Requests a replica holds, waiting or in progress.")
        self.value = 0
        self.gauge.set(0)
        threading.Thread(target=self._report, args=(report_every_s,), name="queue-depth", daemon=True).start()

    def _report(self, every_s: float) -> None:
        while True:
            time.sleep(every_s)
            self.gauge.set(self.value)

    @contextmanager
    def held(self) -> Iterator[None]:
        self.value += 1
        self.gauge.set(self.value)
        try:
            yield
        finally:
            self.value -= 1
            self.gauge.set(self.value)


class CacheCounters:
    """`bubogpt_cache_hits_total` / `bubogpt_cache_misses_total` by cache name."""

    def __init__(self):
        self.hits = Counter("bubogpt_cache_hits", description="Cache hits, by cache.", tag_keys=("cache",))
        self.misses = Counter("bubogpt_cache_misses", description="Cache misses, by cache.", tag_keys=("cache",))

    def record(self, cache: str, hit: bool) -> None:
        (self.hits if hit else self.misses).inc(1, tags={"cache": cache})


class IngressMetrics:
    def __init__(self):
        self.requests = Counter("bubogpt_requests", description="HTTP requests answered, by route and status.",
                                tag_keys=("route", "status"))  # fmt: skip
        self.queue = QueueDepth()

    def answered(self, route: str, status: int) -> None:
        self.requests.inc(1, tags={"route": route, "status": str(status)})


class LLMMetrics:
    def __init__(self):
        self.first_token = Histogram(
            "bubogpt_time_to_first_token_seconds", boundaries=SECONDS_BOUNDARIES,
            description="From a request reaching the LLM replica to its first generated token.",
        )  # fmt: skip
        self.tokens = Counter("bubogpt_generated_tokens", description="Completion tokens generated.")
        self.batch_rows = Histogram("bubogpt_generation_batch_rows", boundaries=ROWS_BOUNDARIES,
                                    description="Rows per generate call.")  # fmt: skip
        self.cache = CacheCounters()
        self.queue = QueueDepth()
        self._calls_seen: dict[int, int] = {}

    def record_generate_calls(self, calls: dict[int, int]) -> None:
        """`calls`: the worker's running count of generate calls by rows; observes the new ones."""
        for rows, count in calls.items():
            for _ in range(count - self._calls_seen.get(rows, 0)):
                self.batch_rows.observe(rows)
        self._calls_seen = dict(calls)


class GroundingMetrics:
    def __init__(self):
        self.cache = CacheCounters()
        self.queue = QueueDepth()
