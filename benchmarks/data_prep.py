"""Data preparation throughput: a plain single-process loop against the Ray Data pipeline.

Both do the same work on the same corpus on this machine, one after the other: read every record
with the readers, preprocess it with one `Preprocessor` (decode, image transform, fbank clips,
float16 bytes) and write Parquet shards: the pipeline's `prepare_chunk` over the same chunks. The
plain loop runs them in this process with one torch thread; Ray Data runs `--workers`
ChunkPreparer actors (one CPU each) on a local Ray started here (`run_prepare`). The two outputs
are checked to hold the same rows and the same bytes. Each repeat runs both (alternating which
goes first); the table gives every repeat and the median ratio.

    python benchmarks/data_prep.py                        # synthesises the "small" corpus (seed 0)
    python benchmarks/data_prep.py --size medium          # ~3,600 records
    python benchmarks/data_prep.py --corpus DIR           # any corpus.json layout

What is timed: the plain loop from building its Preprocessor to its last shard (this process has
imported torch already); Ray Data from `run_prepare`'s call to its return, so it includes starting
the actors, each of which imports torch and the preprocessing code (2-3 s of CPU each). Not
counted, timed apart as "cluster start": what a running cluster has already done before a job
comes, i.e. `ray.init`, the worker processes it starts (a no-op task per CPU waits for them) and
Ray Data's detached per-cluster actors (stats, autoscaling coordinator, actor locations: one tiny
dataset through a one-actor pool runs first). The table also gives the ratio as it would be if the
plain loop paid its own process start too (a fresh `python -c "import torch, workflows.prepare"`,
timed after each plain run), as the actors pay theirs.

The machine may be shared: a sampler counts the CPU time of this process and its descendants
("ours") and of every other process ("others, cores": 1.0 = one core busy with someone else's work)
during each phase, so a reader can tell a quiet measurement from a noisy one; the ratio of the
CPU seconds says how much work Ray adds, however loaded the machine. `--json FILE` writes every
figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import psutil
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bubogpt.data.synth import synthesize  # noqa: E402
from workflows.data.prepared import read_split  # noqa: E402
from workflows.prepare import (  # noqa: E402
    PrepareConfig,
    Preprocessor,
    chunk_size,
    load_indexes,
    plan_chunks,
    prepare_chunk,
    read_corpus_spec,
    run_prepare,
)


def plain_loop(corpus: Path, out: Path, preset: str, batch_size: int, rows_per_file: int, workers: int) -> int:
    """The pipeline's work without Ray: the same chunks through `prepare_chunk`. Returns rows written."""
    preprocessor = Preprocessor(PrepareConfig.from_preset(preset))
    indexed, _ = load_indexes(read_corpus_spec(corpus))
    entries = sum(len(e) for _, e in indexed if e is not None)
    chunks = plan_chunks(indexed, chunk_size(entries, workers, batch_size, rows_per_file))
    written = 0
    for chunk in chunks:
        result = prepare_chunk(chunk, preprocessor, pafs.LocalFileSystem(), str(out), "plain", batch_size, rows_per_file)
        written += sum(f["rows"] for f in result["files"])
    return written


def same_rows(plain: Path, prepared: Path, manifest: dict) -> bool:
    """Both outputs hold the same ids with byte-identical tensors, split by split."""
    for dataset, splits in manifest["counts"].items():
        for split in splits:
            files = sorted((plain / dataset / split).glob("*.parquet"))
            a = {r["id"]: r for f in files for r in pq.read_table(f).to_pylist()}
            b = {r["id"]: r for r in read_split(prepared, dataset, split).to_pylist()}
            if a != b:
                return False
    return True


class Identity:
    """A callable class: a dataset mapped with it starts all of Ray Data's per-cluster actors."""

    def __call__(self, batch):
        return batch


