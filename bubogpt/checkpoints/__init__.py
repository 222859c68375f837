"""Loaders for the original BuboGPT checkpoint formats, one module per source file.

Each converts the source state dict to this project's parameter names through an explicit key
table, then assigns it with strict accounting (`common.assign_state_dict`).
"""

from bubogpt.checkpoints.common import CheckpointMismatchError, LoadReport

__all__ = ["CheckpointMismatchError", "LoadReport"]
