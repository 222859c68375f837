"""Where Serve's time goes under benchmarks/serving.py's 16-client chat mix: CPU per process, and a
py-spy profile of the LLM replica.

The application runs as benchmarks/serving.py runs it (serve/config.yaml's options, the tiny
random-weight model, the shipped grounding weights); `--clients` closed-loop clients run the same
chat mix for `--seconds`. Over the middle of the run it records:

  - CPU seconds of every process of the local Ray (the Serve proxy, each replica, the controller,
    Ray's own daemons) and of the load generator: which process uses the cores;
  - py-spy samples of every thread of the LLM replica (the generation worker, the encoders' thread
    pool, the replica's event loops, Ray's threads), folded into what each thread was doing:
    decode steps, prefills, prompt embeddings, detokenising, delivering tokens, encoders, idle;
  - the LLM replica's rows per decode step over the same window.

    python benchmarks/serving_profile.py --json benchmarks/results/serving_profile_DATE.json

Needs py-spy (the `dev` extra) and permission to read the replica's memory (root, or ptrace allowed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.serve_load import machine, replica_stats, rows_per_step, start_local, tiny_model_dir  # noqa: E402
from benchmarks.serving import RequestMix, warm_up  # noqa: E402
from serve.loadgen import run_load  # noqa: E402

# What a sampled stack of the LLM replica was doing: the first rule whose function appears in it.
ACTIVITIES = [
    ("decode step", ("decode (bubogpt/generation.py", "_decode_shape")),
    ("prefill", ("prefill (bubogpt/generation.py",)),
    ("prompt embeddings", ("prompt_embeddings",)),
    ("choosing tokens", ("_choose (bubogpt/generation.py",)),
    ("detokenising, stop strings", ("add (serve/generation.py", "RowText")),
    ("delivering tokens to the requests", ("_send (serve/generation.py", "call_soon_threadsafe")),
    ("image encoder", ("encode_image",)),
    ("audio encoder", ("encode_audio",)),
    ("prompt budget (tokenizer)", ("prompt_budget",)),
    ("request handling (replica event loop)", ("_generate_stream", "_generate_rows", "generate (serve/llm.py")),
    ("idle: waiting", ("wait (threading.py", "select (selectors.py", "_worker (concurrent", "epoll", "poll")),
]


def activity(stack: str) -> str:
    for name, needles in ACTIVITIES:
        if any(needle in stack for needle in needles):
            return name
    return "other"


def ray_processes() -> dict[int, str]:
    """{pid: name} of this process's children (the local Ray): replicas by their proctitle."""
    found = {}
    for child in psutil.Process().children(recursive=True):
        try:
            cmdline = child.cmdline()
        except psutil.Error:
            continue
        name = cmdline[0] if cmdline and cmdline[0].startswith("ray::") else child.name()
        found[child.pid] = name.split(" ")[0]
    return found


def cpu_seconds(pids) -> dict[int, float]:
    seconds = {}
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
            seconds[pid] = times.user + times.system
        except psutil.Error:
            pass
    return seconds


def fold(raw: str) -> dict[str, dict[str, int]]:
    """py-spy's raw output ("thread (id): frame;frame;... count" per line) -> {thread: {activity: samples}}."""
    threads: dict[str, Counter] = defaultdict(Counter)
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        thread = stack.split(";", 1)[0]
        name = thread.split("(")[0].strip() or thread
        threads[name][activity(stack)] += int(count)
    return {name: dict(counts.most_common()) for name, counts in threads.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=40.0, help="load duration; measured over its middle")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    command = "python benchmarks/serving_profile.py " + " ".join(argv if argv is not None else sys.argv[1:])
    load_start, started = os.getloadavg(), datetime.now(timezone.utc).isoformat(timespec="seconds")

    os.environ.setdefault("RAY_LOG_TO_DRIVER", "0")
    url = start_local(tiny_model_dir(), None, 0)
    warm_up(url, args.max_new_tokens)
    llm_pid = next(s["pid"] for s in replica_stats().values())
    reports = []
    load = threading.Thread(target=lambda: reports.append(run_load(
        url, RequestMix("profile", args.clients, args.max_new_tokens), args.clients, args.seconds)))
    load.start()
    time.sleep(args.seconds * 0.2)  # past the start

    window = args.seconds * 0.6
    processes = ray_processes()
    me = os.getpid()
    before, stats_before, t0 = cpu_seconds([*processes, me]), replica_stats(), time.monotonic()
    raw = Path(tempfile.mkdtemp()) / "llm.txt"
    spy = subprocess.run([str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(llm_pid), "--duration",
                          str(int(window)), "--rate", "100", "--threads", "--format", "raw", "--output", str(raw)],
                         capture_output=True, text=True)  # fmt: skip
    after, stats_after, elapsed = cpu_seconds([*processes, me]), replica_stats(), time.monotonic() - t0
    load.join()
    [report] = reports
    load_end = os.getloadavg()

    names = {**processes, me: "load generator (this process)"}
    cores = Counter()
    for pid, seconds in after.items():
        cores[names[pid]] += (seconds - before.get(pid, seconds)) / elapsed
    threads = fold(raw.read_text()) if raw.is_file() else {}
    mean_rows = rows_per_step(stats_before, stats_after)

    print(f"{args.clients} clients, {report.ok} ok in {report.seconds:.1f} s ({report.throughput:.2f} req/s), "
          f"p50 {report.percentile(50):.0f} ms; measured over {elapsed:.1f} s of it")  # fmt: skip
    print(f"LLM rows per decode step over the window: {mean_rows:.2f}\n\ncores used, by process "
          f"(the machine has {os.cpu_count()}):")  # fmt: skip
    for name, used in cores.most_common():
        if used >= 0.005:
            print(f"  {used:5.2f}  {name}")
    print(f"  {sum(cores.values()):5.2f}  all of them\n\nLLM replica, py-spy samples by thread and activity:")
    for thread, counts in sorted(threads.items(), key=lambda kv: -sum(kv[1].values())):
        total = sum(counts.values())
        print(f"  {thread}: {total} samples")
        for name, n in counts.items():
            print(f"      {n / total:6.1%}  {name}")
    if spy.returncode:
        print(f"py-spy failed: {spy.stderr[-500:]}")
    print(f"load average (1, 5, 15 min) at start {load_start}, at end {load_end}")
    print(f"\nreproduce: {command}")
    if args.json:
        args.json.write_text(json.dumps({
            "date": started, "command": command, "machine": machine(), "load_average_start": load_start,
            "load_average_end": load_end, "clients": args.clients, "max_new_tokens": args.max_new_tokens,
            "throughput_rps": report.throughput, "p50_ms": report.percentile(50), "window_s": elapsed,
            "llm_rows_per_decode_step": mean_rows, "cores_by_process": dict(cores.most_common()),
            "llm_threads": threads, "py_spy_stderr": spy.stderr[-2000:],
        }, indent=2))  # fmt: skip

    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
