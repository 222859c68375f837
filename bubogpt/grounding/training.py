"""Training the tiny grounding models on synthetic scenes: batches, losses, loops (no Ray here).

    segmenter  tiny SAM, box prompts (jittered true boxes), BCE + Dice on the    (`train_segmenter`)
               mask logits at the original size, MSE of the IoU head
    detector   tiny Grounding DINO, captions of the present kinds plus random    (`train_detector`)
               absent ones; transformers' set loss (Hungarian matching, L1 +
               GIoU on boxes, focal token alignment, on every decoder layer and
               the encoder proposals), with its batch-offset bug fixed
    tagger     RAM tiny, multi-label BCE on the scene's kinds, plus a dense      (`train_tagger`)
               training-only probe loss; its Swin starts from the detector's

Each loop: AdamW, linear warm-up then cosine decay, gradient clipping, horizontal flips; `log(phase,
step, metrics)` every `log_every` steps. Scenes are drawn on the fly (`scenes.draw_scene`), each from
its own seeded generator, so worker processes can draw them without changing what is drawn, and
each phase seeds itself, so phases give the same models run in a row or as separate processes.

`train_tiny_grounding` runs the recipe (`GroundingTrainingConfig`, whose defaults are the shipped
weights' recipe), calibrates the per-tag thresholds and the detector's box threshold on calibration
scenes, writes the assets (`pipeline.save_tiny_grounding`) and scores them on validation scenes.
`workflows/train_grounding.py` runs it under Ray Train; `python -m bubogpt.grounding.training` runs
it directly, whole or one phase at a time (`--phase`).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers.loss.loss_for_object_detection import _set_aux_loss
from transformers.loss.loss_grounding_dino import GroundingDinoHungarianMatcher, GroundingDinoImageLoss
from transformers.models.grounding_dino.modeling_grounding_dino import build_label_maps, build_text_mask

from bubogpt.grounding import evaluate
from bubogpt.grounding.detector import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DetectorConfig,
    GroundingDetector,
    TinyGroundingDino,
    build_tiny_grounding_dino,
    clean_tag,
    resized_size,
)
from bubogpt.grounding.ram import RAMTagger, preprocess_image, ram_tiny
from bubogpt.grounding.scenes import TAGS, GroundingScene, draw_scenes, draw_scenes_parallel
from bubogpt.grounding.segmenter import SamSegmenter, build_sam, sam_box_prompts, sam_input, sam_tiny
from bubogpt.training.optim import adamw, decay_groups, warmup_cosine

LogFn = Callable[[str, int, dict[str, float]], None]

# Scene streams: disjoint by construction (each name seeds its own generators).
TRAIN_STREAM, CALIBRATION_STREAM, VALIDATION_STREAM = "train", "calibration", "validation"
# The tests score the shipped weights on this stream, which no training step or calibration sees.
HELD_OUT_STREAM = "held_out"


@dataclass
class LoopConfig:
    steps: int
    batch_size: int
    lr: float
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    log_every: int = 50
    time_budget_s: float | None = None  # shorten the loop to fit this wall time (see _Budget)


def lr_factor(step: int, config: LoopConfig) -> float:
    """Linear warm-up from 0 over `warmup_steps` (1/warmup_steps at step 0), then cosine decay to
    `min_lr_ratio` (the shared schedule of `bubogpt.training.optim`)."""
    return warmup_cosine(step, 1.0, config.min_lr_ratio, config.warmup_steps, config.steps, warmup_offset=1)


def make_optimizer(groups: list[tuple[list[nn.Parameter], float]], config: LoopConfig) -> torch.optim.AdamW:
    """AdamW over (parameters, lr multiplier) groups; weight decay on >= 2-D weights only."""
    param_groups = []
    for params, multiplier in groups:
        lr = config.lr * multiplier
        param_groups += decay_groups(params, config.weight_decay, lr=lr, base_lr=lr)
    return adamw(param_groups)


def _step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, params: list, step: int, config: LoopConfig) -> float:
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * lr_factor(step, config)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
    optimizer.step()
    return float(norm)


def _take(scenes: Iterator[GroundingScene], n: int) -> list[GroundingScene]:
    return [next(scenes) for _ in range(n)]


def flip(scene: GroundingScene) -> GroundingScene:
    """Mirror left-right: image, boxes and masks."""
    width = scene.image.width
    objects = [type(o)(o.kind, o.colour, (width - o.box[2], o.box[1], width - o.box[0], o.box[3]), o.mask[:, ::-1].copy())
               for o in scene.objects]  # fmt: skip
    return GroundingScene(scene.image_id, scene.image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), objects)


def _augmented(scenes: Iterator[GroundingScene], n: int, rng: np.random.Generator) -> list[GroundingScene]:
    return [flip(s) if rng.random() < 0.5 else s for s in _take(scenes, n)]


class _Budget:
    """Shortens a loop to fit `seconds` of wall time: the step time is measured over steps 10-50
    (after the first kernels are built) and, if `config.steps` would not fit, the loop is cut to what
    fits. This happens inside the warm-up, so the cosine decay still runs its whole course."""

    MEASURE_FROM, MEASURE_TO = 10, 50

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.mark = 0.0

    def check(self, step: int, config: LoopConfig, log: LogFn | None, phase: str) -> LoopConfig:
        if not self.seconds:
            return config
        if step == self.MEASURE_FROM:
            self.mark = time.time()
        if step == self.MEASURE_TO:
            per_step = (time.time() - self.mark) / (self.MEASURE_TO - self.MEASURE_FROM)
            fitting = int(self.seconds / per_step)
            if fitting < config.steps:
                config = replace(config, steps=max(fitting, config.warmup_steps + 1, self.MEASURE_TO + 1))
                if log:
                    log(phase, step, {"shortened_to_steps": float(config.steps), "seconds_per_step": per_step})
        return config


def _should_log(step: int, config: LoopConfig) -> bool:
    return step % config.log_every == 0 or step == config.steps - 1


# ---------------------------------------------------------------------------------------------------
# Tagger
# ---------------------------------------------------------------------------------------------------


def tagger_batch(scenes: list[GroundingScene], image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, S, S) normalised images and (B, num_tags) multi-hot targets over `TAGS`."""
    pixels = torch.stack([preprocess_image(s.image, image_size) for s in scenes])
    targets = torch.tensor([[float(t in s.tags) for t in TAGS] for s in scenes])
    return pixels, targets


