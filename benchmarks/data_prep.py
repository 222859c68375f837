"""Data preparation throughput: a plain single-process loop against the Ray Data pipeline.

Both run the same work on the same corpus on this machine, one after the other: read every record
with the readers (which decode each file to validate it), preprocess it with `Preprocessor`
(image transform, fbank clips, float16 bytes) and write Parquet shards. The plain loop uses one
process with one torch thread; Ray Data runs `--workers` Preprocessor actors (one CPU each) on a
local Ray started here. The two outputs are checked to hold the same rows and the same bytes.

    python benchmarks/data_prep.py                        # synthesises the "small" corpus (seed 0)
    python benchmarks/data_prep.py --size medium          # ~3,600 records
    python benchmarks/data_prep.py --corpus DIR           # any corpus.json layout

Ray's start-up (`ray.init`) is timed apart; the Ray Data time includes starting its actors.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bubogpt.data.synth import synthesize  # noqa: E402
from workflows.data.prepared import read_split  # noqa: E402
from workflows.data.shards import write_shards  # noqa: E402
from workflows.prepare import (  # noqa: E402
    PrepareConfig,
    Preprocessor,
    read_corpus_spec,
    read_unit_records,
    records_to_batch,
    run_prepare,
)


def plain_loop(corpus: Path, out: Path, preset: str, batch_size: int) -> int:
    """The pipeline's work without Ray: readers -> Preprocessor batches -> Parquet. Returns rows written."""
    config = PrepareConfig.from_preset(preset)
    preprocessor = Preprocessor(config)
    schema = config.output_schema()
    written = 0
    for index, unit in enumerate(read_corpus_spec(corpus)):
        records = list(read_unit_records(unit))
        outputs = [
            pa.Table.from_pydict(preprocessor(records_to_batch(records[start : start + batch_size])))
            for start in range(0, len(records), batch_size)
        ]
        if outputs:
            table = pa.concat_tables(outputs, promote_options="permissive")
            result = write_shards(table, out, f"part-{index:05d}", schema)
            written += sum(f["rows"] for f in result["files"])
    return written


def same_rows(first: Path, second: Path, manifest: dict) -> bool:
    """Both outputs hold the same ids with byte-identical tensors, split by split."""
    for dataset in manifest["counts"]:
        for split in manifest["counts"][dataset]:
            a = {r["id"]: r for r in read_split(first, dataset, split).to_pylist()}
            b = {r["id"]: r for r in read_split(second, dataset, split).to_pylist()}
            if a != b:
                return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=None, help="a corpus.json folder (default: synthesise one)")
    parser.add_argument("--size", choices=["tiny", "small", "medium"], default="small")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    import ray

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
        plain_rows = plain_loop(corpus, tmp / "plain", args.preset, args.batch_size)
        plain_s = time.perf_counter() - start
        print(f"plain loop: {plain_rows} records in {plain_s:.1f} s", flush=True)

        start = time.perf_counter()
        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
        init_s = time.perf_counter() - start
        start = time.perf_counter()
        manifest = run_prepare(
            corpus, tmp / "ray", preset=args.preset, workers=args.workers, batch_size=args.batch_size, progress=False
        )
        ray_s = time.perf_counter() - start
        ray.shutdown()
        ray_rows = sum(n for splits in manifest["counts"].values() for n in splits.values())
        print(f"Ray Data: {ray_rows} records in {ray_s:.1f} s (+ {init_s:.1f} s ray.init)", flush=True)
        identical = ray_rows == plain_rows and same_rows(tmp / "plain", tmp / "ray", manifest)

    cpu = platform.processor() or platform.machine()
    source = corpus if args.corpus else f"{args.size} synthetic (seed 0)"
    print()
    print(f"machine: {os.cpu_count()} CPUs ({cpu}), load average {os.getloadavg()[0]:.1f}; "
          f"torch {torch.__version__}, ray {ray.__version__}")  # fmt: skip
    print(f"corpus: {source}; preset {args.preset}; batch {args.batch_size}")
    print()
    print("| pipeline | workers | records | seconds | records/s |")
    print("|---|---|---|---|---|")
    print(f"| plain loop (1 process, 1 torch thread) | 1 | {plain_rows} | {plain_s:.1f} | {plain_rows / plain_s:.1f} |")
    print(f"| Ray Data (actors, incl. their start) | {args.workers} | {ray_rows} | {ray_s:.1f} | "
          f"{ray_rows / ray_s:.1f} |")  # fmt: skip
    print()
    print(f"Ray Data / plain loop throughput: {(ray_rows / ray_s) / (plain_rows / plain_s):.2f}x; "
          f"ray.init {init_s:.1f} s not counted; outputs identical: {identical}")  # fmt: skip
    print("reproduce: python " + " ".join(shlex.quote(a) for a in ["benchmarks/data_prep.py", *sys.argv[1:]]))
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
