"""Prototype of the quickstart recipe on the pretrained tiny components, without Ray.

    python scratch/prototype_recipe.py featurise --corpus C --model M --out F.pt
    python scratch/prototype_recipe.py run --features F.pt --model M --out DIR [--no-negatives] ...

featurise: every record of the corpus read by the corpus readers and preprocessed exactly as
`bubogpt data prepare --features-model M` does (workflows/prepare.py's Preprocessor, run here without
Ray Data), kept as frozen-encoder tokens. run: stage 1, stage 2, evaluation (workflows/evaluate.py's
prompts, greedy, 80 tokens) on the eval splits.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from bubogpt.checkpoints.native import load_model
from workflows.data.prepared import decode_tensor


def featurise(corpus: Path, model_dir: Path, out: Path, batch: int = 32) -> None:
    from workflows.prepare import PrepareConfig, Preprocessor, read_corpus_spec, read_unit_records, records_to_batch

    config = PrepareConfig.from_preset("tiny", model_dir)
    shapes = config.shapes()
    preprocessor = Preprocessor(config)
    rows = []
    started = time.time()
    for unit in read_corpus_spec(corpus):
        records = [r for r in read_unit_records(unit) if r["skip_reason"] is None]
        for start in range(0, len(records), batch):
            out_batch = preprocessor(records_to_batch(records[start : start + batch]))
            for i in range(len(out_batch["id"])):
                row = {k: out_batch[k][i] for k in ("dataset", "split", "id", "instruction", "answer", "meta")}
                for column in ("vision_tokens", "audio_tokens"):
                    data = out_batch[column][i]
                    row[column] = None if data is None else decode_tensor(data, shapes[column], column).half()
                rows.append(row)
        print(f"featurised {unit.dataset}/{unit.split}: {len(rows)} rows, {time.time() - started:.0f} s", flush=True)
    torch.save(rows, out)


def by_dataset(rows: list[dict], split: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for row in rows:
        if row["split"] == split:
            out.setdefault(row["dataset"], []).append(row)
    return out


def train_stage(model, config, data: dict[str, list[dict]], log_every: int = 50) -> list[tuple[int, float]]:
    from bubogpt.training import RatioMixer, apply_lora, build_optimizer, build_scheduler, collate, configure_trainable

    torch.manual_seed(config.seed)
    if config.lora is not None and not hasattr(model.llm, "peft_config"):
        apply_lora(model, config.lora)
    model.config.max_txt_len = config.max_txt_len
    names = configure_trainable(model, config)
    print(f"{config.stage}: {sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)} trainable "
          f"parameters in {len(names)} tensors", flush=True)
    optimizer, mixer = build_optimizer(model, config), RatioMixer(config.datasets, config.seed)
    scheduler = build_scheduler(optimizer, config)
    rng = np.random.default_rng(config.seed)
    model.train()
    losses, started = [], time.time()
    for step in range(config.max_steps):
        dataset = mixer.choose(step)
        rows = [data[dataset][i] for i in rng.integers(len(data[dataset]), size=config.batch_size)]
        batch = collate(rows, config.prompt_style, rng, use_precomputed_tokens=True)
        loss = model(**batch.model_inputs()).loss
        loss.backward()
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        losses.append((step + 1, round(loss.item(), 5)))
        if (step + 1) % log_every == 0:
            recent = np.mean([v for _, v in losses[-log_every:]])
            print(f"{config.stage} step {step + 1}/{config.max_steps} loss {recent:.4f} "
                  f"({time.time() - started:.0f} s)", flush=True)
    model.eval()
    return losses


@torch.no_grad()
def evaluate(model, data: dict[str, list[dict]], batch: int = 32, limit: int | None = None):
    from bubogpt.evaluation import EvalReport
    from workflows.evaluate import EVAL_DATASETS, MAX_NEW_TOKENS, eval_prompt

    report = EvalReport()
    model.eval()
    for dataset in EVAL_DATASETS:
        rows = data.get(dataset, [])[:limit]
        for start in range(0, len(rows), batch):
            chunk = rows[start : start + batch]
            prompts, vision, audio = [], [], []
            for row in chunk:
                modalities = []
                if row["vision_tokens"] is not None:
                    modalities.append("vision")
                    vision.append(row["vision_tokens"].float())
                if row["audio_tokens"] is not None:
                    modalities.append("audio")
                    audio.append(row["audio_tokens"].float())
                prompts.append(eval_prompt(dataset, row["instruction"], modalities))
            answers = model.generate(prompts, vision_tokens=torch.stack(vision) if vision else None,
                                     audio_tokens=torch.stack(audio) if audio else None,
                                     max_new_tokens=MAX_NEW_TOKENS)  # fmt: skip
            for row, answer in zip(chunk, answers):
                report.add_row(dataset, json.loads(row["meta"]), answer, keep_example=len(report.examples) < 300)
            vision, audio = [], []
    return report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=("featurise", "run"))
    parser.add_argument("--corpus", type=Path)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--features", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--stages", default="{}", help="JSON {stage: {field: value}} overrides")
    parser.add_argument("--no-negatives", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.command == "featurise":
        featurise(args.corpus, args.model, args.out)
        return
    from bubogpt.evaluation import format_table
    from scratch.recipe import stage_configs

    rows = torch.load(args.features, weights_only=False)
    train, held_out = by_dataset(rows, "train"), by_dataset(rows, "eval")
    model = load_model(args.model)
    configs = stage_configs(json.loads(args.stages), negatives=not args.no_negatives)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"stages": {}, "args": vars(args) | {"features": str(args.features), "model": str(args.model),
                                                   "out": str(args.out), "corpus": str(args.corpus)}}
    for config in configs:
        started = time.time()
        losses = train_stage(model, config, train)
        result["stages"][config.stage] = {"config": config.to_dict(), "seconds": time.time() - started,
                                          "losses": losses}
        print(f"{config.stage}: {time.time() - started:.0f} s", flush=True)
    started = time.time()
    report = evaluate(model, held_out)
    result["eval_seconds"] = time.time() - started
    result["metrics"], result["counts"], result["examples"] = report.metrics(), report.counts(), report.examples
    print(format_table({"model": report.metrics()}, report.counts()), flush=True)
    (args.out / "result.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
