"""The grounding pipeline: tags -> boxes -> masks -> entities, and answer spans -> entities.

    image --tagger (RAM)--> tags --detector (Grounding DINO)--> boxes per tag
          --segmenter (SAM, one embedding per image)--> one mask per box
          --> entities: boxes grouped by tag and by the colour their pixels show
    answer + entities --matcher (LLM or rules)--> spans

`ground_image` runs when an image arrives (its result can be cached by the caller); `match` runs
after each answer. `load_tiny_grounding()` builds the pipeline from the tiny weights shipped in
`bubogpt/assets/grounding_tiny/` (see its README for how they were trained).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bubogpt.grounding.detector import Detection, DetectorConfig, GroundingDetector, TinyGroundingDino
from bubogpt.grounding.matcher import LLMMatcher, RuleMatcher
from bubogpt.grounding.ram import RAMTagger, decide_tags, preprocess_image
from bubogpt.grounding.ram_checkpoint import load_ram_tagger, original_key
from bubogpt.grounding.result import AnswerSpan, Entity, GroundingResult, encode_mask, entity_colour
from bubogpt.grounding.segmenter import SamConfig, SamSegmenter, load_sam, read_sam_config, save_sam, save_sam_config

TINY_ASSETS = Path(__file__).resolve().parents[1] / "assets" / "grounding_tiny"

# Colour names for entity attributes ("the red circle"), as RGB; the nearest one to the median
# colour under an object's mask names it.
COLOUR_NAMES = {
    "red": (220, 40, 40), "orange": (240, 140, 30), "yellow": (235, 215, 40), "green": (40, 170, 60),
    "blue": (40, 80, 220), "purple": (150, 50, 190), "pink": (240, 130, 180), "brown": (130, 80, 40),
    "black": (20, 20, 20), "white": (240, 240, 240), "grey": (128, 128, 128),
}  # fmt: skip


class ImageTagger:
    """RAM with its per-tag thresholds: PIL images -> tag names."""

    def __init__(self, model: RAMTagger, thresholds: torch.Tensor | float):
        if model.tag_names is None:
            raise ValueError("the RAM tagger needs its tag names")
        self.model = model.eval()
        self.thresholds = thresholds

    @torch.no_grad()
    def tag(self, images: Sequence[Image.Image]) -> list[list[str]]:
        if not images:
            return []
        size = self.model.config.image_size
        pixels = torch.stack([preprocess_image(image, size) for image in images])  # (B, 3, S, S)
        device = next(self.model.parameters()).device
        present = decide_tags(self.model(pixels.to(device)), self.thresholds).cpu()
        return [[n for n, keep in zip(self.model.tag_names, row.tolist()) if keep] for row in present]


def colour_name(image: np.ndarray, mask: np.ndarray) -> str | None:
    """The named colour nearest to the median RGB under `mask` (None for an empty mask)."""
    if not mask.any():
        return None
    median = np.median(image[mask].astype(np.float32), axis=0)
    names = list(COLOUR_NAMES)
    table = np.array([COLOUR_NAMES[n] for n in names], dtype=np.float32)
    return names[int(np.argmin(((table - median) ** 2).sum(axis=1)))]


def build_entities(image: np.ndarray, detections: list[Detection], masks: np.ndarray) -> list[Entity]:
    """Group detections by (tag, colour name) into entities, best score first; ids and colours in that order.

    image (H, W, 3) uint8; masks (N, H, W) bool, one per detection.
    """
    groups: dict[tuple[str, str | None], list[int]] = {}
    for i, detection in enumerate(detections):
        groups.setdefault((detection.label, colour_name(image, masks[i])), []).append(i)
    ordered = sorted(groups.items(), key=lambda kv: -max(detections[i].score for i in kv[1]))
    entities = []
    for entity_id, ((label, colour), members) in enumerate(ordered):
        members = sorted(members, key=lambda i: -detections[i].score)
        entities.append(Entity(
            id=entity_id,
            label=label,
            colour=entity_colour(entity_id),
            boxes=[[round(v, 2) for v in detections[i].box] for i in members],
            masks=[encode_mask(masks[i]) for i in members],
            score=round(max(detections[i].score for i in members), 4),
            attributes=[colour] if colour else [],
        ))  # fmt: skip
    return entities


class GroundingPipeline:
    def __init__(self, tagger: ImageTagger, detector: GroundingDetector, segmenter: SamSegmenter,
                 matcher: RuleMatcher | LLMMatcher | None = None):
        self.tagger = tagger
        self.detector = detector
        self.segmenter = segmenter
        self.matcher = matcher or RuleMatcher()

    def detect_and_segment(self, images: Sequence[Image.Image]) -> list[tuple[list[Detection], np.ndarray]]:
        """Per image, the detections on its own tags and one (H, W) mask per detection: every box and
        mask its entities will hold. The tagger runs on the whole batch; detection and segmentation per image."""
        images = [image.convert("RGB") for image in images]
        results = []
        for image, tags in zip(images, self.tagger.tag(images)):
            detections = self.detector.detect(image, tags)
            results.append((detections, self.segmenter.segment(np.asarray(image), [d.box for d in detections])))
        return results

    def ground_images(self, images: Sequence[Image.Image]) -> list[list[Entity]]:
        """Entities per image (`detect_and_segment`, grouped by `build_entities`)."""
        images = [image.convert("RGB") for image in images]
        return [build_entities(np.asarray(image), detections, masks)
                for image, (detections, masks) in zip(images, self.detect_and_segment(images))]

    def ground_image(self, image: Image.Image) -> list[Entity]:
        return self.ground_images([image])[0]

    def match(self, answer: str, entities: Sequence[Entity]) -> list[AnswerSpan]:
        return self.matcher.match(answer, entities)

    def match_batch(self, answers: Sequence[str], entity_lists: Sequence[Sequence[Entity]]) -> list[list[AnswerSpan]]:
        if isinstance(self.matcher, LLMMatcher):
            return self.matcher.match_batch(answers, entity_lists)  # one batched generation
        return [self.matcher.match(a, e) for a, e in zip(answers, entity_lists)]

    def ground(self, image: Image.Image, answer: str) -> GroundingResult:
        entities = self.ground_image(image)
        return GroundingResult((image.width, image.height), entities, self.match(answer, entities))

    @classmethod
    def load(cls, directory: str | Path, matcher: RuleMatcher | LLMMatcher | None = None,
             device: str | torch.device = "cpu") -> "GroundingPipeline":
        """A folder of tiny-layout weights or of the released checkpoints (`load_grounding`)."""
        return load_grounding(directory, matcher, device)

    @classmethod
    def load_tiny(cls, matcher: RuleMatcher | LLMMatcher | None = None,
                  device: str | torch.device = "cpu") -> "GroundingPipeline":
        """The tiny weights shipped in bubogpt/assets/grounding_tiny."""
        return load_tiny_grounding(TINY_ASSETS, matcher, device)


# ---------------------------------------------------------------------------------------------------
# The tiny assets
# ---------------------------------------------------------------------------------------------------

RAM_FILES = ("ram_tiny.pth", "ram_tags.txt", "ram_tag_thresholds.txt", "ram_config.json")
DETECTOR_DIR = "detector"
DETECTOR_SETTINGS = "detector_settings.json"
SAM_FILES = ("sam_tiny.pth", "sam_config.json")


def save_tiny_grounding(directory: str | Path, tagger: RAMTagger, thresholds: torch.Tensor,
                        detector: TinyGroundingDino, detector_config: DetectorConfig,
                        segmenter: SamSegmenter, sam_config: SamConfig) -> Path:
    """Write the three models in fp16, each in its own format: RAM's original `{"model": {...}}`
    with tag list and thresholds, transformers' directory for the detector, SAM's bare state dict."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ram_state = {original_key(k): v.detach().half().contiguous() for k, v in tagger.state_dict().items()}
    torch.save({"model": ram_state}, directory / RAM_FILES[0])
    (directory / RAM_FILES[1]).write_text("\n".join(tagger.tag_names) + "\n")
    (directory / RAM_FILES[2]).write_text("\n".join(f"{float(t):.4f}" for t in thresholds) + "\n")
    config = tagger.config
    ram_json = {"image_size": config.image_size, "embed_dim": config.embed_dim, "depths": config.depths,
                "num_heads": config.num_heads, "window_size": config.window_size,
                "bert_hidden": config.tag_head_hidden, "bert_heads": config.tag_head_heads,
                "bert_intermediate": config.tag_head_intermediate, "q2l_layers": config.tag_head_layers}  # fmt: skip
    (directory / RAM_FILES[3]).write_text(json.dumps(ram_json, indent=2) + "\n")
    half = TinyGroundingDino(detector.model.half(), detector.tokenizer)
    half.save(directory / DETECTOR_DIR)
    detector.model.float()
    (directory / DETECTOR_SETTINGS).write_text(json.dumps(asdict(detector_config), indent=2) + "\n")
    save_sam(segmenter.sam, directory / SAM_FILES[0], dtype=torch.float16)
    save_sam_config(sam_config, directory / SAM_FILES[1])
    return directory


