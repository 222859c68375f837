"""Check the RAM port against a fixture made by the original code.

A fixture directory holds `ram.pth` (`{"model": {...}}`), `tags.txt`, `tag_thresholds.txt`,
`config.json` (dimensions and `reference_generate_tag`, the strings the original printed) and
`io.pt` (`image` (B, 3, H, W) normalised, `logits` (B, num_tags), `tags_decided` 0/1).

    python -m bubogpt.grounding.ram_conformance DIR     # exit code 0 = conforms
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from bubogpt.grounding.ram import decide_tags
from bubogpt.grounding.ram_checkpoint import load_ram_tagger

TOLERANCE = 1e-4  # float32 on the CPU, max absolute logit error


def check_ram_fixture(directory: str | Path) -> int:
    """Run the fixture's images through the loaded tagger; print the comparison; 0 if it conforms."""
    directory = Path(directory)
    model, thresholds, report = load_ram_tagger(
        directory / "ram.pth",
        directory / "tags.txt",
        directory / "tag_thresholds.txt",
        config_json_path=directory / "config.json",
    )
    print(f"ram: {report.summary()}")
    io = torch.load(directory / "io.pt", map_location="cpu", weights_only=True)
    with torch.no_grad():
        logits = model(io["image"].float())
    expected_logits = io["logits"].float()
    if logits.shape != expected_logits.shape:
        print(f"ram: logits shape {tuple(logits.shape)} != expected {tuple(expected_logits.shape)}: FAIL")
        return 1
    max_error = (logits - expected_logits).abs().max().item()
    decided = decide_tags(logits, thresholds)
    mismatches = int((decided != io["tags_decided"].bool()).sum())
    print(f"ram: logits max abs error {max_error:.3e} (tolerance {TOLERANCE:.0e})")
    print(f"ram: tag decisions differing from the original: {mismatches} of {decided.numel()}")

    # The strings the original `generate_tag` printed, if the fixture recorded them.
    reference = _read_json(directory / "config.json").get("reference_generate_tag")
    ours = [" | ".join(name for name, keep in zip(model.tag_names, row.tolist()) if keep) for row in decided]
    strings_match = True
    for i, text in enumerate(ours):
        line = f"ram: image {i}: {text!r}"
        if reference is not None:
            original = reference[i] if i < len(reference) else None
            strings_match &= original == text
            line += " (matches original)" if original == text else f" != original {original!r}"
        print(line)
    if reference is not None and len(reference) != len(ours):
        strings_match = False
        print(f"ram: original printed {len(reference)} images, we tagged {len(ours)}")

    ok = max_error <= TOLERANCE and mismatches == 0 and strings_match
    print(f"ram: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m bubogpt.grounding.ram_conformance FIXTURE_DIR", file=sys.stderr)
        return 2
    return check_ram_fixture(args[0])


if __name__ == "__main__":
    sys.exit(main())
