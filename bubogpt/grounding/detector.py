"""Grounding DINO: boxes for the tags of an image.

Two implementations of the same architecture sit behind one detector:

- `OriginalGroundingDino`: IDEA's own code (`groundingdino-py`), built by its builder from its
  `GroundingDINO_SwinT_OGC.py` config and loading `groundingdino_swint_ogc.pth`. Its text side is
  BERT-base read from a LOCAL directory (never the hub).
- `TinyGroundingDino`: `transformers`' `GroundingDinoForObjectDetection` with a small Swin and a small
  BERT (`tiny_grounding_dino_config`). groundingdino-py only builds fixed Swin-T/B/L backbones;
  transformers' takes any Swin and carries the training loss (Hungarian matching + L1 + GIoU + token
  alignment), so the tiny preset trained on the synthetic scenes uses it.

`GroundingDetector.detect(image, tags)`:

    image (W x H) --resize: shorter side `resize_short`, longer <= `resize_max`; ImageNet norm--> (1, 3, h, w)
    tags --chunks whose caption "tag . tag . ... ." fits `max_text_len` tokens (with [CLS]/[SEP])-->
    per chunk: model -> token logits (Q, T), boxes (Q, 4) cxcywh in [0, 1] of the image
      -> keep a query when its best token probability > box_threshold; its phrase is the tag whose
         tokens score best, kept when that score > text_threshold
    all chunks -> class-aware NMS (torchvision batched_nms) -> boxes in pixel xyxy of the ORIGINAL image

Normalised boxes are relative to the whole (resized) image and the resize keeps the aspect ratio, so
scaling by the original (W, H) is exact. The reference sent all tags in one caption (silently cut at
256 tokens) and applied no NMS.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torchvision.ops import batched_nms, box_convert
from torchvision.transforms import functional as TF
from transformers import BertConfig, BertTokenizer, GroundingDinoConfig, GroundingDinoForObjectDetection, SwinConfig

from bubogpt.checkpoints.common import CheckpointMismatchError, assign_state_dict, load_torch_file

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# transformers' Grounding DINO splits a caption into phrases at these BERT-base ids (and at [PAD] 0);
# groundingdino-py looks the same tokens up by name. A tiny vocabulary must keep them in place.
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID, PERIOD_ID, QUESTION_ID = 0, 100, 101, 102, 103, 1012, 1029


class DetectorInputError(ValueError):
    """A detector input it cannot use: a bad tag, image or threshold."""


@dataclass
class Detection:
    label: str  # the tag whose tokens the box was found for
    box: tuple[float, float, float, float]  # pixel xyxy in the original image
    score: float  # the probability of its phrase's best token
    box_score: float = 0.0  # the best token probability over the whole caption (what box_threshold tests)


@dataclass
class DetectorConfig:
    """How the detector is run. Defaults are the reference's (Swin-T OGC at 800 px)."""

    box_threshold: float = 0.25
    text_threshold: float = 0.2
    nms_iou: float = 0.5  # class-aware: boxes of different tags never suppress each other
    resize_short: int = 800
    resize_max: int = 1333

    def __post_init__(self) -> None:
        for name in ("box_threshold", "text_threshold", "nms_iou"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise DetectorInputError(f"{name} must be in [0, 1], got {value}")
        if not 0 < self.resize_short <= self.resize_max:
            raise DetectorInputError(
                f"need 0 < resize_short <= resize_max, got {self.resize_short} and {self.resize_max}"
            )


# ---------------------------------------------------------------------------------------------------
# Image and caption preparation
# ---------------------------------------------------------------------------------------------------


def resized_size(width: int, height: int, short: int, longest: int) -> tuple[int, int]:
    """(new_height, new_width): shorter side `short` unless the longer would pass `longest`.

    The same arithmetic as groundingdino-py's `RandomResize([800], max_size=1333)`, except that no
    side becomes 0: for an extreme aspect ratio (4000 x 8) that arithmetic rounds the shorter side to
    0 pixels, which PIL refuses; here it stays at least 1.
    """
    min_side, max_side = float(min(width, height)), float(max(width, height))
    if max_side / min_side * short > longest:
        short = max(1, int(round(longest * min_side / max_side)))
    if (width <= height and width == short) or (height <= width and height == short):
        return height, width
    if width < height:
        return max(1, int(short * height / width)), short
    return short, max(1, int(short * width / height))


def detector_transform(image: Image.Image, short: int, longest: int) -> torch.Tensor:
    """PIL image -> (3, h, w) float32, resized as `resized_size` says (bilinear), ImageNet-normalised."""
    image = image.convert("RGB")
    size = resized_size(image.width, image.height, short, longest)
    pixels = TF.to_tensor(TF.resize(image, list(size)))
    return TF.normalize(pixels, IMAGENET_MEAN, IMAGENET_STD)


def clean_tag(tag: str) -> str:
    """Lower-case, single spaces; "." and "?" removed because they end a phrase in a caption."""
    text = " ".join(tag.replace(".", " ").replace("?", " ").lower().split())
    if not text:
        raise DetectorInputError(f"tag {tag!r} is empty once '.' and '?' are removed")
    return text


@dataclass
class CaptionChunk:
    caption: str  # "circle . red star ."
    tags: list[str]  # the original tags, in caption order
    spans: list[tuple[int, int]]  # token index range [start, end) of each tag in the tokenised caption


def chunk_tags(tags: list[str], tokenizer, max_text_len: int) -> list[CaptionChunk]:
    """Split tags into captions of at most `max_text_len` tokens ([CLS] + "tag ." ... + [SEP]).

    BERT's basic tokenizer splits at punctuation and spaces, so a tag's tokens inside the caption are
    exactly its tokens alone: the spans are counted, not searched for.
    """
    chunks: list[CaptionChunk] = []
    current: CaptionChunk | None = None
    used = 0
    for tag in dict.fromkeys(tags):  # drop repeats, keep order
        text = clean_tag(tag)
        n_tokens = len(tokenizer.tokenize(text))
        if n_tokens + 3 > max_text_len:
            raise DetectorInputError(f"tag {tag!r} alone needs {n_tokens} tokens; the limit is {max_text_len}")
        if current is None or used + n_tokens + 1 + 1 > max_text_len:  # + "." + [SEP]
            current = CaptionChunk("", [], [])
            chunks.append(current)
            used = 1  # [CLS]
        current.caption += f"{text} . "
        current.tags.append(tag)
        current.spans.append((used, used + n_tokens))
        used += n_tokens + 1
    for chunk in chunks:
        chunk.caption = chunk.caption.strip()
    return chunks


# ---------------------------------------------------------------------------------------------------
# From token logits to detections
# ---------------------------------------------------------------------------------------------------


def select_detections(
    token_logits: torch.Tensor,
    boxes: torch.Tensor,
    chunk: CaptionChunk,
    num_text_tokens: int,
    image_size: tuple[int, int],
    box_threshold: float,
    text_threshold: float,
) -> list[Detection]:
    """One caption's queries -> detections.

    token_logits (Q, >= T) over the caption's T = num_text_tokens tokens (later positions are padding);
    boxes (Q, 4) cxcywh normalised to the image; image_size (width, height) of the original image.
    A query is kept when its best probability over the caption's tokens passes box_threshold (the
    reference's rule) and the best of its phrase scores (max over each tag's tokens) passes
    text_threshold; that tag is its label.
    """
    probs = token_logits[:, :num_text_tokens].float().sigmoid()  # (Q, T)
    box_scores = probs.max(dim=1).values  # (Q,)
    phrase_scores = torch.stack([probs[:, s:e].max(dim=1).values for s, e in chunk.spans], dim=1)  # (Q, P)
    best_score, best_phrase = phrase_scores.max(dim=1)
    keep = (box_scores > box_threshold) & (best_score > text_threshold)
    width, height = image_size
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    xyxy = box_convert(boxes.float(), "cxcywh", "xyxy") * scale
    xyxy[:, 0::2] = xyxy[:, 0::2].clamp(0, width)
    xyxy[:, 1::2] = xyxy[:, 1::2].clamp(0, height)
    return [
        Detection(chunk.tags[int(best_phrase[q])], tuple(float(v) for v in xyxy[q]), float(best_score[q]),
                  float(box_scores[q]))
        for q in torch.nonzero(keep).flatten().tolist()
    ]


def class_aware_nms(detections: list[Detection], iou_threshold: float) -> list[Detection]:
    """Suppress overlapping boxes of the same label only; survivors by descending score."""
    if not detections:
        return []
    labels = sorted({d.label for d in detections})
    boxes = torch.tensor([d.box for d in detections], dtype=torch.float32)
    scores = torch.tensor([d.score for d in detections], dtype=torch.float32)
    idxs = torch.tensor([labels.index(d.label) for d in detections])
    keep = batched_nms(boxes, scores, idxs, iou_threshold)  # already sorted by score
    return [detections[i] for i in keep.tolist()]


# ---------------------------------------------------------------------------------------------------
# The two models: same call, (images, captions) -> (token logits, boxes)
# ---------------------------------------------------------------------------------------------------


class TinyGroundingDino(nn.Module):
    """transformers' Grounding DINO at a small size, with its tokenizer (a local BERT vocabulary)."""

    def __init__(self, model: GroundingDinoForObjectDetection, tokenizer: BertTokenizer):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.max_text_len = model.config.max_text_len

    def tokenize(self, captions: list[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(captions, padding="longest", return_tensors="pt")

    def forward(self, pixel_values: torch.Tensor, captions: list[str], pixel_mask: torch.Tensor | None = None,
                labels: list[dict] | None = None):
        """pixel_values (B, 3, h, w), one caption per image; pixel_mask (B, h, w), 1 = real pixel.

        Returns transformers' output: logits (B, Q, max_text_len), pred_boxes (B, Q, 4) cxcywh
        normalised to each image's real (unpadded) area, and the loss when `labels` are given
        ([{"class_labels": (n,) phrase index, "boxes": (n, 4) cxcywh normalised}] per image).
        """
        text = self.tokenize(captions).to(pixel_values.device)
        return self.model(
            pixel_values=pixel_values,
            input_ids=text["input_ids"],
            token_type_ids=text["token_type_ids"],
            attention_mask=text["attention_mask"],
            pixel_mask=pixel_mask,
            labels=labels,
        )

    def predict(self, pixel_values: torch.Tensor, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        out = self(pixel_values, captions)
        return out.logits, out.pred_boxes

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.model.save_pretrained(directory, safe_serialization=True)
        self.tokenizer.save_pretrained(directory)

    @classmethod
    def load(cls, directory: str | Path) -> "TinyGroundingDino":
        directory = Path(directory)
        if not (directory / "config.json").is_file() or not (directory / "vocab.txt").is_file():
            raise FileNotFoundError(f"{directory} is not a tiny Grounding DINO directory (config.json, vocab.txt)")
        model = GroundingDinoForObjectDetection.from_pretrained(directory, local_files_only=True)
        tokenizer = BertTokenizer.from_pretrained(directory, local_files_only=True)
        return cls(model.float().eval(), tokenizer)


def write_detector_vocab(path: str | Path, words: list[str]) -> Path:
    """A BERT vocabulary file with the BERT-base ids of [PAD] [UNK] [CLS] [SEP] [MASK] "." "?" kept,
    `words` as whole tokens, then letters and digits (and their ## forms) so that any tag tokenises."""
    fixed = {PAD_ID: "[PAD]", UNK_ID: "[UNK]", CLS_ID: "[CLS]", SEP_ID: "[SEP]", MASK_ID: "[MASK]",
             PERIOD_ID: ".", QUESTION_ID: "?"}  # fmt: skip
    characters = list("abcdefghijklmnopqrstuvwxyz0123456789")
    pieces = [w.lower() for w in dict.fromkeys(words)] + characters + [f"##{c}" for c in characters]
    pieces = [p for p in dict.fromkeys(pieces) if p not in fixed.values()]
    size = max(QUESTION_ID + 1, len(pieces) + len(fixed))
    vocab, free = [], iter(pieces)
    for index in range(size):
        vocab.append(fixed.get(index) or next(free, f"[unused{index}]"))
    path = Path(path)
    path.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return path


def tiny_grounding_dino_config(vocab_size: int) -> GroundingDinoConfig:
    """The tiny preset: Swin 32 wide (depths 1-1-2-1), d_model 64, 2 encoder / 3 decoder layers,
    10 queries, a one-layer 64-wide BERT; ~2M parameters."""
    swin = SwinConfig(
        image_size=224, patch_size=4, embed_dim=32, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8],
        window_size=7, out_indices=[2, 3, 4],
    )  # fmt: skip
    bert = BertConfig(
        vocab_size=vocab_size, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=128, max_position_embeddings=256, pad_token_id=PAD_ID,
    )  # fmt: skip
    return GroundingDinoConfig(
        backbone_config=swin, text_config=bert, num_queries=10, d_model=64,
        encoder_layers=2, decoder_layers=3, encoder_ffn_dim=128, decoder_ffn_dim=128,
        encoder_attention_heads=4, decoder_attention_heads=4, num_feature_levels=4,
        max_text_len=256, auxiliary_loss=True, disable_custom_kernels=True,
        dropout=0.0, fusion_droppath=0.0,
    )  # fmt: skip


def build_tiny_grounding_dino(vocab_dir: str | Path, words: list[str]) -> TinyGroundingDino:
    """A randomly initialised tiny Grounding DINO whose vocabulary holds `words` as whole tokens."""
    vocab_dir = Path(vocab_dir)
    vocab_dir.mkdir(parents=True, exist_ok=True)
    write_detector_vocab(vocab_dir / "vocab.txt", words)
    tokenizer = BertTokenizer(str(vocab_dir / "vocab.txt"), do_lower_case=True)
    model = GroundingDinoForObjectDetection(tiny_grounding_dino_config(len(tokenizer)))
    return TinyGroundingDino(model, tokenizer)


# groundingdino-py: the original implementation -----------------------------------------------------


@dataclass
class OriginalGroundingDinoConfig:
    """Fields of groundingdino-py's `GroundingDINO_SwinT_OGC.py` that set sizes; defaults = that file.

    Everything else comes from the package's own config file. `backbone` must be one of the Swin
    names groundingdino-py builds (swin_T_224_1k, swin_B_224_22k, swin_B_384_22k, ...).
    """

    backbone: str = "swin_T_224_1k"
    hidden_dim: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    num_queries: int = 900


# Keys of the released checkpoint the built model has no place for, with the reason.
ORIGINAL_IGNORED_KEYS = {
    "label_enc.weight": "denoising label book, used only in training",
    "bert.embeddings.position_ids": "a buffer that current transformers rebuild",
}


def _original_args(config: OriginalGroundingDinoConfig, bert_dir: Path):
    from groundingdino.util.slconfig import SLConfig

    import groundingdino

    config_file = Path(groundingdino.__file__).parent / "config" / "GroundingDINO_SwinT_OGC.py"
    args = SLConfig.fromfile(str(config_file))
    for name, value in vars(config).items():
        setattr(args, name, value)
    args.text_encoder_type = str(bert_dir)  # a local folder: AutoTokenizer/BertModel never go online
    args.use_checkpoint = False  # activation checkpointing only matters for training memory
    args.use_transformer_ckpt = False
    args.device = "cpu"
    return args


def check_bert_dir(bert_dir: str | Path) -> Path:
    bert_dir = Path(bert_dir)
    needed = ["config.json", "vocab.txt"]
    missing = [name for name in needed if not (bert_dir / name).is_file()]
    has_weights = any((bert_dir / name).is_file() for name in ("model.safetensors", "pytorch_model.bin"))
    if missing or not has_weights:
        raise FileNotFoundError(
            f"{bert_dir} is not a local BERT directory: missing {missing + ([] if has_weights else ['model weights'])} "
            "(save bert-base-uncased there with save_pretrained; it is never downloaded)"
        )
    return bert_dir


def build_original_grounding_dino(config: OriginalGroundingDinoConfig, bert_dir: str | Path) -> nn.Module:
    """groundingdino-py's model from its own builder (random weights apart from the BERT directory's)."""
    from groundingdino.models import build_model

    bert_dir = check_bert_dir(bert_dir)
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"  # belt and braces: the builder calls from_pretrained
    try:
        return build_model(_original_args(config, bert_dir))
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE")
        else:
            os.environ["HF_HUB_OFFLINE"] = old


def convert_original_state_dict(checkpoint: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """`groundingdino_swint_ogc.pth`'s `model` dict -> (model state dict, ignored keys).

    The release was saved from DDP, so keys carry a `module.` prefix, which is dropped.
    """
    state, ignored = {}, []
    for key, tensor in checkpoint.items():
        name = key.removeprefix("module.")
        if name in ORIGINAL_IGNORED_KEYS:
            ignored.append(name)
        else:
            state[name] = tensor
    return state, ignored


# groundingdino-py's Swin names by (stage-0 width, window): what `backbone` must be for these shapes.
SWIN_BACKBONES = {
    (96, 7): "swin_T_224_1k", (128, 7): "swin_B_224_22k", (128, 12): "swin_B_384_22k",
    (192, 7): "swin_L_224_22k", (192, 12): "swin_L_384_22k",
}  # fmt: skip
DEFORMABLE_POINTS = 4  # enc_n_points / dec_n_points of GroundingDINO_SwinT_OGC.py


def infer_grounding_dino_config(state: dict[str, torch.Tensor]) -> OriginalGroundingDinoConfig:
    """The sizes of a Grounding DINO state dict (`convert_original_state_dict` names) from its
    shapes: backbone (Swin width and window), hidden width, encoder/decoder depth, feed-forward
    width, query count, and the head count (the deformable attention's weights are heads x levels x
    points wide)."""

    def tensor(key: str) -> torch.Tensor:
        if key not in state:
            raise CheckpointMismatchError(f"checkpoint lacks {key}: not a Grounding DINO state dict?")
        return state[key]

    def count(template: str) -> int:
        n = 0
        while template.format(n) in state:
            n += 1
        return n

    swin_width = tensor("backbone.0.patch_embed.proj.weight").shape[0]
    window = (math.isqrt(tensor("backbone.0.layers.0.blocks.0.attn.relative_position_bias_table").shape[0]) + 1) // 2
    if (swin_width, window) not in SWIN_BACKBONES:
        raise CheckpointMismatchError(
            f"a Swin backbone of width {swin_width} and window {window} is none groundingdino-py builds "
            f"({sorted(SWIN_BACKBONES)})"
        )
    levels, hidden = tensor("transformer.level_embed").shape
    weights = tensor("transformer.encoder.layers.0.self_attn.attention_weights.weight").shape[0]
    return OriginalGroundingDinoConfig(
        backbone=SWIN_BACKBONES[(swin_width, window)],
        hidden_dim=hidden,
        nheads=weights // (levels * DEFORMABLE_POINTS),
        enc_layers=count("transformer.encoder.layers.{}.linear1.weight"),
        dec_layers=count("transformer.decoder.layers.{}.linear1.weight"),
        dim_feedforward=tensor("transformer.encoder.layers.0.linear1.weight").shape[0],
        num_queries=tensor("transformer.tgt_embed.weight").shape[0],
    )


class OriginalGroundingDino(nn.Module):
    """groundingdino-py's GroundingDINO with the same `predict` call as `TinyGroundingDino`."""

    def __init__(self, model: nn.Module, config: OriginalGroundingDinoConfig | None = None):
        super().__init__()
        self.model = model
        self.config = config  # the sizes it was built with
        self.tokenizer = model.tokenizer
        self.max_text_len = model.max_text_len

    def predict(self, pixel_values: torch.Tensor, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, h, w) equal-sized images -> logits (B, Q, 256), boxes (B, Q, 4) cxcywh normalised."""
        out = self.model(pixel_values, captions=captions)
        return out["pred_logits"], out["pred_boxes"]


def load_original_grounding_dino(
    checkpoint_path: str | Path,
    bert_dir: str | Path,
    config: OriginalGroundingDinoConfig | None = None,
) -> OriginalGroundingDino:
    """Build groundingdino-py's model (sizes from the file's shapes unless `config` is given) and
    load `groundingdino_swint_ogc.pth` (`{"model": {...}}`) strictly: every model tensor must come from the file, and every file key is used or ignored by
    name (`ORIGINAL_IGNORED_KEYS`); a shape mismatch names the key and both shapes."""
    checkpoint = load_torch_file(checkpoint_path)
    state, ignored = convert_original_state_dict(checkpoint)
    config = config or infer_grounding_dino_config(state)
    model = build_original_grounding_dino(config, bert_dir)
    report = assign_state_dict(model, state, f"Grounding DINO ({Path(checkpoint_path).name})", ignored=ignored)
    if report.unexpected:
        raise CheckpointMismatchError(
            f"{checkpoint_path}: keys this Grounding DINO config has no place for: {report.unexpected[:10]}"
        )
    return OriginalGroundingDino(model.eval(), config)


# ---------------------------------------------------------------------------------------------------
# The detector
# ---------------------------------------------------------------------------------------------------


class GroundingDetector:
    """Tags -> boxes with either Grounding DINO (`model.predict(pixel_values, captions)`)."""

    def __init__(self, model: TinyGroundingDino | OriginalGroundingDino, config: DetectorConfig | None = None):
        self.model = model.eval()
        self.config = copy.copy(config) if config is not None else DetectorConfig()

    @torch.no_grad()
    def detect(self, image: Image.Image, tags: list[str]) -> list[Detection]:
        """Boxes for `tags` in `image`, in pixel xyxy of `image`, best first."""
        if not isinstance(image, Image.Image):
            raise DetectorInputError(f"image must be a PIL image, got {type(image).__name__}")
        if image.width < 1 or image.height < 1:
            raise DetectorInputError(f"image has zero size ({image.width}x{image.height})")
        if not tags:
            return []
        config = self.config
        tokenizer = self.model.tokenizer
        chunks = chunk_tags(tags, tokenizer, self.model.max_text_len)
        device = next(self.model.parameters()).device
        pixel_values = detector_transform(image, config.resize_short, config.resize_max)[None].to(device)
        detections: list[Detection] = []
        # All chunks of one image in one batch: same image size, so nothing is padded.
        captions = [c.caption for c in chunks]
        logits, boxes = self.model.predict(pixel_values.expand(len(chunks), -1, -1, -1), captions)
        logits, boxes = logits.float().cpu(), boxes.float().cpu()
        for i, chunk in enumerate(chunks):
            num_tokens = len(tokenizer(chunk.caption)["input_ids"])
            detections += select_detections(
                logits[i], boxes[i], chunk, num_tokens, (image.width, image.height),
                config.box_threshold, config.text_threshold,
            )  # fmt: skip
        return class_aware_nms(detections, config.nms_iou)
