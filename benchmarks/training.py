"""Training throughput: stage-1 and stage-2 steps with and without precomputed frozen-encoder
features, on 1 and 2 DDP workers (issue #8).

    python benchmarks/training.py                     # "small" synthetic corpus, 60 steps per stage
    python benchmarks/training.py --steps 12 --skip 4 --size tiny      # a smoke run

Everything goes through the real recipe on a local Ray (`--num-cpus`, default 2):

1. synthesise the corpus (seed 0) and build the tiny starting model (`OUT/init` of `bubogpt train`);
2. prepare the corpus twice with `bubogpt data prepare`: once plain, once with `--features-model`
   set to that starting model, which also stores its frozen encoders' output tokens;
3. for each corpus x worker count, one `bubogpt train --stage stage1,stage2 --init MODEL` job;
4. read back the recipe's own per-step `samples_per_s` metric (global samples / rank-0 step time,
   tracked in each stage's MLflow run) and average steps `--skip`+1..`--steps`: the first steps
   (worker start, first batches, allocator warm-up) are left out.

Precomputed tokens are only valid while the encoders stay frozen. The tiny recipe trains its
audio encoder in stage 1 and sets `use_precomputed_tokens=False` for both stages (earlier tiny-only
stages change the encoders); the released 7b/13b recipe keeps the encoders frozen and uses the
tokens. So every job here runs the tiny stages with the 7b recipe's choice, through `--config`:
stage 1 with the audio encoder frozen, both stages with `use_precomputed_tokens=True`. The jobs
on the plain corpus run that same config; with no tokens in the data, the recipe encodes the
media on the fly. The features jobs check that the recipe accepts the tokens
(`precomputed_tokens_match`) before they run.

Per-worker resources are held constant: one torch thread per worker (`--cpus-per-worker` 1 for
one worker, 0.5 for two, so one CPU stays free for Ray Data either way).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.train_quickstart import run  # noqa: E402  (one `bubogpt` command in this process)

STAGES = ("stage1", "stage2")
# The released recipe's choice for frozen encoders (see the module docstring).
FROZEN_ENCODERS = {
    "stage1": {"train_audio_encoder": False, "use_precomputed_tokens": True},
    "stage2": {"use_precomputed_tokens": True},
}


def prepare_corpora(work: Path, size: str, init_dir: Path) -> dict[str, tuple[Path, float]]:
    """{"on the fly": (plain prepared dir, seconds), "precomputed": (dir with tokens, seconds)}."""
    corpus = work / "corpus"
    if not (corpus / "corpus.json").is_file():
        run(["data", "synth", "--out", str(corpus), "--size", size, "--seed", "0"])
    prepared = {}
    for label, extra in (("on the fly", []), ("precomputed", ["--features-model", str(init_dir)])):
        out = work / ("prepared_features" if extra else "prepared_plain")
        minutes = 0.0
        if not (out / "manifest.json").is_file():
            minutes = run(["data", "prepare", "--input", str(corpus), "--out", str(out), *extra])
        prepared[label] = (out, minutes * 60)
    return prepared


def train_job(prepared: Path, out: Path, init_dir: Path, config: Path, workers: int, steps: int) -> Path:
    """One `bubogpt train` job over both stages; returns its output folder."""
    shutil.rmtree(out, ignore_errors=True)  # a job rerun in the same OUT would resume, not train
    run([
        "train", "--data", str(prepared), "--out", str(out), "--stage", ",".join(STAGES), "--preset", "tiny",
        "--init", str(init_dir), "--config", str(config), "--max-steps", str(steps),
        "--num-workers", str(workers), "--cpus-per-worker", str(1 / workers),
        "--no-eval", "--no-samples", "--max-failures", "0",
    ])  # fmt: skip
    return out


def steady_samples_per_s(out: Path, skip: int) -> dict[str, float]:
    """{stage: samples/s over the steps after `skip`}, from the job's MLflow runs.

    Each step's metric is samples / step time, so the aggregate (total samples / total time) is the
    harmonic mean of the per-step values (every step has the same number of samples)."""
    from mlflow import MlflowClient

    record = json.loads((out / "run.json").read_text())
    client = MlflowClient(record["tracking_uri"])
    result = {}
    for stage in STAGES:
        history = client.get_metric_history(record["stage_runs"][stage], "samples_per_s")
        values = [m.value for m in sorted(history, key=lambda m: m.step) if m.step > skip]
        if not values:
            raise SystemExit(f"{out}: no {stage} steps after step {skip} in MLflow")
        result[stage] = len(values) / sum(1 / v for v in values)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, help="keep corpora and runs here (default: a temporary folder)")
    parser.add_argument("--size", choices=["tiny", "small", "medium"], default="small")
    parser.add_argument("--steps", type=int, default=60, help="steps per stage")
    parser.add_argument("--skip", type=int, default=5, help="first steps of each stage left out of the average")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray")
    args = parser.parse_args()
    if args.skip >= args.steps:
        parser.error("--skip must be below --steps")

    import ray
    import torch

    from bubogpt.training import resolve_stages
    from workflows.data.prepared import read_manifest
    from workflows.model_dirs import build_initial_model, precomputed_tokens_match

    os.environ.pop("MLFLOW_TRACKING_URI", None)  # each job tracks into its own OUT/mlflow.db
    with tempfile.TemporaryDirectory(prefix="bubogpt-training-bench-") as tmp:
        work = (args.workdir or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        load_before = os.getloadavg()
        # A Ray of our own (address="local"), not a cluster another job may have left running here.
        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False

        init_dir = build_initial_model("tiny", work / "model", None, seed=0)
        prepared = prepare_corpora(work, args.size, init_dir)
        features_dir = prepared["precomputed"][0]
        if not precomputed_tokens_match(read_manifest(features_dir), init_dir):
            raise SystemExit(f"{features_dir}: the recipe would not use its tokens (features model mismatch)")
        config = work / "frozen_encoders.json"
        config.write_text(json.dumps(FROZEN_ENCODERS, indent=2))
        batch = {c.stage: c.batch_size for c in resolve_stages("tiny", ",".join(STAGES), FROZEN_ENCODERS)}

        rows = []  # (stage, features, workers, samples/s)
        for workers in args.workers:
            for label in ("on the fly", "precomputed"):
                out = work / "runs" / f"{label.replace(' ', '_')}_{workers}w"
                started = time.time()
                train_job(prepared[label][0], out, init_dir, config, workers, args.steps)
                seconds = time.time() - started
                for stage, value in steady_samples_per_s(out, args.skip).items():
                    rows.append((stage, label, workers, value))
                print(f"{label}, {workers} worker(s): job {seconds:.0f} s", flush=True)
        ray.shutdown()
        load_after = os.getloadavg()
    rows.sort(key=lambda r: (STAGES.index(r[0]), r[2], r[1] != "on the fly"))

    rate = {(stage, label, workers): r for stage, label, workers, r in rows}
    baseline = {stage: rate[(stage, "on the fly", min(args.workers))] for stage in STAGES}
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/training.py", *sys.argv[1:]])
    print()
    print(f"machine: {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), no GPU; "
          f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after; "
          f"torch {torch.__version__}, ray {ray.__version__}")  # fmt: skip
    print(f"corpus: {args.size} synthetic (seed 0); preset tiny; per-worker batch "
          f"{', '.join(f'{s} {b}' for s, b in batch.items())}; {args.steps} steps per stage, "
          f"steps {args.skip + 1}..{args.steps} averaged; local Ray with {args.num_cpus} CPUs; "
          f"1 torch thread per worker")  # fmt: skip
    if prepared["precomputed"][1]:  # 0: both reused from --workdir
        print(f"bubogpt data prepare: plain {prepared['on the fly'][1]:.0f} s, "
              f"with features {prepared['precomputed'][1]:.0f} s (the one-off cost of the tokens)")  # fmt: skip
    print()
    print("| stage | features | workers | samples/s | ratio vs. on the fly, 1 worker |")
    print("|---|---|---|---|---|")
    for stage, label, workers, r in rows:
        print(f"| {stage} | {label} | {workers} | {r:.1f} | {r / baseline[stage]:.2f}x |")
    print()
    for stage in STAGES:
        gains = ", ".join(f"{rate[(stage, 'precomputed', w)] / rate[(stage, 'on the fly', w)]:.2f}x on {w} worker(s)"
                          for w in args.workers)  # fmt: skip
        print(f"{stage}: precomputed / on the fly = {gains}")
    print(f"reproduce: {command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
