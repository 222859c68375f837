"""Shared pieces of the checkpoint loaders: safe reading, strict and explained assignment, and a
safetensors writer that holds one tensor at a time."""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model: names the key(s) and, for shapes, both shapes."""


@dataclass
class LoadReport:
    source: str
    loaded: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # known source keys BuboGPT does not use
    unexpected: list[str] = field(default_factory=list)  # unknown source keys (reported, skipped)
    missing: list[str] = field(default_factory=list)  # model keys the source did not provide (allowed)

    def summary(self) -> str:
        return (
            f"{self.source}: loaded {len(self.loaded)} tensors, ignored {len(self.ignored)} unused, "
            f"{len(self.unexpected)} unexpected {self.unexpected[:5]}, "
            f"{len(self.missing)} missing {self.missing[:5]}"
        )


def load_torch_file(path: str | Path, mmap: bool = False) -> dict[str, torch.Tensor]:
    """Read a `.pth` checkpoint safely (`weights_only=True`) and unwrap a `{"model": ...}` wrapper.

    `mmap=True` maps the tensors from the file instead of reading them (zip-format files; a
    legacy-format file is read whole): a converter then touches one tensor at a time."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as exc:
            if not mmap or "mmap" not in str(exc):
                raise
            data = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as exc:  # pickle errors, truncated zip archives, foreign objects
        raise CheckpointMismatchError(f"cannot read checkpoint {path}: {exc}") from exc
    if isinstance(data, dict) and "model" in data and isinstance(data["model"], dict):
        data = data["model"]
    if not isinstance(data, dict):
        raise CheckpointMismatchError(f"{path} does not hold a state dict (found {type(data).__name__})")
    return data


def assign_state_dict(
    module: nn.Module,
    state: dict[str, torch.Tensor],
    source: str,
    *,
    ignored: list[str] | None = None,
    unexpected: list[str] | None = None,
    allow_missing: tuple[str, ...] = (),
) -> LoadReport:
    """Copy `state` (already in the module's names) into `module`.

    Refuses any shape mismatch (naming the key and both shapes) and any missing key not matched by
    `allow_missing` prefixes (naming the key and the shape the model needs). Unknown keys (those of
    `state` the module has no place for, plus the source keys a converter did not recognise, passed
    as `unexpected`) are listed in the result, logged and skipped.
    """
    report = LoadReport(source=source, ignored=list(ignored or []))
    own = module.state_dict()
    check_state_shapes(own, state, source, allow_missing)
    report.unexpected = sorted([k for k in state if k not in own] + list(unexpected or []))
    report.missing = sorted(k for k in own if k not in state)
    with torch.no_grad():
        for key, value in state.items():
            if key in own:
                own[key].copy_(value.to(own[key].dtype))
                report.loaded.append(key)
    if report.unexpected:
        logger.warning("%s: unexpected keys not loaded: %s", source, report.unexpected)
    logger.info(report.summary())
    return report


def check_state_shapes(
    expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], source: str,
    allow_missing: tuple[str, ...] = (),
) -> None:
    """Raise unless every key of `expected` not under `allow_missing` is in `state` with its shape.
    Works on meta tensors too: a converter checks a whole model before any weight is read."""
    mismatched = [
        f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(expected[key].shape)}"
        for key, value in state.items()
        if key in expected and tuple(value.shape) != tuple(expected[key].shape)
    ]
    if mismatched:
        raise CheckpointMismatchError(f"{source}: shape mismatch for " + "; ".join(mismatched))
    missing = [
        f"{key} {tuple(tensor.shape)}"
        for key, tensor in expected.items()
        if key not in state and not (allow_missing and key.startswith(allow_missing))
    ]
    if missing:
        raise CheckpointMismatchError(f"{source}: missing keys (name and the shape needed): {missing[:20]}")


# safetensors dtype names (https://github.com/huggingface/safetensors, format spec)
SAFETENSORS_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}  # fmt: skip


def write_safetensors(
    path: str | Path,
    tensors: Mapping[str, torch.Tensor],
    dtype_of: Callable[[str, torch.Tensor], torch.dtype] = lambda name, tensor: tensor.dtype,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write `tensors` (converted to `dtype_of(name, tensor)`) as one safetensors file, one tensor at
    a time: the header is computed from shapes alone, then each tensor is converted, written and
    dropped. With memory-mapped sources (`load_torch_file(mmap=True)`) no second copy of the weights
    is ever held. `safetensors.torch.save_file` would first build every tensor's bytes in memory."""
    path = Path(path)
    header: dict[str, object] = {"__metadata__": dict(metadata or {})}
    order: list[tuple[str, torch.dtype]] = []
    offset = 0
    for name, tensor in tensors.items():
        dtype = dtype_of(name, tensor)
        size = tensor.numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}  # fmt: skip
        order.append((name, dtype))
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(encoded)))
        file.write(encoded)
        for name, dtype in order:
            data = tensors[name].detach().to(device="cpu", dtype=dtype).contiguous()
            file.write(data.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, no copy
    return path


def split_by_prefix(
    state: dict[str, torch.Tensor], prefix: str
) -> dict[str, torch.Tensor]:
    """The entries under `prefix`, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