def load_tiny_grounding(directory: str | Path = TINY_ASSETS, matcher: RuleMatcher | LLMMatcher | None = None,
                        device: str | torch.device = "cpu") -> GroundingPipeline:
    """The pipeline from tiny weights written by `save_tiny_grounding` (fp16 on disk, fp32 in use)."""
    directory = Path(directory)
    if not (directory / RAM_FILES[0]).is_file():
        raise FileNotFoundError(f"no tiny grounding weights in {directory} (expected {RAM_FILES[0]} and more)")
    ram, thresholds, _ = load_ram_tagger(*(directory / name for name in RAM_FILES))
    settings = DetectorConfig(**json.loads((directory / DETECTOR_SETTINGS).read_text()))
    detector = GroundingDetector(TinyGroundingDino.load(directory / DETECTOR_DIR).to(device), settings)
    sam = load_sam(directory / SAM_FILES[0], read_sam_config(directory / SAM_FILES[1])).to(device)
    return GroundingPipeline(ImageTagger(ram.to(device), thresholds), detector, SamSegmenter(sam), matcher)


# The released checkpoints, under the names they are published with.
ORIGINAL_FILES = {
    "ram": "ram_swin_large_14m.pth",
    "ram_tags": "ram_tag_list.txt",
    "ram_thresholds": "ram_tag_list_threshold.txt",
    "grounding_dino": "groundingdino_swint_ogc.pth",
    "bert": "bert-base-uncased",  # a local BERT directory (config, vocab, weights)
    "sam": "sam_vit_h_4b8939.pth",
}


