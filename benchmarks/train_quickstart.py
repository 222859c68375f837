"""Issue #4's must-show runs: the tiny quickstart training and the negative-pair ablation.

    python benchmarks/train_quickstart.py [--workdir DIR] [--corpus DIR] [--prepared DIR]

1. synthesise the "medium" corpus (seed 0) and prepare it (`bubogpt data prepare`), unless given;
2. `bubogpt train --stage all --preset tiny` -- every stage of the tiny recipe, timed (wall clock,
   Ray start-up included) -- and its evaluation on the held-out splits;
3. the ablation: the same stage 2, from the same stage-1 checkpoint, without negative pairs
   (`--config` drops `negative_pairs` from stage 2's datasets), evaluated the same way;
4. `bubogpt eval --compare`: both side by side; everything is written to
   benchmarks/results/train_quickstart_<date>.json (per-stage loss curves included).

The machine's load is recorded before and after: on a shared machine the minutes are noisy.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from workflows.cli import parse  # noqa: E402

NO_NEGATIVES = {"stage2": {"datasets": {"cc_sbu_align": 1.0, "llava_instruct": 3.0, "clotho": 1.0, "vggss": 2.0}}}


def run(argv: list[str]) -> float:
    """Run one `bubogpt` command in this process; returns its wall-clock minutes."""
    function, options = parse(argv)
    started = time.time()
    code = function(options)
    if code != 0:
        raise SystemExit(f"bubogpt {' '.join(argv)} failed with exit code {code}")
    return (time.time() - started) / 60


def loss_curves(out_dir: Path) -> dict[str, list]:
    from bubogpt.checkpoints.training_state import read_state

    stages = json.loads((out_dir / "stages.json").read_text())
    return {stage: read_state(folder).loss_history for stage, folder in stages.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("work/train_quickstart"))
    parser.add_argument("--corpus", type=Path, help="an existing synthetic corpus (default: synthesise 'medium')")
    parser.add_argument("--prepared", type=Path, help="an existing prepared corpus")
    args = parser.parse_args()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    record: dict = {"date": datetime.date.today().isoformat(), "machine": platform.platform(),
                    "cpus": os.cpu_count(), "load_before": os.getloadavg()}  # fmt: skip

    prepared = args.prepared
    if prepared is None:
        corpus = args.corpus or work / "corpus"
        if not (corpus / "corpus.json").is_file():
            run(["data", "synth", "--out", str(corpus), "--size", "medium", "--seed", "0"])
        prepared = work / "prepared"
        if not (prepared / "manifest.json").is_file():
            record["prepare_minutes"] = run(["data", "prepare", "--input", str(corpus), "--out", str(prepared)])

    full, ablation = work / "full", work / "ablation"
    record["train_minutes_with_eval"] = run(
        ["train", "--data", str(prepared), "--out", str(full), "--stage", "all", "--preset", "tiny"]
    )
    stage1_end = Path(json.loads((full / "stages.json").read_text())["stage1"])
    config = work / "no_negatives.json"
    config.write_text(json.dumps(NO_NEGATIVES))
    record["ablation_minutes_with_eval"] = run([
        "train", "--data", str(prepared), "--out", str(ablation), "--stage", "stage2", "--preset", "tiny",
        "--init", str(stage1_end / "model"), "--config", str(config),
    ])  # fmt: skip
    compare = work / "compare.json"
    run(["eval", "--model", str(full / "model"), "--compare", str(ablation / "model"), "--data", str(prepared),
         "--json", str(compare)])  # fmt: skip

    results = json.loads(compare.read_text())
    record["load_after"] = os.getloadavg()
    record["full"] = {"metrics": results["model"]["metrics"], "counts": results["model"]["counts"],
                      "targets_met": results["model"]["targets_met"], "loss_curves": loss_curves(full)}  # fmt: skip
    record["ablation_without_negative_pairs"] = {"metrics": results["compare"]["metrics"],
                                                 "counts": results["compare"]["counts"],
                                                 "loss_curves": loss_curves(ablation)}  # fmt: skip
    for name in ("full", "ablation"):
        log = json.loads(((full if name == "full" else ablation) / "run.json").read_text())
        record.setdefault("mlflow", {})[name] = log
    out = REPO / "benchmarks" / "results" / f"train_quickstart_{record['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