def tag_grid_targets(scenes: list[GroundingScene], grid: int) -> torch.Tensor:
    """(B, grid * grid, num_tags): 1 where an object of the tag covers part of the cell. The tagger
    squeezes the whole image into its square input, so cells are the image's grid x grid blocks."""
    targets = torch.zeros(len(scenes), len(TAGS), grid, grid)
    for i, scene in enumerate(scenes):
        for obj in scene.objects:
            mask = torch.from_numpy(obj.mask).float()[None, None]
            targets[i, TAGS.index(obj.kind)] = torch.maximum(
                targets[i, TAGS.index(obj.kind)], F.adaptive_max_pool2d(mask, grid)[0, 0])
    return targets.flatten(2).transpose(1, 2)


def init_tagger_for_scratch_training(model: RAMTagger) -> None:
    """Starting values for learning the tagging head from scratch (the release starts from CLIP tag
    embeddings and a pretrained Swin). With RAMTagger's N(0, 0.02) everywhere, the label queries are
    all alike and query x key products are ~1e-3, so attention stays uniform and the head learns
    nothing for hundreds of steps. Label embeddings N(0, 0.1) and query/key weights N(0, 0.3) give
    distinct queries and attention logits of order 1."""
    nn.init.normal_(model.label_embed, std=0.1)
    for layer in model.tagging_head:
        nn.init.normal_(layer.query.weight, std=0.3)
        nn.init.normal_(layer.key.weight, std=0.3)


def swin_from_detector(detector: TinyGroundingDino, tagger: RAMTagger) -> None:
    """Copy the detector's trained Swin (transformers' names) into the tagger's Swin (the Microsoft
    names RAM uses). The tiny presets have the same widths, depths and heads; only the window
    differs (7 vs 4), so each relative-position table is resized bicubically, as Swin does when
    its window changes. The detector learnt its backbone from dense box supervision: the tagger
    starts from features that already tell the kinds apart."""
    source = detector.model.model.backbone.conv_encoder.model.state_dict()
    target = tagger.vision_encoder.state_dict()
    state = {
        "patch_embed.proj.weight": source["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": source["embeddings.patch_embeddings.projection.bias"],
        "patch_embed.norm.weight": source["embeddings.norm.weight"],
        "patch_embed.norm.bias": source["embeddings.norm.bias"],
        "norm.weight": source[f"hidden_states_norms.stage{len(tagger.config.depths)}.weight"],
        "norm.bias": source[f"hidden_states_norms.stage{len(tagger.config.depths)}.bias"],
    }
    names = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.output.dense",
             "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}  # fmt: skip
    for key in target:
        parts = key.split(".")
        if parts[0] != "layers":
            continue
        stage = parts[1]
        if parts[2] == "downsample":
            state[key] = source[f"encoder.layers.{stage}.downsample.{'.'.join(parts[3:])}"]
            continue
        block = f"encoder.layers.{stage}.blocks.{parts[3]}"
        inner, kind = ".".join(parts[4:-1]), parts[-1]
        if inner == "attn.qkv":
            state[key] = torch.cat([source[f"{block}.attention.self.{n}.{kind}"] for n in ("query", "key", "value")])
        elif inner == "attn" and kind == "relative_position_bias_table":
            table = source[f"{block}.attention.self.relative_position_bias_table"]  # ((2w-1)², heads)
            side, new_side = math.isqrt(table.shape[0]), math.isqrt(target[key].shape[0])
            grid = table.T.reshape(1, -1, side, side)
            state[key] = F.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=False).reshape(-1, new_side * new_side).T
        else:
            state[key] = source[f"{block}.{names[inner]}.{kind}"]
    tagger.vision_encoder.load_state_dict(state, strict=True)


def train_tagger(model: RAMTagger, scenes: Iterator[GroundingScene], config: LoopConfig,
                 rng: np.random.Generator, log: LogFn | None = None, grid_loss_weight: float = 1.0,
                 backbone_lr_ratio: float = 1.0) -> int:
    """Multi-label BCE on the tag logits, plus (training only) BCE of a linear probe on the last Swin
    stage's tokens against which tags each grid cell holds: dense supervision for the Swin, far
    richer than a few image-level bits. The Swin learns at `backbone_lr_ratio` of the rate (lower
    when it starts from the detector's). Returns the number of steps run."""
    model.train()
    device = next(model.parameters()).device
    config_ram = model.config
    grid = config_ram.image_size // config_ram.patch_size // 2 ** (len(config_ram.depths) - 1)
    probe = nn.Linear(config_ram.vision_width, len(TAGS)).to(device)  # thrown away after training
    tokens: dict[str, torch.Tensor] = {}
    hook = model.vision_encoder.register_forward_hook(lambda module, args, out: tokens.__setitem__("last", out))
    backbone = list(model.vision_encoder.parameters())
    rest = [p for n, p in model.named_parameters() if not n.startswith("vision_encoder.")] + list(probe.parameters())
    params = backbone + rest
    optimizer = make_optimizer([(backbone, backbone_lr_ratio), (rest, 1.0)], config)
    started, budget, step = time.time(), _Budget(config.time_budget_s), 0
    try:
        while step < config.steps:
            config = budget.check(step, config, log, "tagger")
            scenes_batch = _augmented(scenes, config.batch_size, rng)
            pixels, targets = tagger_batch(scenes_batch, config_ram.image_size)
            tag_loss = F.binary_cross_entropy_with_logits(model(pixels.to(device)), targets.to(device))
            grid_loss = F.binary_cross_entropy_with_logits(probe(tokens["last"]), tag_grid_targets(scenes_batch, grid).to(device))
            loss = tag_loss + grid_loss_weight * grid_loss
            norm = _step(optimizer, loss, params, step, config)
            if log and _should_log(step, config):
                log("tagger", step, {"loss": tag_loss.item(), "grid_loss": grid_loss.item(), "grad_norm": norm,
                                     "seconds": time.time() - started})  # fmt: skip
            step += 1
    finally:
        hook.remove()
    model.eval()
    return config.steps


