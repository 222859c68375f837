"""Where a trained tiny model's image answers fail: lookup among objects, or missing information.

    python benchmarks/image_qa_diagnosis.py --model OUT/model --data PREPARED [--json FILE]

1. Image QA on the held-out llava_instruct rows, asked as `bubogpt eval` asks (the served chat
   template), scored as `bubogpt eval` scores, split by question type and by the number of objects
   in the picture. With one object, colour and kind need no lookup (the picture's only object is
   the one asked about); with two or three, the model must find the object the question names.
2. A linear probe (scikit-learn logistic regression, 2/3 train, 1/3 test) of the single object's
   position from the model's vision Q-Former output and from its projected tokens, on pictures
   drawn by the pretraining's generator (seed 11, stream "diagnosis"): whether the position the
   answers miss is in the tokens the LLM receives at all. Chance: 1/5.

Prints a table and the command; `--json` writes every figure.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bubogpt.checkpoints.training_state import read_model  # noqa: E402
from bubogpt.data import vocab  # noqa: E402
from bubogpt.evaluation import score_image_qa  # noqa: E402
from workflows.data.prepared import read_manifest, read_split  # noqa: E402
from workflows.evaluate import generate_answers  # noqa: E402


def qa_by_object_count(model, data: Path, batch: int = 32) -> dict[str, dict[str, list[int]]]:
    """{question type: {objects: [right, total]}} on the held-out image QA rows."""
    manifest = read_manifest(data)
    rows = read_split(data, "llava_instruct", "eval").to_pylist()
    table: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        for row, answer in zip(chunk, generate_answers(model, chunk, manifest)):
            meta = json.loads(row["meta"])
            right = score_image_qa(answer, meta)
            cell = table[meta["qtype"]][str(meta["n_objects"])]
            cell[0] += int(right)
            cell[1] += 1
    return {qtype: dict(counts) for qtype, counts in table.items()}


@torch.no_grad()
def position_probe(model, pictures: int = 900) -> dict[str, float]:
    """Test accuracy of a linear probe of the single object's position, per representation."""
    from sklearn.linear_model import LogisticRegression

    from bubogpt.pretraining.tiny_components import PicturePool, normalise

    vision = model.config.vision
    pool = PicturePool(11, "diagnosis", pictures, vision.img_size, vision.img_size // vision.patch_size)
    qformer_out, projected = [], []
    for start in range(0, len(pool), 64):
        tokens = model.joiner.qformers["vision"](model.vision_encoder(normalise(pool.pixels[start : start + 64])))
        qformer_out.append(tokens.flatten(1))
        projected.append(model.joiner.projections["vision"](tokens).flatten(1))
    single = [i for i, scene in enumerate(pool.scenes) if len(scene.objects) == 1]
    labels = np.array([vocab.POSITIONS.index(pool.scenes[i].objects[0][2]) for i in single])
    cut = len(single) * 2 // 3
    scores = {"pictures_with_one_object": len(single)}
    for name, features in (("qformer_output", torch.cat(qformer_out)), ("projected_tokens", torch.cat(projected))):
        x = features[single].numpy()
        probe = LogisticRegression(max_iter=3000).fit(x[:cut], labels[:cut])
        scores[name] = float(probe.score(x[cut:], labels[cut:]))
    return scores


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="a trained model directory (OUT/model)")
    parser.add_argument("--data", type=Path, required=True, help="the prepared corpus it was trained on")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = read_model(args.model, trainable_lora=False).eval()
    qa = qa_by_object_count(model, args.data)
    probe = position_probe(model)
    command = "python " + shlex.join(["benchmarks/image_qa_diagnosis.py", *sys.argv[1:]])
    print("| question | 1 object | 2 objects | 3 objects |")
    print("|---|---|---|---|")
    for qtype in vocab.QUESTION_TYPES:
        cells = qa.get(qtype, {})
        row = [f"{cells[n][0] / cells[n][1]:.0%} ({cells[n][0]}/{cells[n][1]})" if n in cells else "-" for n in "123"]
        print(f"| {qtype} | " + " | ".join(row) + " |")
    print(f"\nposition of a single object, linear probe (chance 20%): Q-Former output {probe['qformer_output']:.0%}, "
          f"projected tokens {probe['projected_tokens']:.0%} ({probe['pictures_with_one_object']} pictures)")  # fmt: skip
    print(f"reproduce: {command}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": command,
            "model": str(args.model), "data": str(args.data), "image_qa_by_objects": qa, "position_probe": probe,
        }, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