def load_original_grounding(directory: str | Path, matcher: RuleMatcher | LLMMatcher | None = None,
                            device: str | torch.device = "cpu",
                            detector_config: DetectorConfig | None = None) -> GroundingPipeline:
    """The reference's models from a folder holding `ORIGINAL_FILES`: RAM Swin-L, Grounding DINO
    Swin-T OGC (through groundingdino-py, BERT from the local folder) and SAM ViT-H."""
    from bubogpt.grounding.detector import load_original_grounding_dino

    directory = Path(directory)
    missing = [name for name in ORIGINAL_FILES.values() if not (directory / name).exists()]
    if missing:
        raise FileNotFoundError(f"{directory} lacks the released grounding files {missing}")
    files = {key: directory / name for key, name in ORIGINAL_FILES.items()}
    ram, thresholds, _ = load_ram_tagger(files["ram"], files["ram_tags"], files["ram_thresholds"])
    dino = load_original_grounding_dino(files["grounding_dino"], files["bert"]).to(device)
    sam = load_sam(files["sam"]).to(device)
    detector = GroundingDetector(dino, detector_config or DetectorConfig())
    return GroundingPipeline(ImageTagger(ram.to(device), thresholds), detector, SamSegmenter(sam), matcher)


def load_converted_grounding(directory: str | Path, matcher: RuleMatcher | LLMMatcher | None = None,
                             device: str | torch.device = "cpu") -> GroundingPipeline:
    """The pipeline from a folder written by `bubogpt convert-grounding` (bubogpt/convert.py):
    `grounding.json` holds every size and the detector settings; the weights are safetensors."""
    from bubogpt.checkpoints.common import CheckpointMismatchError
    from bubogpt.checkpoints.native import load_weights
    from bubogpt.convert import GROUNDING_FILES, GROUNDING_MANIFEST
    from bubogpt.grounding.detector import OriginalGroundingDino, OriginalGroundingDinoConfig, build_original_grounding_dino
    from bubogpt.grounding.ram import RAMConfig
    from bubogpt.grounding.ram_checkpoint import read_tag_list, read_tag_thresholds
    from bubogpt.grounding.segmenter import SamConfig, build_sam

    directory = Path(directory)
    manifest = json.loads((directory / GROUNDING_MANIFEST).read_text())
    files = {key: directory / name for key, name in GROUNDING_FILES.items()}
    ram_config = RAMConfig(**manifest["ram"])
    tags = read_tag_list(files["ram_tags"], ram_config.num_tags)
    thresholds = read_tag_thresholds(files["ram_thresholds"], ram_config.num_tags)
    ram = RAMTagger(ram_config, tag_names=tags)
    dino_config = OriginalGroundingDinoConfig(**manifest["grounding_dino"])
    dino = build_original_grounding_dino(dino_config, files["bert"])
    sam = build_sam(SamConfig(**manifest["sam"]))
    for key, module in (("ram", ram), ("grounding_dino", dino), ("sam", sam)):
        report = load_weights(module, files[key], source=f"{directory.name}/{files[key].name}")
        if report.unexpected:
            raise CheckpointMismatchError(f"{files[key]}: tensors with no place in the model: {report.unexpected[:10]}")
    detector = GroundingDetector(OriginalGroundingDino(dino.eval(), dino_config).to(device),
                                 DetectorConfig(**manifest["detector"]))  # fmt: skip
    return GroundingPipeline(ImageTagger(ram.eval().to(device), thresholds), detector,
                             SamSegmenter(sam.eval().to(device)), matcher)  # fmt: skip


def load_grounding(directory: str | Path | None = None, matcher: RuleMatcher | LLMMatcher | None = None,
                   device: str | torch.device = "cpu") -> GroundingPipeline:
    """The shipped tiny models (directory None), a folder in the tiny layout, one written by
    `bubogpt convert-grounding` (with grounding.json), or the released files as published."""
    if directory is None:
        return load_tiny_grounding(TINY_ASSETS, matcher, device)
    if (Path(directory) / RAM_FILES[0]).is_file():
        return load_tiny_grounding(directory, matcher, device)
    if (Path(directory) / "grounding.json").is_file():
        return load_converted_grounding(directory, matcher, device)
    return load_original_grounding(directory, matcher, device)
