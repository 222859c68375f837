"""A closed-loop load generator for the chat API (a client-side tool; used by tests and benchmarks).

`clients` threads each send a request, wait for the answer, and send the next, for `seconds`; the
payloads are cycled. Latency is measured per request at the client; throughput counts successes.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import requests


@dataclass
class LoadReport:
    clients: int
    seconds: float
    statuses: Counter = field(default_factory=Counter)  # HTTP status -> count
    failures: list[str] = field(default_factory=list)  # no HTTP answer at all (timeout, reset)
    latencies_ms: list[float] = field(default_factory=list)  # successful requests
    batch_sizes: list[int] = field(default_factory=list)  # `generation_batch_size` of successes
    answers: list[tuple[int, str]] = field(default_factory=list)  # (payload index, `answer`) of successes

    @property
    def ok(self) -> int:
        return self.statuses.get(200, 0)

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    @property
    def throughput(self) -> float:
        return self.ok / self.seconds

    def server_errors(self, allowed: tuple[int, ...] = (503,)) -> dict[int, int]:
        """5xx statuses other than the deliberate ones (503 = queue full, retry later)."""
        return {s: n for s, n in self.statuses.items() if s >= 500 and s not in allowed}

    def table(self) -> str:
        mean_batch = float(np.mean(self.batch_sizes)) if self.batch_sizes else float("nan")
        rows = [
            ("clients", f"{self.clients}"),
            ("duration", f"{self.seconds:.1f} s"),
            ("requests ok", f"{self.ok}"),
            ("statuses", ", ".join(f"{s}: {n}" for s, n in sorted(self.statuses.items()))),
            ("no answer", f"{len(self.failures)}"),
            ("latency p50", f"{self.percentile(50):.0f} ms"),
            ("latency p95", f"{self.percentile(95):.0f} ms"),
            ("throughput", f"{self.throughput:.2f} req/s"),
            ("mean generation batch (per request)", f"{mean_batch:.2f}"),
        ]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def run_load(
    url: str,
    payloads: list[dict],
    clients: int = 16,
    seconds: float = 60.0,
    api_key: str | None = None,
    timeout_s: float = 120.0,
    path: str = "/v1/chat",
    stop: threading.Event | None = None,
) -> LoadReport:
    """POST `payloads` (JSON bodies, cycled) to url + path from `clients` threads for `seconds`, or
    until `stop` is set (each client finishes its request in flight)."""
    stop = stop or threading.Event()
    report = LoadReport(clients, seconds)
    lock = threading.Lock()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    deadline = time.monotonic() + seconds

    def client(index: int) -> None:
        session = requests.Session()
        n = index
        while time.monotonic() < deadline and not stop.is_set():
            which = n % len(payloads)
            payload = payloads[which]
            n += clients
            start = time.perf_counter()
            try:
                response = session.post(url + path, json=payload, headers=headers, timeout=timeout_s)
            except requests.RequestException as err:
                with lock:
                    report.failures.append(f"{type(err).__name__}: {err}")
                continue
            latency = (time.perf_counter() - start) * 1000
            body = response.json() if response.status_code == 200 else {}
            with lock:
                report.statuses[response.status_code] += 1
                if response.status_code == 200:
                    report.latencies_ms.append(latency)
                    report.batch_sizes.append(body.get("generation_batch_size", 0))
                    report.answers.append((which, body.get("answer")))
            if response.status_code == 503:
                time.sleep(float(response.headers.get("retry-after", 1)))

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=seconds + timeout_s + 10)
    report.seconds = time.monotonic() - started
    return report
