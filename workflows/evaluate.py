"""`bubogpt eval`: a trained model on the held-out splits of a prepared corpus, one fixed decoding.

    bubogpt eval --model DIR --data PREPARED [--json FILE] [--compare DIR2] [--limit N]
                 [--tracking-uri URI]

Each eval row gets one prompt (the same for every model), asked as a user of the served model asks
it: `row_prompt` in the chat style (Serve's template, the one stage 2 trains in) with its dataset's
fixed instruction (`bubogpt.training.prompts.fixed_instruction`): image QA rows their own question;
audio rows (clotho, wavcaps) `EVAL_INSTRUCTIONS["sound"]`; image + audio rows (vggss,
negative_pairs) one shared question, `EVAL_INSTRUCTIONS["source"]`, so only the image and the sound
can tell a matched pair from a mismatched one; captioned images (cc_sbu_align) "Describe this
picture.", the prompt most likely to draw a sound from a model that hallucinates modalities (clotho
and wavcaps are the audio-only rows): the template's system sentence names an image and an audio,
and a model that does not look at its inputs then describes both. Greedy decoding, at most `MAX_NEW_TOKENS`. Answers are scored
from the ground truth in `meta` (bubogpt/evaluation.py). The `Evaluator` (a callable class that loads the
model once) runs in this process, or as a Ray Data `map_batches` actor with `--ray`.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bubogpt.evaluation import CHANCE, EvalReport, format_table, meets_target
from bubogpt.training import EVAL_INSTRUCTIONS, SERVED_PROMPT_STYLE, TrainConfig, fixed_instruction, generation_batch
from workflows.data.prepared import decode_row_tensors, read_manifest, read_split, shard_paths
from workflows.options import EvalOptions

EVAL_DATASETS = ("llava_instruct", "cc_sbu_align", "clotho", "wavcaps", "vggss", "negative_pairs")
MAX_NEW_TOKENS = 80
BATCH_SIZE = 32


def generate_answers(model, rows: list[dict[str, Any]], manifest: dict, prompt_style: str = SERVED_PROMPT_STYLE,
                     max_new_tokens: int = MAX_NEW_TOKENS, device: str | torch.device = "cpu") -> list[str]:  # fmt: skip
    """Greedy answers of `model` to prepared rows, asked the fixed way (`generation_batch`) in
    `prompt_style` (default: the served chat template)."""
    decoded = [{**row, **decode_row_tensors(row, manifest)} for row in rows]
    batch = generation_batch(decoded, prompt_style).to(device)
    return model.generate(batch.prompts, image=batch.image, audio=batch.audio, max_new_tokens=max_new_tokens,
                          do_sample=False, num_beams=1)  # fmt: skip


class Evaluator:
    """Loads a model once; called on a batch {column: array} it adds an `answer` column (each row
    asked in the served chat template)."""

    def __init__(self, model_dir: str, manifest: dict, device: str = "cpu", threads: int | None = None):
        from bubogpt.checkpoints.training_state import read_model

        if threads:
            torch.set_num_threads(threads)
        self.model = read_model(model_dir, trainable_lora=False).to(device).eval()
        self.manifest = manifest
        self.device = device

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        answers = generate_answers(self.model, rows, self.manifest, device=self.device)
        return {"dataset": batch["dataset"], "id": batch["id"], "meta": batch["meta"],
                "answer": np.array(answers, dtype=object)}  # fmt: skip


def sample_generations(model_dir: str | Path, data_dir: Path, config: TrainConfig, per_dataset: int = 2,
                       device: str = "cpu") -> list[dict]:  # fmt: skip
    """A few answers of a stage's model on held-out rows of the stage's datasets, in its prompt style.
    `model_dir`: a local path or a storage URI (a checkpoint's model folder under `--storage`)."""
    from bubogpt.checkpoints.training_state import read_model
    from workflows.run_storage import local_folder

    manifest = read_manifest(data_dir)
    with local_folder(model_dir) as local:
        model = read_model(local, trainable_lora=False).to(device).eval()
    samples = []
    for name in sorted(config.datasets):
        rows = read_split(data_dir, name, "eval").slice(0, per_dataset).to_pylist()
        if not rows:
            continue
        answers = generate_answers(model, rows, manifest, config.prompt_style, max_new_tokens=48, device=device)
        samples += [{"dataset": name, "id": row["id"], "instruction": row["instruction"], "reference": row["answer"],
                     "generated": answer} for row, answer in zip(rows, answers)]  # fmt: skip
    return samples


def evaluate_model(
    model_dir: str | Path, data_dir: str | Path, limit: int | None = None, datasets: tuple[str, ...] = EVAL_DATASETS,
    examples: int = 400, use_ray: bool = False, device: str = "cpu",
) -> EvalReport:
    """Generate and score every eval row (at most `limit` per dataset).

    In this process by default (`bubogpt train` calls it in a Ray task with a worker's resources);
    `use_ray` maps the `Evaluator` over Ray Data (one actor), for corpora whose eval splits are large."""
    manifest = read_manifest(data_dir)
    report = EvalReport()
    started = time.time()
    evaluator = None if use_ray else Evaluator(str(model_dir), manifest, device)
    for dataset in datasets:
        paths = [str(p) for p in shard_paths(data_dir, dataset, "eval")]
        if use_ray:
            import ray.data

            rows = ray.data.read_parquet(paths)
            rows = rows.limit(limit) if limit else rows
            answered = rows.map_batches(
                Evaluator,
                fn_constructor_kwargs={"model_dir": str(model_dir), "manifest": manifest},
                batch_size=BATCH_SIZE, batch_format="numpy", concurrency=1,
            ).take_all()  # fmt: skip
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.concat_tables(pq.read_table(p) for p in paths)
            table = table.slice(0, limit) if limit else table
            answered = []
            for start in range(0, table.num_rows, BATCH_SIZE):
                batch = table.slice(start, BATCH_SIZE).to_pydict()
                out = evaluator({k: np.array(v, dtype=object) for k, v in batch.items()})
                answered += [dict(zip(out, values)) for values in zip(*out.values())]
        for row in answered:
            meta = json.loads(row["meta"])
            report.add_row(row["dataset"], meta, row["answer"], keep_example=len(report.examples) < examples)
        print(f"[bubogpt eval] {dataset}: {len(answered)} rows scored ({time.time() - started:.0f} s so far)", flush=True)
    return report


def report_json(report: EvalReport, model_dir: str | Path) -> dict[str, Any]:
    metrics = report.metrics()
    return {
        "model": str(model_dir),
        "decoding": {"do_sample": False, "num_beams": 1, "max_new_tokens": MAX_NEW_TOKENS},
        "instructions": dict(EVAL_INSTRUCTIONS) | {"caption": fixed_instruction({"dataset": "cc_sbu_align"})},
        "metrics": metrics,
        "counts": report.counts(),
        "chance": {m: CHANCE[m] for m in metrics if m in CHANCE},
        "targets_met": {m: meets_target(m, v) for m, v in metrics.items() if meets_target(m, v) is not None},
        "examples": report.examples,
    }


def log_evaluation(report: EvalReport, tracker, json_path: str | Path | None = None, run_id: str | None = None,
                   model_dir: str | Path = "") -> dict[str, Any]:  # fmt: skip
    """Print the table, write the JSON, log the metrics (`eval_*`) and examples to the tracker."""
    data = report_json(report, model_dir)
    print(format_table({"model": data["metrics"]}, data["counts"]), flush=True)
    if json_path:
        Path(json_path).write_text(json.dumps(data, indent=2))
    tracker.log_metrics({f"eval_{k}": v for k, v in data["metrics"].items()}, 0, run_id)
    tracker.log_text(json.dumps(data, indent=2), "eval/eval.json", run_id)
    tracker.log_text(json.dumps(report.examples[:50], indent=2), "eval/sample_generations.json", run_id)
    return data


def run_eval(options: EvalOptions) -> int:
    from workflows.tracking import MlflowTracker

    read_manifest(options.data)  # PreparedDataError (a user error) before any model is loaded
    if options.ray:
        from workflows.ray_connect import connect

        connect(options.address)
    models = {"model": options.model}
    if options.compare:
        models["compare"] = options.compare
    results = {name: evaluate_model(path, options.data, limit=options.limit, use_ray=options.ray) for name, path in models.items()}
    columns = {Path(path).resolve().parent.name + "/" + Path(path).name: results[name].metrics() for name, path in models.items()}
    print(format_table(columns), flush=True)
    output = {name: report_json(results[name], path) for name, path in models.items()}
    if options.json:
        Path(options.json).write_text(json.dumps(output if options.compare else output["model"], indent=2))
    uri = options.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        tracker = MlflowTracker.start_job(uri, "eval", {"model": options.model, "compare": options.compare or "", "data": options.data})
        for name, path in models.items():
            run = tracker.start_stage(f"eval:{name}", {"model": path})
            log_evaluation(results[name], tracker, None, run, path)
            tracker.end_run(run)
        tracker.end_run()
    return 0
