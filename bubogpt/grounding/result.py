"""What grounding returns: entities, answer spans, and the annotated picture.

An `Entity` is one thing the answer can point at: a tag the detector found, with its boxes and masks
(several when there are several such objects of one colour), its display colour and its score.
An `AnswerSpan` links characters [start, end) of the answer to one entity. Both are dataclasses whose
`to_dict()` is plain JSON: boxes are pixel xyxy of the original image and masks COCO RLE
(`pycocotools`, `counts` as an ASCII string).

The palette has 22 distinct colours (Kelly's colours of maximum contrast without black and white,
then two more), so no colour repeats before the 23rd entity (the reference repeated after 11).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pycocotools import mask as mask_utils

PALETTE = (
    "#F3C300", "#875692", "#F38400", "#A1CAF1", "#BE0032", "#C2B280", "#848482", "#008856",
    "#E68FAC", "#0067A5", "#F99379", "#604E97", "#F6A600", "#B3446C", "#DCD300", "#882D17",
    "#8DB600", "#654522", "#E25822", "#2B3D26", "#1F77B4", "#17BECF",
)  # fmt: skip
MASK_ALPHA = 0.45  # opacity of the mask overlay


def entity_colour(index: int) -> str:
    """The display colour of the index-th entity (0-based): distinct for the first len(PALETTE)."""
    return PALETTE[index % len(PALETTE)]


def hex_to_rgb(colour: str) -> tuple[int, int, int]:
    value = colour.lstrip("#")
    return int(value[0:2], 16), int(value[2:4], 16), int(value[4:6], 16)


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """(H, W) bool -> COCO RLE {"size": [H, W], "counts": str}."""
    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode_mask(rle: dict[str, Any]) -> np.ndarray:
    """COCO RLE (counts as str or bytes) -> (H, W) bool."""
    counts = rle["counts"]
    encoded = {"size": list(rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return mask_utils.decode(encoded).astype(bool)


@dataclass
class Entity:
    id: int
    label: str  # the tag, e.g. "circle"
    colour: str  # display colour "#RRGGBB" of its boxes, masks and answer spans
    boxes: list[list[float]]  # pixel xyxy of the original image, one per object
    masks: list[dict[str, Any]]  # COCO RLE, one per box (same order)
    score: float  # best detection score among its boxes
    attributes: list[str] = field(default_factory=list)  # e.g. the objects' colour name ["red"]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Entity":
        return cls(**data)


@dataclass
class AnswerSpan:
    start: int  # character offsets into the answer, end exclusive
    end: int
    text: str  # answer[start:end]
    entity_id: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AnswerSpan":
        return cls(**data)


@dataclass
class GroundingResult:
    image_size: tuple[int, int]  # (width, height) of the original image
    entities: list[Entity]
    spans: list[AnswerSpan]

    def to_dict(self) -> dict[str, Any]:
        return {
            "image_size": list(self.image_size),
            "entities": [e.to_dict() for e in self.entities],
            "spans": [s.to_dict() for s in self.spans],
        }


# ---------------------------------------------------------------------------------------------------
# The annotated picture
# ---------------------------------------------------------------------------------------------------


def drawing_sizes(width: int, height: int) -> tuple[int, int]:
    """(line width, font size) in pixels, growing with the image so labels stay readable at any size."""
    side = min(width, height)
    return max(1, round(side / 250)), max(10, round(side / 28))


def _text_colour(background: tuple[int, int, int]) -> tuple[int, int, int]:
    luminance = 0.299 * background[0] + 0.587 * background[1] + 0.114 * background[2]
    return (0, 0, 0) if luminance > 140 else (255, 255, 255)


def annotate_image(image: Image.Image, entities: list[Entity]) -> Image.Image:
    """The image with each entity's masks (translucent), boxes and a "label score" tag, in its colour."""
    canvas = np.asarray(image.convert("RGB")).astype(np.float32)
    height, width = canvas.shape[:2]
    for entity in entities:
        rgb = np.array(hex_to_rgb(entity.colour), dtype=np.float32)
        for rle in entity.masks:
            mask = decode_mask(rle)
            if mask.shape != (height, width):
                raise ValueError(f"entity {entity.id}: mask is {mask.shape}, the image is {(height, width)}")
            canvas[mask] = (1 - MASK_ALPHA) * canvas[mask] + MASK_ALPHA * rgb
    annotated = Image.fromarray(np.clip(np.round(canvas), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(annotated)
    line_width, font_size = drawing_sizes(width, height)
    font = ImageFont.load_default(size=font_size)
    for entity in entities:
        rgb = hex_to_rgb(entity.colour)
        for box in entity.boxes:
            x0, y0, x1, y1 = box
            draw.rectangle([x0, y0, x1, y1], outline=rgb, width=line_width)
            text = f"{entity.label} {entity.score:.2f}"
            left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
            text_w, text_h = right - left, bottom - top
            pad = max(1, font_size // 6)
            # Above the box when there is room, else inside its top edge; kept inside the image.
            label_y = y0 - text_h - 2 * pad if y0 - text_h - 2 * pad >= 0 else y0
            label_x = min(max(0, x0), max(0, width - text_w - 2 * pad))
            draw.rectangle([label_x, label_y, label_x + text_w + 2 * pad, label_y + text_h + 2 * pad], fill=rgb)
            draw.text((label_x + pad - left, label_y + pad - top), text, fill=_text_colour(rgb), font=font)
    return annotated
