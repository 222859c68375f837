"""The quickstart as a user runs it, timed, and the negative-pair ablation (issues 4 and 16).

    python benchmarks/train_quickstart.py [--workdir DIR] [--seed N] [--label L]

1. `bubogpt quickstart --workdir DIR/quickstart --seed N` in a fresh process, timed end to end
   (its own Ray and MLflow, the medium corpus of seed N, Ray Data preparation, both stages on the
   shipped pretrained tiny components, evaluation, Ray Serve, the demo requests), then `--stop`;
2. the ablation: the same stage 2, from the quickstart's stage-1 checkpoint, without negative pairs
   (`--config` drops `negative_pairs` from stage 2's datasets);
3. `bubogpt eval --compare`: both side by side; everything is written to
   benchmarks/results/train_quickstart_<date><L>_seed<N>.json (per-stage loss curves included; the
   label keeps an earlier run of the same day from being overwritten).

The machine's load is recorded before and after: on a shared machine the minutes are noisy.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from workflows.cli import parse  # noqa: E402

from bubogpt.training.config import tiny_stage_configs  # noqa: E402

# The recipe's stage-2 mix without negative pairs (derived, so that it follows the recipe).
NO_NEGATIVES = {"stage2": {"datasets": {name: ratio for name, ratio in tiny_stage_configs()["stage2"].datasets.items()
                                        if name != "negative_pairs"}}}  # fmt: skip


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
    parser.add_argument("--seed", type=int, default=0, help="the corpus seed (the demo's: 0)")
    parser.add_argument("--label", default="", help="appended to the date in the result's file name, e.g. 'c'")
    args = parser.parse_args()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    record: dict = {"date": datetime.date.today().isoformat(), "machine": platform.platform(), "seed": args.seed,
                    "cpus": os.cpu_count(), "load_before": os.getloadavg(),
                    "command": " ".join(["python", "benchmarks/train_quickstart.py", *sys.argv[1:]])}  # fmt: skip

    quick = work / "quickstart"
    command = [sys.executable, "-m", "workflows.cli", "quickstart", "--workdir", str(quick), "--seed", str(args.seed)]
    started = time.time()
    with open(work / "quickstart.log", "w") as log:  # its terminal output, for the per-stage minutes
        subprocess.run(command, cwd=REPO, check=True, stdout=log, stderr=subprocess.STDOUT)
    record["quickstart_minutes"] = (time.time() - started) / 60
    output = (work / "quickstart.log").read_text()
    record["stage_minutes"] = {stage: float(minutes) for stage, minutes in
                               re.findall(r"\[bubogpt train\] (\w+): finished \d+ steps in ([\d.]+) min", output)}  # fmt: skip
    subprocess.run(command[:6] + ["--stop"], cwd=REPO, check=True)
    record["quickstart_eval"] = json.loads((quick / "eval.json").read_text())
    record["quickstart_requests"] = json.loads((quick / "requests.json").read_text())

    prepared, ablation = quick / "prepared", work / "ablation"
    stage1_end = json.loads((quick / "stages.json").read_text())["stage1"]
    config = work / "no_negatives.json"
    config.write_text(json.dumps(NO_NEGATIVES))
    record["ablation_minutes_with_eval"] = run([
        "train", "--data", str(prepared), "--out", str(ablation), "--stage", "stage2", "--preset", "tiny",
        "--init", f"{stage1_end}/model", "--config", str(config), "--seed", str(args.seed),
    ])  # fmt: skip
    compare = work / "compare.json"
    run(["eval", "--model", str(quick / "model"), "--compare", str(ablation / "model"), "--data", str(prepared),
         "--json", str(compare)])  # fmt: skip

    results = json.loads(compare.read_text())
    record["load_after"] = os.getloadavg()
    record["full"] = {"metrics": results["model"]["metrics"], "counts": results["model"]["counts"],
                      "targets_met": results["model"]["targets_met"], "loss_curves": loss_curves(quick)}  # fmt: skip
    record["ablation_without_negative_pairs"] = {"metrics": results["compare"]["metrics"],
                                                 "counts": results["compare"]["counts"],
                                                 "loss_curves": loss_curves(ablation)}  # fmt: skip
    out = REPO / "benchmarks" / "results" / f"train_quickstart_{record['date']}{args.label}_seed{args.seed}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
