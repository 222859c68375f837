"""What every deployment's replica shares: its device and dtype, a probe of that device for the
health checks, and who it is."""

from __future__ import annotations

import os
from typing import Any

import torch
from ray import serve

DTYPES = {"auto": None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def probe_device(device: torch.device) -> None:
    """Raises if the device cannot run a kernel: a lost GPU, or a CUDA error a failed call left in
    the context (after which every call on it fails). A CPU has nothing to probe."""
    if device.type == "cuda":
        torch.ones(1, device=device).add_(1).item()


def replica_identity() -> dict[str, Any]:
    """Which replica answered: tests compare these before and after to detect restarts."""
    context = serve.get_replica_context()
    return {"deployment": context.deployment, "replica_id": context.replica_id.unique_id, "pid": os.getpid()}