class OthersCPU:
    """CPU seconds used by processes outside this one and its descendants (Ray's), sampled."""

    def __init__(self, interval: float = 1.0):  # a sample costs ~5 ms of CPU
        self.interval, self.others, self.ours = interval, 0.0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me, previous = psutil.Process(), {}
        while not self._stop.wait(self.interval):
            ours = {me.pid} | {p.pid for p in me.children(recursive=True)}
            current = {}
            for process in psutil.process_iter():
                try:
                    times = process.cpu_times()
                except psutil.Error:
                    continue
                current[process.pid] = times.user + times.system
                used = current[process.pid] - previous.get(process.pid, current[process.pid])
                if process.pid in ours:
                    self.ours += used
                else:
                    self.others += used
            previous = current

    def __enter__(self) -> "OthersCPU":
        self._start = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.seconds = time.perf_counter() - self._start

    def cores(self) -> float:
        return self.others / self.seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=None, help="a corpus.json folder (default: synthesise one)")
    parser.add_argument("--size", choices=["tiny", "small", "medium"], default="small")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rows-per-file", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3, help="plain + Ray runs, alternating which goes first")
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    args = parser.parse_args()

    import ray

    runs = []
    with tempfile.TemporaryDirectory(prefix="bubogpt-data-prep-") as tmp:
        tmp = Path(tmp)
        corpus = args.corpus
        if corpus is None:
            corpus = tmp / "corpus"
            start = time.perf_counter()
            synthesize(corpus, seed=0, size=args.size)
            print(f"synthesised the {args.size!r} corpus in {time.perf_counter() - start:.1f} s", flush=True)

        torch.set_num_threads(1)  # one process, one thread: what one Ray actor gets
        start = time.perf_counter()
        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
        ray.get([ray.remote(lambda: None).remote() for _ in range(args.workers)])
        ray.data.range(1).map_batches(Identity, concurrency=1).materialize()  # Ray Data's cluster actors
        init_s = time.perf_counter() - start

        def plain(repeat: int) -> dict:
            with OthersCPU() as load:
                start = time.perf_counter()
                rows = plain_loop(corpus, tmp / f"plain{repeat}", args.preset, args.batch_size, args.rows_per_file,
                                  args.workers)  # fmt: skip
                seconds = time.perf_counter() - start
            start = time.perf_counter()  # what a plain-loop script pays before its loop: Python and imports
            subprocess.run([sys.executable, "-c", "import torch, workflows.prepare"], check=True, cwd=REPO)
            start_s = time.perf_counter() - start
            print(f"  plain loop: {rows} records in {seconds:.1f} s, {load.ours:.1f} CPU s "
                  f"(others {load.cores():.2f} cores); its process start {start_s:.1f} s", flush=True)  # fmt: skip
            return {"rows": rows, "seconds": seconds, "cpu_s": load.ours, "others_cores": load.cores(),
                    "process_start_s": start_s}  # fmt: skip

        def ray_data(repeat: int) -> dict:
            with OthersCPU() as load:
                start = time.perf_counter()
                manifest = run_prepare(corpus, tmp / f"ray{repeat}", preset=args.preset, workers=args.workers,
                                       batch_size=args.batch_size, rows_per_file=args.rows_per_file, progress=False)  # fmt: skip
                seconds = time.perf_counter() - start
            rows = sum(n for splits in manifest["counts"].values() for n in splits.values())
            print(f"  Ray Data: {rows} records in {seconds:.1f} s, {load.ours:.1f} CPU s "
                  f"(others {load.cores():.2f} cores)", flush=True)  # fmt: skip
            return {"rows": rows, "seconds": seconds, "cpu_s": load.ours, "others_cores": load.cores(),
                    "manifest": manifest}  # fmt: skip

        for repeat in range(args.repeats):
            print(f"repeat {repeat + 1}/{args.repeats}", flush=True)
            if repeat % 2 == 0:
                p, r = plain(repeat), ray_data(repeat)
            else:
                r, p = ray_data(repeat), plain(repeat)
            identical = p["rows"] == r["rows"] and same_rows(tmp / f"plain{repeat}", tmp / f"ray{repeat}", r.pop("manifest"))
            ratio = (r["rows"] / r["seconds"]) / (p["rows"] / p["seconds"])
            with_start = (r["rows"] / r["seconds"]) / (p["rows"] / (p["seconds"] + p["process_start_s"]))
            runs.append({"repeat": repeat + 1, "plain": p, "ray": r, "ratio": ratio, "ratio_plain_with_start": with_start,
                         "identical": identical})  # fmt: skip
        ray.shutdown()

    ratios = [run["ratio"] for run in runs]
    median = statistics.median(ratios)
    with_start = [run["ratio_plain_with_start"] for run in runs]
    identical = all(run["identical"] for run in runs)
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/data_prep.py", *sys.argv[1:]])
    source = str(corpus) if args.corpus else f"{args.size} synthetic (seed 0)"
    machine = (f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
               f"load average {os.getloadavg()[0]:.1f} at the end")  # fmt: skip
    print()
    print(f"machine: {machine}; torch {torch.__version__}, ray {ray.__version__}")
    print(f"corpus: {source}; preset {args.preset}; batch {args.batch_size}; workers {args.workers}")
    print()
    print("| repeat | plain loop s | Ray Data s | records | plain rec/s | Ray rec/s | ratio | plain loop's process "
          "start s (ratio with it) | CPU s, ours (plain / Ray) | others, cores (plain / Ray) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for run in runs:
        p, r = run["plain"], run["ray"]
        print(f"| {run['repeat']} | {p['seconds']:.1f} | {r['seconds']:.1f} | {r['rows']} | "
              f"{p['rows'] / p['seconds']:.1f} | {r['rows'] / r['seconds']:.1f} | {run['ratio']:.2f}x | "
              f"{p['process_start_s']:.1f} ({run['ratio_plain_with_start']:.2f}x) | "
              f"{p['cpu_s']:.1f} / {r['cpu_s']:.1f} | {p['others_cores']:.2f} / {r['others_cores']:.2f} |")  # fmt: skip
    print()
    print(f"Ray Data / plain loop throughput: median {median:.2f}x (min {min(ratios):.2f}x, max {max(ratios):.2f}x, "
          f"{len(ratios)} repeats); cluster start {init_s:.1f} s not counted; outputs identical: {identical}")  # fmt: skip
    print(f"if the plain loop also paid its process start (Python and imports; the actors pay theirs): median "
          f"{statistics.median(with_start):.2f}x (min {min(with_start):.2f}x, max {max(with_start):.2f}x)")  # fmt: skip
    print(f"reproduce: {command}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": command,
            "machine": machine, "torch": torch.__version__, "ray": ray.__version__, "corpus": source,
            "preset": args.preset, "batch_size": args.batch_size, "rows_per_file": args.rows_per_file,
            "workers": args.workers, "cluster_start_s": init_s, "runs": runs, "median_ratio": median,
            "median_ratio_plain_with_start": statistics.median(with_start),
            "min_ratio": min(ratios), "max_ratio": max(ratios), "outputs_identical": identical,
        }, indent=2))  # fmt: skip
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
