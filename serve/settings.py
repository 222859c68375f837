"""Settings of the serving application: what to load, and every limit a request is held to.

`ServeSettings` is the `args` block of `serve/config.yaml` (passed to `serve.app:build_app`); each
deployment receives it as a plain dict and rebuilds it here, so unknown keys fail at start-up.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any


class SettingsError(ValueError):
    """A serving setting that is unknown or out of range; the message names it."""


@dataclass
class ServeSettings:
    # -- what to load --------------------------------------------------------------------------
    model_dir: str  # a directory written by `bubogpt.checkpoints.native.save_model`
    grounding_dir: str | None = None  # grounding models; None = the tiny assets shipped in bubogpt/assets
    model_name: str | None = None  # the id `/v1/models` reports; None = "bubogpt-<preset>"
    device: str = "auto"  # "auto" (cuda when a GPU is assigned), "cpu" or "cuda"
    dtype: str = "auto"  # "auto": the model's frozen_dtype (7B/13B: bf16 LLM and encoders on a GPU); or one for all
    torch_threads: int = 1  # per replica: a CPU replica owns about one core

    # -- request limits --------------------------------------------------------------------------
    max_body_bytes: int = 16 * 1024 * 1024
    max_image_pixels: int = 40_000_000  # checked from the header before decoding (decompression bombs)
    max_audio_seconds: float = 120.0
    max_prompt_tokens: int = 1536  # BOS + text + modality query tokens of the rendered conversation
    max_new_tokens: int = 300  # the most a client may ask for
    default_max_new_tokens: int = 300  # used when the client does not say (the reference's default)
    max_messages: int = 64
    request_timeout_s: float = 60.0  # end to end, per request; 504 after it

    # -- access ----------------------------------------------------------------------------------
    api_key: str | None = None  # bearer token; None = no authentication
    api_key_env: str | None = None  # or: the name of an environment variable holding it
    # Remote media URLs are never fetched unless they start with one of these prefixes
    # (scheme, host and port must match exactly; the path must start with the prefix's path).
    allowed_media_url_prefixes: list[str] = field(default_factory=list)
    media_fetch_timeout_s: float = 10.0

    # -- batching and caches ---------------------------------------------------------------------
    llm_max_batch_size: int = 8
    grounding_max_batch_size: int = 4
    grounding_batch_wait_s: float = 0.02
    encoder_cache_entries: int = 256  # frozen-encoder outputs, keyed by the media's sha256
    grounding_cache_entries: int = 256  # grounding results, keyed by the image's sha256

    def __post_init__(self) -> None:
        if not self.model_dir:
            raise SettingsError("model_dir is required: a directory written by save_model")
        positive = (
            "max_body_bytes", "max_image_pixels", "max_audio_seconds", "max_prompt_tokens",
            "max_new_tokens", "default_max_new_tokens", "max_messages", "request_timeout_s",
            "torch_threads", "llm_max_batch_size", "grounding_max_batch_size", "media_fetch_timeout_s",
        )  # fmt: skip
        for name in positive:
            if getattr(self, name) <= 0:
                raise SettingsError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("grounding_batch_wait_s", "encoder_cache_entries", "grounding_cache_entries"):
            if getattr(self, name) < 0:
                raise SettingsError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.default_max_new_tokens > self.max_new_tokens:
            raise SettingsError(
                f"default_max_new_tokens {self.default_max_new_tokens} exceeds max_new_tokens {self.max_new_tokens}"
            )
        if self.device not in ("auto", "cpu", "cuda"):
            raise SettingsError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise SettingsError(f"dtype must be auto, float32, float16 or bfloat16, got {self.dtype!r}")
        for prefix in self.allowed_media_url_prefixes:
            if not prefix.startswith(("http://", "https://")):
                raise SettingsError(f"allowed_media_url_prefixes entry {prefix!r} is not an http(s) URL")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ServeSettings":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SettingsError(f"unknown serving settings: {unknown}; known: {sorted(known)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def bearer_token(self) -> str | None:
        """The token clients must send, from `api_key` or the variable `api_key_env` names."""
        if self.api_key:
            return self.api_key
        if self.api_key_env:
            token = os.environ.get(self.api_key_env)
            if not token:
                raise SettingsError(f"api_key_env names {self.api_key_env!r}, which is unset or empty")
            return token
        return None
