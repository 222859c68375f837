"""Shared pieces of the checkpoint loaders: safe reading and strict, explained assignment."""

from __future__ import annotations

import logging
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
    unexpected: list[str] = field(default_factory=list)  # unknown source keys (reported, not used)
    missing: list[str] = field(default_factory=list)  # model keys the source did not provide

    def summary(self) -> str:
        return (
            f"{self.source}: loaded {len(self.loaded)} tensors, ignored {len(self.ignored)} unused, "
            f"{len(self.unexpected)} unexpected {self.unexpected[:5]}, "
            f"{len(self.missing)} missing {self.missing[:5]}"
        )


def load_torch_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a `.pth` checkpoint safely (`weights_only=True`) and unwrap a `{"model": ...}` wrapper."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
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
    allow_missing: tuple[str, ...] = (),
) -> LoadReport:
    """Copy `state` (already in the module's names) into `module`.

    Refuses any shape mismatch (naming the key and both shapes) and any missing key not matched by
    `allow_missing` prefixes. Unknown keys are reported in the result and logged.
    """
    report = LoadReport(source=source, ignored=list(ignored or []))
    own = module.state_dict()
    mismatched = [
        f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)}"
        for key, value in state.items()
        if key in own and tuple(value.shape) != tuple(own[key].shape)
    ]
    if mismatched:
        raise CheckpointMismatchError(f"{source}: shape mismatch for " + "; ".join(mismatched))
    report.unexpected = sorted(k for k in state if k not in own)
    report.missing = sorted(k for k in own if k not in state)
    not_allowed = [k for k in report.missing if not k.startswith(allow_missing or ("\0",))]
    if not_allowed:
        raise CheckpointMismatchError(f"{source}: missing keys {not_allowed}")
    with torch.no_grad():
        for key, value in state.items():
            if key in own:
                own[key].copy_(value.to(own[key].dtype))
                report.loaded.append(key)
    if report.unexpected:
        logger.warning("%s: unexpected keys not loaded: %s", source, report.unexpected)
    logger.info(report.summary())
    return report


def split_by_prefix(
    state: dict[str, torch.Tensor], prefix: str
) -> dict[str, torch.Tensor]:
    """The entries under `prefix`, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
