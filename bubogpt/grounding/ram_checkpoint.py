"""Read `ram_swin_large_14m.pth`-format checkpoints into `RAMTagger`.

The file is `{"model": state_dict}` written by the original RAM code. Conversion is a pure
state-dict -> state-dict function with an explicit key table; loading accounts for every key:

- renamed: the tagging path (Swin, image_proj, label_embed, wordvec_proj, tagging_head, fc); older
  RAM files call the tagging head `vision_multi.*`, which is read as `tagging_head.*` (as the
  original's `load_checkpoint_swinlarge` renames it, ram/models/utils.py:270-272);
- ignored, listed by group: the captioning branch (`tag_encoder.*`, `text_decoder.*`) and the Swin
  buffers that `SwinEncoder` rebuilds (`*.relative_position_index`, `*.attn_mask`);
- anything else is listed in the report as unexpected and skipped (the original loads with
  `strict=False`, ram/models/utils.py:274); a model key the file lacks or a tensor of the wrong shape
  is an error naming the file, the key and the shapes.

The tag list and per-tag thresholds are user-supplied text files, one entry a line, in checkpoint
order (`ram_tag_list.txt`, `ram_tag_list_threshold.txt` in the RAM release).
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bubogpt.checkpoints.common import CheckpointMismatchError  # noqa: F401 (re-exported)
from bubogpt.grounding.ram import RAMConfig, RAMTagger

logger = logging.getLogger(__name__)

# Checkpoint prefix -> model prefix, for the parts whose inner names are kept.
RENAMED_PREFIXES = (
    ("visual_encoder.", "vision_encoder."),  # Swin: same inner names (patch_embed, layers.i.blocks.j, norm)
    ("image_proj.", "image_proj."),
    ("wordvec_proj.", "label_proj."),
    ("fc.", "classifier."),
)
RENAMED_KEYS = {"label_embed": "label_embed"}
# The older name of the tagging head, and the current one.
OLD_TAGGING_HEAD, TAGGING_HEAD = "vision_multi.", "tagging_head."

# tagging_head.encoder.layer.<i>.<BERT module>.{weight,bias} -> tagging_head.<i>.<our module>.*
TAGGING_LAYER_KEY = re.compile(r"^tagging_head\.encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$")
TAGGING_LAYER_MODULES = {
    "crossattention.self.query": "query",
    "crossattention.self.key": "key",
    "crossattention.self.value": "value",
    "crossattention.output.dense": "attention_out",
    "crossattention.output.LayerNorm": "attention_norm",
    "intermediate.dense": "ffn_in",
    "output.dense": "ffn_out",
    "output.LayerNorm": "ffn_norm",
}

# Keys the tagger does not use, grouped by the reason; reported, never silently dropped.
IGNORED_PREFIXES = ("tag_encoder.", "text_decoder.")  # the image-tag-text captioning branch
IGNORED_SUFFIXES = (".relative_position_index", ".attn_mask")  # Swin buffers rebuilt from the config

# The fixture/config.json names -> RAMConfig fields (other entries describe unused parts).
CONFIG_JSON_FIELDS = {
    "image_size": "image_size",
    "embed_dim": "embed_dim",
    "depths": "depths",
    "num_heads": "num_heads",
    "window_size": "window_size",
    "bert_hidden": "tag_head_hidden",
    "bert_heads": "tag_head_heads",
    "bert_intermediate": "tag_head_intermediate",
    "q2l_layers": "tag_head_layers",
}


@dataclass
class RAMLoadReport:
    """What `load_ram_state_dict` did with each checkpoint key."""

    loaded: int
    ignored: dict[str, list[str]] = field(default_factory=dict)  # group ("tag_encoder.*", ...) -> keys
    unexpected: list[str] = field(default_factory=list)  # keys the tagger has no use for: skipped
    renamed_old_head: int = 0  # `vision_multi.*` keys read as `tagging_head.*`

    def summary(self) -> str:
        groups = ", ".join(f"{group} ({len(keys)})" for group, keys in self.ignored.items())
        text = f"loaded {self.loaded} tensors; ignored {groups or 'nothing'}"
        if self.renamed_old_head:
            text += f"; {self.renamed_old_head} vision_multi.* keys read as tagging_head.*"
        if self.unexpected:
            text += f"; skipped {len(self.unexpected)} unexpected keys {self.unexpected[:5]}"
        return text


# ---------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------


def read_ram_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a `{"model": {...}}` file (a bare state dict is accepted too)."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "model" in obj:
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointMismatchError(
            f"{path}: expected {{'model': {{name: tensor}}}}, got {type(obj).__name__}"
        )
    return obj


def read_lines(path: str | Path) -> list[str]:
    """Non-empty lines of a UTF-8 text file, stripped (tag lists keep inner spaces: 'baseball bat')."""
    return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def read_tag_list(path: str | Path, num_tags: int) -> list[str]:
    tags = read_lines(path)
    if len(tags) != num_tags:
        raise CheckpointMismatchError(f"{path}: {len(tags)} tags, but the checkpoint has {num_tags}")
    return tags


def read_tag_thresholds(path: str | Path, num_tags: int) -> torch.Tensor:
    """(num_tags,) float32 thresholds, one per line."""
    lines = read_lines(path)
    if len(lines) != num_tags:
        raise CheckpointMismatchError(
            f"{path}: {len(lines)} thresholds, but the checkpoint has {num_tags} tags"
        )
    try:
        values = [float(line) for line in lines]
    except ValueError as error:
        raise CheckpointMismatchError(f"{path}: a threshold is not a number ({error})") from None
    return torch.tensor(values, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------
# Key conversion
# ---------------------------------------------------------------------------------------------------


def rename_old_tagging_head(checkpoint: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """`vision_multi.*` -> `tagging_head.*` (older RAM files). Returns (state, keys renamed)."""
    renamed = {}
    for key, tensor in checkpoint.items():
        if key.startswith(OLD_TAGGING_HEAD):
            key = TAGGING_HEAD + key[len(OLD_TAGGING_HEAD):]
            if key in checkpoint:
                raise CheckpointMismatchError(f"checkpoint has both {key} and its older name vision_multi.*")
        renamed[key] = tensor
    return renamed, sum(k.startswith(OLD_TAGGING_HEAD) for k in checkpoint)


def ignored_group(key: str) -> str | None:
    """The group a checkpoint key is ignored under, or None if the tagger needs it."""
    for prefix in IGNORED_PREFIXES:
        if key.startswith(prefix):
            return prefix + "*"
    for suffix in IGNORED_SUFFIXES:
        if key.endswith(suffix):
            return "*" + suffix
    return None


def rename_key(key: str) -> str | None:
    """Checkpoint key -> model key, or None when the table does not know it."""
    if key in RENAMED_KEYS:
        return RENAMED_KEYS[key]
    for old, new in RENAMED_PREFIXES:
        if key.startswith(old):
            return new + key[len(old):]
    match = TAGGING_LAYER_KEY.match(key)
    if match and match.group(2) in TAGGING_LAYER_MODULES:
        layer, module, kind = match.groups()
        return f"tagging_head.{layer}.{TAGGING_LAYER_MODULES[module]}.{kind}"
    return None


def original_key(model_key: str) -> str:
    """Model key -> the checkpoint key it is read from (the inverse of `rename_key`)."""
    inverse_keys = {new: old for old, new in RENAMED_KEYS.items()}
    if model_key in inverse_keys:
        return inverse_keys[model_key]
    for old, new in RENAMED_PREFIXES:
        if model_key.startswith(new):
            return old + model_key[len(new):]
    layer, module, kind = model_key.removeprefix("tagging_head.").split(".")
    inverse_modules = {new: old for old, new in TAGGING_LAYER_MODULES.items()}
    return f"tagging_head.encoder.layer.{layer}.{inverse_modules[module]}.{kind}"


def convert_ram_state_dict(
    checkpoint: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, list[str]], list[str]]:
    """Original keys -> (model state dict, ignored keys by group, unknown keys). `vision_multi.*`
    must already be renamed (`rename_old_tagging_head`)."""
    converted: dict[str, torch.Tensor] = {}
    ignored: dict[str, list[str]] = {}
    unknown = []
    for key, tensor in checkpoint.items():
        group = ignored_group(key)
        if group is not None:
            ignored.setdefault(group, []).append(key)
            continue
        new_key = rename_key(key)
        if new_key is None:
            unknown.append(key)
        else:
            converted[new_key] = tensor
    return converted, ignored, unknown


def load_ram_state_dict(
    model: RAMTagger, checkpoint: dict[str, torch.Tensor], source: str = "checkpoint"
) -> RAMLoadReport:
    """Copy an original-format state dict into `model`: every model key must come from it with its
    shape (else an error naming `source`, the key and the shapes, and nothing is loaded); keys the
    tagger does not use are ignored by group or, when unknown, reported as unexpected and skipped."""
    checkpoint, renamed = rename_old_tagging_head(checkpoint)
    converted, ignored, unknown = convert_ram_state_dict(checkpoint)
    expected = model.state_dict()
    missing = [f"{original_key(key)} {tuple(expected[key].shape)}" for key in expected if key not in converted]
    if missing:
        raise CheckpointMismatchError(
            f"{source} lacks {len(missing)} tensors the tagger needs (key and shape): {missing[:20]}"
        )
    for key, tensor in converted.items():
        if key in expected and tensor.shape != expected[key].shape:
            raise CheckpointMismatchError(
                f"{source}: {original_key(key)}: checkpoint shape {tuple(tensor.shape)} "
                f"!= model shape {tuple(expected[key].shape)} (model key {key})"
            )
    unexpected = sorted(unknown + [original_key(key) for key in converted if key not in expected])
    model.load_state_dict({k: v for k, v in converted.items() if k in expected}, strict=True)
    report = RAMLoadReport(loaded=len(expected), ignored=ignored, unexpected=unexpected, renamed_old_head=renamed)
    if unexpected:
        logger.warning("%s: keys the tagger does not use, skipped: %s", source, unexpected[:20])
    return report


# ---------------------------------------------------------------------------------------------------
# Config inference
# ---------------------------------------------------------------------------------------------------


def infer_ram_config(
    checkpoint: dict[str, torch.Tensor], config_json: dict[str, Any] | None = None
) -> RAMConfig:
    """A RAMConfig from the tensor shapes, checked against (and completed by) a config.json.

    Shapes give every width, depth, Swin head count, window and the tag count. Two numbers are not
    in any weight shape: the tagging head's head count (config.json `bert_heads`, else the released
    4) and the trained image size (config.json `image_size`, else read from a saved `attn_mask`
    buffer, else the released 384).
    """
    def tensor(key: str) -> torch.Tensor:
        if key not in checkpoint:
            raise CheckpointMismatchError(f"checkpoint lacks {key}, needed to infer the RAM config")
        return checkpoint[key]

    patch = tensor("visual_encoder.patch_embed.proj.weight")  # (embed_dim, 3, p, p)
    depths, num_heads, windows = [], [], []
    while f"visual_encoder.layers.{len(depths)}.blocks.0.norm1.weight" in checkpoint:
        stage = len(depths)
        depths.append(_count(checkpoint, f"visual_encoder.layers.{stage}.blocks.", ".norm1.weight"))
        table = tensor(f"visual_encoder.layers.{stage}.blocks.0.attn.relative_position_bias_table")
        num_heads.append(table.shape[1])
        windows.append((math.isqrt(table.shape[0]) + 1) // 2)  # (2w - 1)² rows
    if not depths:
        raise CheckpointMismatchError("checkpoint has no visual_encoder.layers.0.* Swin stage")
    image_proj = tensor("image_proj.weight")  # (image_embed_dim, vision_width)
    label_embed = tensor("label_embed")  # (num_tags, image_embed_dim)
    # No wordvec_proj when the head is as wide as the label embedding (the original's nn.Identity).
    label_proj = checkpoint.get("wordvec_proj.weight")
    hidden = label_proj.shape[0] if label_proj is not None else label_embed.shape[1]
    tag_layers = _count(checkpoint, "tagging_head.encoder.layer.", ".intermediate.dense.weight")
    defaults = RAMConfig()
    saved_image_size = _saved_image_size(checkpoint, patch.shape[-1], max(windows))
    inferred: dict[str, Any] = dict(
        image_size=saved_image_size or defaults.image_size,
        patch_size=patch.shape[-1],
        embed_dim=patch.shape[0],
        depths=depths,
        num_heads=num_heads,
        window_size=max(windows),  # a stage that fits in one window has a smaller table
        image_embed_dim=image_proj.shape[0],
        tag_head_hidden=hidden,
        tag_head_heads=defaults.tag_head_heads,
        tag_head_intermediate=tensor("tagging_head.encoder.layer.0.intermediate.dense.weight").shape[0],
        tag_head_layers=tag_layers,
        num_tags=label_embed.shape[0],
    )
    if config_json is not None:
        for json_key, field_name in CONFIG_JSON_FIELDS.items():
            if json_key not in config_json:
                continue
            value = config_json[json_key]
            # What the shapes determine must agree. The window is only a lower bound when every
            # stage fits in one window, and the loader's shape check catches a wrong one anyway.
            shape_determined = field_name not in ("tag_head_heads", "window_size", "image_size")
            if field_name == "image_size":
                shape_determined = saved_image_size is not None
            if shape_determined and value != inferred[field_name]:
                raise CheckpointMismatchError(
                    f"config.json {json_key}={value} but the checkpoint's shapes say {inferred[field_name]}"
                )
            inferred[field_name] = value
    config = RAMConfig(**inferred)
    if config.vision_width != image_proj.shape[1]:
        raise CheckpointMismatchError(
            f"image_proj.weight: input width {image_proj.shape[1]} != Swin output width {config.vision_width}"
        )
    json_vision_width = (config_json or {}).get("vision_width", config.vision_width)
    if json_vision_width != config.vision_width:
        raise CheckpointMismatchError(
            f"config.json vision_width={json_vision_width} but the checkpoint's is {config.vision_width}"
        )
    return config


def _count(checkpoint: dict[str, torch.Tensor], prefix: str, suffix: str) -> int:
    """How many consecutive indices i have `prefix{i}suffix` in the checkpoint."""
    count = 0
    while f"{prefix}{count}{suffix}" in checkpoint:
        count += 1
    return count


def _saved_image_size(checkpoint: dict[str, torch.Tensor], patch_size: int, window: int) -> int | None:
    """Trained image size from a saved shifted-window mask (nW, N, N): grid side = sqrt(nW) * window."""
    for key, value in checkpoint.items():
        match = re.match(r"^visual_encoder\.layers\.(\d+)\.blocks\.\d+\.attn_mask$", key)
        if match and value.dim() == 3 and value.shape[1] == window * window:
            grid = math.isqrt(value.shape[0]) * window
            return grid * 2 ** int(match.group(1)) * patch_size
    return None


# ---------------------------------------------------------------------------------------------------
# One call
# ---------------------------------------------------------------------------------------------------


def load_ram_tagger(
    checkpoint_path: str | Path,
    tag_list_path: str | Path,
    thresholds_path: str | Path,
    config_json_path: str | Path | None = None,
) -> tuple[RAMTagger, torch.Tensor, RAMLoadReport]:
    """(tagger in eval mode with its tag names, thresholds (num_tags,), load report)."""
    checkpoint = read_ram_checkpoint(checkpoint_path)
    config_json = json.loads(Path(config_json_path).read_text()) if config_json_path else None
    try:
        config = infer_ram_config(rename_old_tagging_head(checkpoint)[0], config_json)
    except CheckpointMismatchError as error:
        raise CheckpointMismatchError(f"{checkpoint_path}: {error}") from None
    tags = read_tag_list(tag_list_path, config.num_tags)
    thresholds = read_tag_thresholds(thresholds_path, config.num_tags)
    model = RAMTagger(config, tag_names=tags)
    report = load_ram_state_dict(model, checkpoint, source=str(checkpoint_path))
    return model.eval(), thresholds, report