# ---------------------------------------------------------------------------------------------------
# Segmenter
# ---------------------------------------------------------------------------------------------------


def dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1 - Dice coefficient per mask, averaged; logits and targets (N, ...) of the same shape."""
    probs = logits.sigmoid().flatten(1)
    targets = targets.flatten(1)
    numerator = 2 * (probs * targets).sum(1) + 1.0
    denominator = probs.sum(1) + targets.sum(1) + 1.0
    return (1 - numerator / denominator).mean()


def jitter_boxes(boxes: np.ndarray, rng: np.random.Generator, width: int, height: int, amount: float = 0.1) -> np.ndarray:
    """Move each side by up to `amount` of the box's size: the detector's boxes are not exact."""
    sizes = np.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]] * 2, axis=1)
    jittered = boxes + rng.uniform(-amount, amount, size=boxes.shape) * sizes
    jittered[:, 0::2] = jittered[:, 0::2].clip(0, width)
    jittered[:, 1::2] = jittered[:, 1::2].clip(0, height)
    return jittered


def segmenter_loss(segmenter: SamSegmenter, scenes: list[GroundingScene], rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """BCE + Dice between the mask logits (at each original size) and the true masks, and MSE between
    the predicted IoU and the real IoU of each predicted mask; means over images."""
    sam = segmenter.sam
    images = [np.asarray(s.image) for s in scenes]
    embeddings = sam.image_encoder(torch.cat([sam_input(sam, image) for image in images]))  # (B, C, g, g)
    bce, dice, iou_pred_all, iou_all = [], [], [], []
    for embedding, image, scene in zip(embeddings, images, scenes):
        height, width = image.shape[:2]
        boxes = jitter_boxes(np.array([o.box for o in scene.objects], dtype=np.float32), rng, width, height)
        sparse, dense = sam.prompt_encoder(points=None, boxes=sam_box_prompts(sam, boxes, (height, width)), masks=None)
        low_res, iou_pred = sam.mask_decoder(
            image_embeddings=embedding[None],
            image_pe=sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )  # (N, 1, 4g, 4g), (N, 1)
        logits = sam.postprocess_masks(low_res, segmenter.input_size(height, width), (height, width))[:, 0]
        targets = torch.from_numpy(np.stack([o.mask for o in scene.objects])).to(logits.device, torch.float32)
        bce.append(F.binary_cross_entropy_with_logits(logits, targets))
        dice.append(dice_loss(logits, targets))
        with torch.no_grad():
            predicted, truth = (logits > 0).flatten(1), (targets > 0).flatten(1)
            iou_all.append((predicted & truth).sum(1).float() / (predicted | truth).sum(1).float().clamp(min=1))
        iou_pred_all.append(iou_pred[:, 0])
    iou = torch.cat(iou_all)
    return {"bce": torch.stack(bce).mean(), "dice": torch.stack(dice).mean(),
            "iou_mse": F.mse_loss(torch.cat(iou_pred_all), iou), "mask_iou": iou.mean()}  # fmt: skip


def train_segmenter(segmenter: SamSegmenter, scenes: Iterator[GroundingScene], config: LoopConfig,
                    rng: np.random.Generator, log: LogFn | None = None) -> int:
    """Returns the number of steps run."""
    sam = segmenter.sam
    sam.train()
    params = list(sam.parameters())
    optimizer = make_optimizer([(params, 1.0)], config)
    started, budget, step = time.time(), _Budget(config.time_budget_s), 0
    while step < config.steps:
        config = budget.check(step, config, log, "segmenter")
        terms = segmenter_loss(segmenter, _augmented(scenes, config.batch_size, rng), rng)
        loss = terms["bce"] + terms["dice"] + terms["iou_mse"]
        norm = _step(optimizer, loss, params, step, config)
        if log and _should_log(step, config):
            log("segmenter", step, {k: v.item() for k, v in terms.items()} | {"grad_norm": norm, "seconds": time.time() - started})
        step += 1
    sam.eval()
    return config.steps


# ---------------------------------------------------------------------------------------------------
# Detector
# ---------------------------------------------------------------------------------------------------


@dataclass
class DetectorBatch:
    pixel_values: torch.Tensor  # (B, 3, h, w) ImageNet-normalised, padded with black at the bottom/right
    pixel_mask: torch.Tensor  # (B, h, w) 1 = real pixel
    captions: list[str]
    labels: list[dict[str, torch.Tensor]]  # class_labels (n,) phrase index, boxes (n, 4) cxcywh in [0, 1]
    kind_maps: torch.Tensor | None = None  # (B, num_tags, h, w) 1 where an object of the tag is (padded canvas)

    def to(self, device: torch.device) -> "DetectorBatch":
        labels = [{k: v.to(device) for k, v in label.items()} for label in self.labels]
        kind_maps = self.kind_maps.to(device) if self.kind_maps is not None else None
        return DetectorBatch(self.pixel_values.to(device), self.pixel_mask.to(device), self.captions, labels, kind_maps)


def detector_batch(scenes: list[GroundingScene], rng: np.random.Generator, short_sides: tuple[int, ...],
                   resize_max: int, absent_tag_probability: float = 0.5) -> DetectorBatch:
    """Resize each scene (shorter side drawn from `short_sides`), pad to the batch's size rounded up
    to a multiple of 32.

    Caption: the present kinds plus each absent kind with `absent_tag_probability`, shuffled, so the
    model learns to find what is named and to leave a named-but-absent kind alone.
    """
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    images, labels, captions, kind_maps = [], [], [], []
    for scene in scenes:
        width, height = scene.image.width, scene.image.height
        new_h, new_w = resized_size(width, height, int(rng.choice(short_sides)), resize_max)
        pixels = torch.from_numpy(np.array(scene.image.resize((new_w, new_h), Image.BILINEAR))).permute(2, 0, 1)
        images.append((pixels.float() / 255 - mean) / std)
        kind_map = torch.zeros(len(TAGS), new_h, new_w)
        for obj in scene.objects:
            resized = Image.fromarray(obj.mask).resize((new_w, new_h), Image.NEAREST)
            kind_map[TAGS.index(obj.kind)] += torch.from_numpy(np.array(resized)).float()
        kind_maps.append(kind_map.clamp(max=1))
        present = scene.tags
        tags = present + [t for t in TAGS if t not in present and rng.random() < absent_tag_probability]
        tags = [tags[i] for i in rng.permutation(len(tags))]
        captions.append(" . ".join(clean_tag(t) for t in tags) + " .")
        boxes = [[(o.box[0] + o.box[2]) / 2 / width, (o.box[1] + o.box[3]) / 2 / height,
                  (o.box[2] - o.box[0]) / width, (o.box[3] - o.box[1]) / height] for o in scene.objects]  # fmt: skip
        labels.append({"class_labels": torch.tensor([tags.index(o.kind) for o in scene.objects]),
                       "boxes": torch.tensor(boxes, dtype=torch.float32)})  # fmt: skip
    # Multiples of 32: a handful of distinct input shapes, which the CPU kernels cache.
    max_h = -(-max(p.shape[1] for p in images) // 32) * 32
    max_w = -(-max(p.shape[2] for p in images) // 32) * 32
    # Padding is black, not 0 after normalisation: an all-zero patch gives an all-zero token, whose
    # LayerNorm (variance 0) multiplies gradients by 1/sqrt(eps) in every Swin layer.
    pixel_values = ((0 - mean) / std).expand(3, max_h, max_w).repeat(len(images), 1, 1, 1)
    pixel_mask = torch.zeros(len(images), max_h, max_w, dtype=torch.long)
    kind_canvas = torch.zeros(len(images), len(TAGS), max_h, max_w)
    for i, p in enumerate(images):
        pixel_values[i, :, : p.shape[1], : p.shape[2]] = p
        pixel_mask[i, : p.shape[1], : p.shape[2]] = 1
        kind_canvas[i, :, : p.shape[1], : p.shape[2]] = kind_maps[i]
    return DetectorBatch(pixel_values, pixel_mask, captions, labels, kind_canvas)


class _GroundingDinoImageLoss(GroundingDinoImageLoss):
    """transformers' criterion with one fix: the targets' phrase indices are offset by the number of
    phrases of all EARLIER captions of the batch (transformers 4.57 adds the current caption's own
    count, which is right only for a batch of two equal-length captions; other batches get wrong
    token targets or an IndexError)."""

    def _get_target_classes_one_hot(self, outputs, targets, indices):
        logits = outputs["logits"]
        counts = [len(label_map) for label_map in outputs["label_maps"]]
        offsets = [sum(counts[:i]) for i in range(len(counts))]
        class_labels = torch.cat([t["class_labels"][J] + offsets[i] for i, (t, (_, J)) in enumerate(zip(targets, indices))])
        label_maps = torch.cat(outputs["label_maps"], dim=0)
        idx = self._get_source_permutation_idx(indices)
        target_classes_onehot = torch.zeros_like(logits, device=logits.device, dtype=torch.long)
        target_classes_onehot[idx] = label_maps[class_labels].to(torch.long)
        return target_classes_onehot


LOSS_WEIGHTS = {"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}  # transformers' (and DINO's) weights


def _criterion(config) -> _GroundingDinoImageLoss:
    matcher = GroundingDinoHungarianMatcher(class_cost=config.class_cost, bbox_cost=config.bbox_cost,
                                            giou_cost=config.giou_cost)  # fmt: skip
    return _GroundingDinoImageLoss(matcher=matcher, focal_alpha=config.focal_alpha, losses=["labels", "boxes"])


def decoder_set_loss(logits, labels, device, pred_boxes, config, label_maps, text_mask, outputs_class=None,
                     outputs_coord=None, encoder_logits=None, encoder_pred_boxes=None):
    """The decoder part of transformers' `GroundingDinoForObjectDetectionLoss` (focal token alignment
    x2, L1 x5, GIoU x2 on the last layer and every earlier one), with the fixed criterion. Installed
    as the model's `loss_function`; the encoder part is `encoder_proposal_loss`, because the
    `encoder_logits` / `encoder_pred_boxes` transformers passes here are detached from the encoder's
    heads (they would never train them)."""
    criterion = _criterion(config)
    outputs = {"logits": logits, "pred_boxes": pred_boxes, "label_maps": label_maps, "text_mask": text_mask}
    auxiliary = None
    if config.auxiliary_loss:
        auxiliary = _set_aux_loss(outputs_class, outputs_coord)
        for aux in auxiliary:
            aux["label_maps"], aux["text_mask"] = label_maps, text_mask
        outputs["auxiliary_outputs"] = auxiliary
    loss_dict = criterion(outputs, labels)
    loss = sum(v * LOSS_WEIGHTS[k.rsplit("_", 1)[0] if k[-1].isdigit() else k] for k, v in loss_dict.items()
               if (k.rsplit("_", 1)[0] if k[-1].isdigit() else k) in LOSS_WEIGHTS)  # fmt: skip
    return loss, loss_dict, auxiliary


def encoder_proposal_loss(out, labels: list[dict], input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          config) -> dict[str, torch.Tensor]:
    """The two-stage proposal loss as DINO computes it: the encoder's top `num_queries` proposals
    (by best token logit, padded positions excluded), with gradients into the encoder's class and box
    heads, matched and scored like a decoder layer.

    out.enc_outputs_class (B, L, max_text_len), out.enc_outputs_coord_logits (B, L, 4) (+inf where
    the proposal lies in padding)."""
    class_logits, coord_logits = out.enc_outputs_class, out.enc_outputs_coord_logits
    valid = torch.isfinite(coord_logits).all(-1)  # (B, L)
    scores = class_logits.max(-1).values.masked_fill(~valid, float("-inf"))
    top = scores.topk(config.num_queries, dim=1).indices  # (B, K)
    logits = torch.gather(class_logits, 1, top[..., None].expand(-1, -1, class_logits.shape[-1]))
    boxes = torch.gather(coord_logits, 1, top[..., None].expand(-1, -1, 4)).sigmoid()
    outputs = {"logits": logits, "pred_boxes": boxes, "label_maps": build_label_maps(logits, input_ids),
               "text_mask": build_text_mask(logits, attention_mask)}  # fmt: skip
    return {f"{k}_enc": v for k, v in _criterion(config)(outputs, labels).items()}


class KindMapProbes(nn.Module):
    """Training-only 1x1-conv probes on each Swin output level, predicting which kinds cover each
    cell. Thrown away after training. Set prediction gives the backbone a few matched boxes per image
    as signal; these give it every cell of every image, so it learns what a star or a cross looks
    like long before the Hungarian matching settles (the tagger's grid loss does the same)."""

    def __init__(self, channels: list[int], num_tags: int):
        super().__init__()
        self.levels = nn.ModuleList(nn.Conv2d(c, num_tags, 1) for c in channels)

    @staticmethod
    def for_detector(model: TinyGroundingDino) -> "KindMapProbes":
        swin = model.model.model.backbone.conv_encoder.model
        channels = [swin.num_features[i] for i in swin.config.out_indices]
        return KindMapProbes(channels, len(TAGS)).to(next(model.parameters()).device)

    def loss(self, feature_maps: tuple[torch.Tensor, ...], kind_maps: torch.Tensor) -> torch.Tensor:
        """feature_maps: (B, C_l, h_l, w_l) per level; kind_maps (B, num_tags, H, W) -> mean BCE."""
        losses = []
        for probe, features in zip(self.levels, feature_maps):
            targets = F.adaptive_max_pool2d(kind_maps, features.shape[-2:])
            losses.append(F.binary_cross_entropy_with_logits(probe(features), targets))
        return torch.stack(losses).mean()


def detector_loss(model: TinyGroundingDino, batch: "DetectorBatch", probes: KindMapProbes | None = None,
                  probe_weight: float = 2.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Decoder losses (every layer) + encoder proposal losses, with their weights; plus, with
    `probes`, the dense kind-map loss on the backbone's feature maps ("kind_map")."""
    text = model.tokenize(batch.captions).to(batch.pixel_values.device)
    model.model.loss_function = decoder_set_loss
    features: dict[str, tuple] = {}
    swin = model.model.model.backbone.conv_encoder.model
    hook = swin.register_forward_hook(lambda module, args, out: features.__setitem__("maps", out.feature_maps))
    try:
        out = model.model(pixel_values=batch.pixel_values, input_ids=text["input_ids"],
                          token_type_ids=text["token_type_ids"], attention_mask=text["attention_mask"],
                          pixel_mask=batch.pixel_mask, labels=batch.labels)  # fmt: skip
    finally:
        hook.remove()
    encoder = encoder_proposal_loss(out, batch.labels, text["input_ids"], text["attention_mask"], model.model.config)
    loss = out.loss + sum(v * LOSS_WEIGHTS[k.removesuffix("_enc")] for k, v in encoder.items()
                          if k.removesuffix("_enc") in LOSS_WEIGHTS)  # fmt: skip
    terms = {**out.loss_dict, **encoder}
    if probes is not None and batch.kind_maps is not None:
        terms["kind_map"] = probes.loss(features["maps"], batch.kind_maps)
        loss = loss + probe_weight * terms["kind_map"]
    return loss, terms


def detector_param_groups(model: TinyGroundingDino, backbone_lr_ratio: float) -> list[tuple[list[nn.Parameter], float]]:
    """(image backbone + text encoder at `backbone_lr_ratio` of the rate, the rest at the full rate)."""
    slow, fast = [], []
    for name, param in model.model.named_parameters():
        is_backbone = name.startswith(("model.backbone.", "model.text_backbone."))
        (slow if is_backbone else fast).append(param)
    return [(slow, backbone_lr_ratio), (fast, 1.0)]


def train_detector(model: TinyGroundingDino, scenes: Iterator[GroundingScene], config: LoopConfig,
                   rng: np.random.Generator, short_sides: tuple[int, ...], resize_max: int,
                   backbone_lr_ratio: float = 0.5, log: LogFn | None = None, evaluate_every: int = 0,
                   evaluate_fn: Callable[[], dict[str, float]] | None = None,
                   snapshot: Callable[[int], None] | None = None, snapshot_every: int = 0,
                   kind_map_weight: float = 0.0) -> int:
    """Returns the number of steps run. `snapshot(step)` is called every `snapshot_every` steps (e.g. to
    save the model on the way). `kind_map_weight` > 0 adds the dense kind-map loss (`KindMapProbes`)."""
    device = next(model.parameters()).device
    model.train()
    groups = detector_param_groups(model, backbone_lr_ratio)
    probes = KindMapProbes.for_detector(model) if kind_map_weight > 0 else None
    if probes is not None:
        groups.append((list(probes.parameters()), 1.0))
    params = [p for group, _ in groups for p in group]
    optimizer = make_optimizer(groups, config)
    started, budget, step = time.time(), _Budget(config.time_budget_s), 0
    while step < config.steps:
        config = budget.check(step, config, log, "detector")
        inputs = detector_batch(_augmented(scenes, config.batch_size, rng), rng, short_sides, resize_max).to(device)
        loss, terms = detector_loss(model, inputs, probes, kind_map_weight)
        norm = _step(optimizer, loss, params, step, config)
        if log and _should_log(step, config):
            # The last layer's terms (the others are suffixed _0, _1, ... and _enc).
            parts = {k.removeprefix("loss_"): v.item() for k, v in terms.items()
                     if k.removesuffix("_enc") in ("loss_ce", "loss_bbox", "loss_giou", "kind_map")}  # fmt: skip
            log("detector", step, {"loss": loss.item(), **parts, "grad_norm": norm, "seconds": time.time() - started})
        if evaluate_fn and evaluate_every and (step + 1) % evaluate_every == 0 and step + 1 < config.steps:
            model.eval()
            if log:
                log("detector_eval", step, evaluate_fn())
            model.train()
        if snapshot and snapshot_every and (step + 1) % snapshot_every == 0:
            snapshot(step + 1)
        step += 1
    model.eval()
    return config.steps


# ---------------------------------------------------------------------------------------------------
# Calibration and scores
# ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def tag_probabilities(model: RAMTagger, scenes: list[GroundingScene], batch_size: int = 64) -> torch.Tensor:
    device = next(model.parameters()).device
    probs = []
    for i in range(0, len(scenes), batch_size):
        pixels, _ = tagger_batch(scenes[i : i + batch_size], model.config.image_size)
        probs.append(model(pixels.to(device)).float().sigmoid().cpu())
    return torch.cat(probs)  # (N, num_tags)


def calibrate_tag_thresholds(model: RAMTagger, scenes: list[GroundingScene]) -> torch.Tensor:
    """Per tag, the threshold in [0.2, 0.8] (step 0.05) with the best F1 on `scenes`; ties -> nearest 0.5."""
    probs = tag_probabilities(model, scenes)
    truth = torch.tensor([[t in s.tags for t in TAGS] for s in scenes])
    grid = [round(0.2 + 0.05 * i, 2) for i in range(13)]
    thresholds = []
    for tag in range(len(TAGS)):
        def f1(threshold: float) -> float:
            predicted = probs[:, tag] > threshold
            tp = (predicted & truth[:, tag]).sum().item()
            return 2 * tp / max(1, predicted.sum().item() + truth[:, tag].sum().item())
        thresholds.append(max(grid, key=lambda t: (f1(t), -abs(t - 0.5))))
    return torch.tensor(thresholds)


def detect_all(detector: GroundingDetector, scenes: list[GroundingScene], tags: list[list[str]] | None = None):
    tags = tags if tags is not None else [s.tags for s in scenes]
    return [detector.detect(s.image, t) for s, t in zip(scenes, tags)]


def calibrate_box_threshold(model: TinyGroundingDino, settings: DetectorConfig, scenes: list[GroundingScene]) -> float:
    """The box threshold (0.15 ... 0.6) with the best F1 of boxes (IoU 0.5, right phrase) given the
    true tags. Detection runs once at the lowest threshold; a higher one keeps the detections whose
    box score passes it (NMS never lets a box suppress a better one, so this equals re-running)."""
    grid = [round(0.15 + 0.05 * i, 2) for i in range(10)]
    lowest = DetectorConfig(**(asdict(settings) | {"box_threshold": grid[0]}))
    detections = detect_all(GroundingDetector(model, lowest), scenes)
    best = (-1.0, settings.box_threshold)
    for threshold in grid:
        kept = [[d for d in ds if d.box_score > threshold] for ds in detections]
        best = max(best, (evaluate.box_scores(kept, scenes).f1, -threshold))
    return -best[1]


@torch.no_grad()
def score_models(tagger: RAMTagger, thresholds: torch.Tensor, detector: GroundingDetector,
                 segmenter: SamSegmenter, scenes: list[GroundingScene]) -> dict[str, float]:
    """Tag P/R/F1, box P/R (true tags), mean mask IoU from true boxes."""
    probs = tag_probabilities(tagger, scenes)
    predicted_tags = [[t for t, p, th in zip(TAGS, row.tolist(), thresholds.tolist()) if p > th] for row in probs]
    tags = evaluate.tag_scores(predicted_tags, [s.tags for s in scenes])
    boxes = evaluate.box_scores(detect_all(detector, scenes), scenes)
    ious = []
    for scene in scenes:
        masks = segmenter.segment(scene.image, [o.box for o in scene.objects])
        ious += [evaluate.mask_iou(m, o.mask) for m, o in zip(masks, scene.objects)]
    return {"tag_precision": tags.precision, "tag_recall": tags.recall, "tag_f1": tags.f1,
            "box_precision": boxes.precision, "box_recall": boxes.recall, "mask_iou": float(np.mean(ious))}  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# The whole recipe
# ---------------------------------------------------------------------------------------------------


@dataclass
class GroundingTrainingConfig:
    """The recipe of the shipped tiny weights (bubogpt/assets/grounding_tiny/README.md)."""

    seed: int = 0
    # A Swin learning from scratch-like features needs a low rate and many steps: at lr 1e-3 the tagger
    # stayed at the prior for 600 steps; at 3e-4 it reached tag F1 0.85 after 2000 and 0.94 after 3500.
    tagger: LoopConfig = field(default_factory=lambda: LoopConfig(steps=6000, batch_size=16, lr=3e-4, warmup_steps=100))
    segmenter: LoopConfig = field(default_factory=lambda: LoopConfig(steps=600, batch_size=4, lr=1e-3, warmup_steps=40))
    detector: LoopConfig = field(default_factory=lambda: LoopConfig(
        steps=7000, batch_size=8, lr=2e-4, warmup_steps=200, grad_clip=0.1))
    detector_short_sides: tuple[int, ...] = (96, 112, 128)  # scale jitter in training
    detector_resize_short: int = 112  # at inference
    detector_resize_max: int = 192
    backbone_lr_ratio: float = 0.5  # the detector's Swin and text encoder
    detector_kind_map_weight: float = 2.0  # dense kind-map loss on the detector's Swin (0: off)
    tagger_from_detector: bool = True  # start the tagger's Swin from the trained detector's
    tagger_backbone_lr_ratio: float = 1.0  # its last stage must learn kinds (probes on the detector's read them poorly)
    calibration_scenes: int = 200
    validation_scenes: int = 100
    evaluate_every: int = 1000  # detector recall/precision on validation scenes during training (0: never)
    snapshot_every: int = 500  # save the detector to OUT/detector_snapshot every so many steps (0: never)
    data_workers: int = 0  # processes drawing scenes; what is drawn does not depend on it

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "GroundingTrainingConfig":
        data = dict(data)
        for name in ("tagger", "segmenter", "detector"):
            if name in data and isinstance(data[name], dict):
                data[name] = LoopConfig(**data[name])
        if "detector_short_sides" in data:
            data["detector_short_sides"] = tuple(data["detector_short_sides"])
        return cls(**data)


PHASES = ("tagger", "segmenter", "detector")


def _phase_seed(config: GroundingTrainingConfig, phase: str) -> None:
    """Each phase seeds its own initialisation, so phases give the same result run alone or in a row."""
    torch.manual_seed(config.seed * 1000 + PHASES.index(phase))


def _phase_rng(config: GroundingTrainingConfig, phase: str) -> np.random.Generator:
    return np.random.default_rng([config.seed, 1, PHASES.index(phase)])


def _train_stream(config: GroundingTrainingConfig, phase: str) -> Iterator[GroundingScene]:
    # Each model reads its own stretch of the training stream.
    start = PHASES.index(phase) * 10_000_000
    return draw_scenes_parallel(config.seed, TRAIN_STREAM, config.data_workers, start=start)


def train_tagger_phase(config: GroundingTrainingConfig, device: torch.device, log: LogFn | None = None,
                       detector: TinyGroundingDino | None = None):
    """(RAM tiny tagger, per-tag thresholds calibrated on the calibration scenes, steps run).

    With `detector`, the tagger's Swin starts from the detector's trained backbone
    (`swin_from_detector`) and learns at `tagger_backbone_lr_ratio` of the rate."""
    _phase_seed(config, "tagger")
    tagger = RAMTagger(ram_tiny(num_tags=len(TAGS)), tag_names=list(TAGS))
    init_tagger_for_scratch_training(tagger)
    ratio = 1.0
    if detector is not None:
        swin_from_detector(detector, tagger)
        ratio = config.tagger_backbone_lr_ratio
    tagger.to(device)
    steps = train_tagger(tagger, _train_stream(config, "tagger"), config.tagger, _phase_rng(config, "tagger"), log,
                         backbone_lr_ratio=ratio)  # fmt: skip
    calibration = list(draw_scenes(config.seed, config.calibration_scenes, CALIBRATION_STREAM))
    return tagger.cpu(), calibrate_tag_thresholds(tagger, calibration), steps


def train_segmenter_phase(config: GroundingTrainingConfig, device: torch.device, log: LogFn | None = None):
    """(tiny SAM segmenter, its config, steps run)."""
    _phase_seed(config, "segmenter")
    sam_config = sam_tiny()
    segmenter = SamSegmenter(build_sam(sam_config).to(device))
    steps = train_segmenter(segmenter, _train_stream(config, "segmenter"), config.segmenter,
                            _phase_rng(config, "segmenter"), log)  # fmt: skip
    segmenter.sam.cpu()
    return segmenter, sam_config, steps


def train_detector_phase(config: GroundingTrainingConfig, device: torch.device, vocab_dir: Path,
                         log: LogFn | None = None):
    """(tiny Grounding DINO, its operating settings with the calibrated box threshold, steps run)."""
    _phase_seed(config, "detector")
    model = build_tiny_grounding_dino(vocab_dir, list(TAGS)).to(device)
    settings = DetectorConfig(resize_short=config.detector_resize_short, resize_max=config.detector_resize_max)
    validation = list(draw_scenes(config.seed, config.validation_scenes, VALIDATION_STREAM))

    def evaluate_detector() -> dict[str, float]:
        scores = evaluate.box_scores(detect_all(GroundingDetector(model, settings), validation), validation)
        return {"box_precision": scores.precision, "box_recall": scores.recall}

    def snapshot(step: int) -> None:
        model.save(vocab_dir.parent / "detector_snapshot")
        (vocab_dir.parent / "detector_snapshot" / "step.txt").write_text(f"{step}\n")

    steps = train_detector(
        model, _train_stream(config, "detector"), config.detector, _phase_rng(config, "detector"),
        config.detector_short_sides, config.detector_resize_max, config.backbone_lr_ratio, log,
        config.evaluate_every, evaluate_detector,
        snapshot, config.snapshot_every, config.detector_kind_map_weight,
    )  # fmt: skip
    calibration = list(draw_scenes(config.seed, config.calibration_scenes, CALIBRATION_STREAM))
    settings.box_threshold = calibrate_box_threshold(model, settings, calibration)
    return model.cpu(), settings, steps


def assemble_assets(config: GroundingTrainingConfig, out_dir: Path, tagger: RAMTagger, thresholds: torch.Tensor,
                    segmenter: SamSegmenter, sam_config, detector: TinyGroundingDino, settings: DetectorConfig,
                    steps_run: dict[str, int], device: str, log: LogFn | None = None) -> dict[str, float]:
    """Write the assets, reload them as the pipeline does (fp16 on disk), score them on the validation
    scenes and record the scores, steps and settings in training_scores.json."""
    from bubogpt.grounding.pipeline import load_tiny_grounding, save_tiny_grounding

    assets = save_tiny_grounding(out_dir / "grounding_tiny", tagger, thresholds, detector, settings, segmenter, sam_config)
    shipped = load_tiny_grounding(assets)
    validation = list(draw_scenes(config.seed, config.validation_scenes, VALIDATION_STREAM))
    scores = score_models(shipped.tagger.model, shipped.tagger.thresholds, shipped.detector, shipped.segmenter, validation)
    (assets / "training_scores.json").write_text(json.dumps(
        {"validation": scores, "config": config.to_dict(), "device": device, "steps_run": steps_run,
         "tag_thresholds": thresholds.tolist(), "detector": asdict(settings)}, indent=2) + "\n")  # fmt: skip
    if log:
        log("validation", steps_run.get("detector", 0), scores)
    return scores


def train_tiny_grounding(config: GroundingTrainingConfig, out_dir: str | Path, device: str | torch.device = "cpu",
                         log: LogFn | None = None) -> dict[str, float]:
    """The whole recipe: segmenter, detector, then the tagger (its Swin from the detector's), each
    calibrated; then the assets in `out_dir/grounding_tiny`, scored on the validation scenes.
    Returns those scores."""
    device = torch.device(device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    segmenter, sam_config, segmenter_steps = train_segmenter_phase(config, device, log)
    detector, settings, detector_steps = train_detector_phase(config, device, out_dir / "detector_vocab", log)
    tagger, thresholds, tagger_steps = train_tagger_phase(
        config, device, log, detector if config.tagger_from_detector else None)
    steps = {"tagger": tagger_steps, "segmenter": segmenter_steps, "detector": detector_steps}
    return assemble_assets(config, out_dir, tagger, thresholds, segmenter, sam_config, detector, settings, steps,
                           str(device), log)  # fmt: skip


def _save_phase(out_dir: Path, phase: str, result) -> None:
    """One phase's trained model, so that phases can run as separate processes (`--phase`)."""
    folder = out_dir / "phases"
    folder.mkdir(parents=True, exist_ok=True)
    if phase == "tagger":
        tagger, thresholds, steps = result
        torch.save({"state": tagger.state_dict(), "thresholds": thresholds, "steps": steps}, folder / "tagger.pt")
    elif phase == "segmenter":
        segmenter, sam_config, steps = result
        torch.save({"state": segmenter.sam.state_dict(), "config": sam_config.to_dict(), "steps": steps}, folder / "segmenter.pt")
    else:
        model, settings, steps = result
        model.save(folder / "detector")
        (folder / "detector.json").write_text(json.dumps({"settings": asdict(settings), "steps": steps}))


def _assemble_from_phases(config: GroundingTrainingConfig, out_dir: Path, device: str, log: LogFn | None) -> dict[str, float]:
    from bubogpt.grounding.segmenter import SamConfig

    folder = out_dir / "phases"
    saved = torch.load(folder / "tagger.pt", weights_only=True)
    tagger = RAMTagger(ram_tiny(num_tags=len(TAGS)), tag_names=list(TAGS))
    tagger.load_state_dict(saved["state"])
    seg = torch.load(folder / "segmenter.pt", weights_only=True)
    sam_config = SamConfig(**seg["config"])
    sam = build_sam(sam_config)
    sam.load_state_dict(seg["state"])
    detector = TinyGroundingDino.load(folder / "detector")
    det = json.loads((folder / "detector.json").read_text())
    steps = {"tagger": saved["steps"], "segmenter": seg["steps"], "detector": det["steps"]}
    return assemble_assets(config, out_dir, tagger.eval(), saved["thresholds"], SamSegmenter(sam), sam_config,
                           detector, DetectorConfig(**det["settings"]), steps, device, log)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train the tiny grounding models (no Ray).")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--config", type=Path, help="JSON of GroundingTrainingConfig fields to override")
    parser.add_argument("--data-workers", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--phase", choices=("all",) + PHASES + ("assemble",), default="all",
                        help="one phase alone (its model goes to OUT/phases/), or assemble the saved phases")
    parser.add_argument("--detector", type=Path, default=None,
                        help="--phase tagger: the detector whose Swin the tagger starts from (default OUT/phases/detector)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = json.loads(args.config.read_text()) if args.config else {}
    config = GroundingTrainingConfig.from_dict({**overrides, "seed": args.seed, "data_workers": args.data_workers})

    def log(phase: str, step: int, metrics: dict[str, float]) -> None:
        print(json.dumps({"phase": phase, "step": step, **{k: round(v, 4) for k, v in metrics.items()}}), flush=True)

    device = torch.device(args.device)
    if args.phase == "all":
        scores = train_tiny_grounding(config, args.out, device, log)
    elif args.phase == "assemble":
        scores = _assemble_from_phases(config, args.out, str(device), log)
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        if args.phase == "tagger":
            detector = None
            if config.tagger_from_detector:
                detector = TinyGroundingDino.load(args.detector or args.out / "phases" / "detector")
            result = train_tagger_phase(config, device, log, detector)
        elif args.phase == "segmenter":
            result = train_segmenter_phase(config, device, log)
        else:
            result = train_detector_phase(config, device, args.out / "detector_vocab", log)
        _save_phase(args.out, args.phase, result)
        return 0
    print(json.dumps({"validation": scores}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
