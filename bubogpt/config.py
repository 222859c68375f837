"""Typed configs for every BuboGPT component, and the named presets.

Defaults equal the released 7B checkpoint (see BUBOGPT_REFERENCE.md). A preset is a plain function
returning a `BuboGPTConfig`; `PRESETS` maps the CLI names to them.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class AudioEncoderConfig:
    """ImageBind-Huge audio trunk (no head)."""

    embed_dim: int = 768
    num_blocks: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    drop_path: float = 0.1
    kernel_size: int = 16
    stride: int = 10
    num_mel_bins: int = 128
    target_length: int = 204  # fbank frames per clip after the bilinear resize
    layer_norm_eps: float = 1e-6
    logit_scale: float = 20.0  # tokens are L2-normalised then multiplied by this

    @property
    def num_patches(self) -> int:
        # Conv2d without padding: floor((n - k) / s) + 1 along each axis; 12 x 19 = 228 for 128 x 204.
        rows = (self.num_mel_bins - self.kernel_size) // self.stride + 1
        cols = (self.target_length - self.kernel_size) // self.stride + 1
        return rows * cols


@dataclass
class VisionEncoderConfig:
    """BLIP-2's EVA ViT-g followed by `ln_vision`."""

    img_size: int = 224
    patch_size: int = 14
    embed_dim: int = 1408
    depth: int = 39
    num_heads: int = 16
    mlp_ratio: float = 4.3637
    drop_path: float = 0.0  # 0.4 when the ViT itself is trained; it is frozen in BuboGPT
    layer_norm_eps: float = 1e-6
    ln_vision_eps: float = 1e-5
    # Empty: EVA's patch embedding (one patch_size x patch_size conv). Otherwise a convolutional stem,
    # one stage per width (log2(patch_size) of them): a 3x3 stride-2 conv and a 3x3 conv, GELU after
    # each, then a 1x1 projection to embed_dim and a LayerNorm: the same token grid, with the local
    # shape features a tiny ViT does not learn from 8-px patches (`modeling_vision.EvaPatchEmbed`).
    stem_channels: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        self.stem_channels = tuple(self.stem_channels)  # JSON gives a list
        if self.stem_channels and 2 ** len(self.stem_channels) != self.patch_size:
            raise ValueError(
                f"a conv stem of {len(self.stem_channels)} stride-2 convs makes patches of "
                f"{2 ** len(self.stem_channels)} px, but patch_size is {self.patch_size}"
            )

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def mlp_hidden(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)


@dataclass
class QFormerConfig:
    """BERT-base sized Q-Former, query path only (BLIP-2 layout)."""

    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    cross_attention_freq: int = 2
    num_query_token: int = 32
    encoder_width: int = 1408  # width of the encoder tokens it attends to; set by BuboGPTConfig
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1


@dataclass
class LLMConfig:
    """The language model: a Hugging Face causal LM directory, or a Llama built from these sizes."""

    path: str | None = None  # a local Hugging Face directory (Vicuna in the release); None = build
    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int | None = None
    intermediate_size: int = 11008
    vocab_size: int = 32000
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6


FROZEN_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class BuboGPTConfig:
    audio: AudioEncoderConfig = field(default_factory=AudioEncoderConfig)
    vision: VisionEncoderConfig = field(default_factory=VisionEncoderConfig)
    audio_qformer: QFormerConfig = field(default_factory=lambda: QFormerConfig(encoder_width=768))
    vision_qformer: QFormerConfig = field(default_factory=QFormerConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    max_txt_len: int = 196
    max_context_tokens: int = 2000
    end_sym: str = "###"  # ends every stage-2 target and every chat turn
    # Stage 1 (audio captions, no instruction) ends its targets with "\n" (mm_gpt4.py:68, :275; the
    # stage-1 train configs set no end_sym).
    stage1_end_sym: str = "\n"
    audio_clips: int = 6
    preset: str = "7b"
    # Where the frozen LLM and encoders live: "auto" = bfloat16 on a GPU, float32 on the CPU; or
    # "float32" / "bfloat16" / "float16". The joiner (Q-Formers, projections) always stays float32.
    frozen_dtype: str = "auto"
    # Preprocessing as the released weights were trained (bubogpt.preprocess reads these through
    # `AudioPreprocessConfig.for_model` / `ImagePreprocessConfig.for_model`).
    audio_channel: str = "first"  # "first": kaldi.fbank reads channel 0 | "mean": channels averaged
    audio_global_clip: bool = True  # one more clip: the whole audio, resized to the clip's frames
    spec_augment: str = "mixture"  # training stripes blended 50/50 with another clip | "replace"
    image_eval_resize: str = "center_crop"  # short side to the size, centre crop | "squash" (whole image)

    def __post_init__(self) -> None:
        # The Q-Former's cross-attention width is always its encoder's width: derive it in one place.
        self.audio_qformer.encoder_width = self.audio.embed_dim
        self.vision_qformer.encoder_width = self.vision.embed_dim
        choices = {
            "frozen_dtype": FROZEN_DTYPES,
            "audio_channel": ("first", "mean"),
            "spec_augment": ("mixture", "replace"),
            "image_eval_resize": ("center_crop", "squash"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BuboGPTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown BuboGPT config fields: {sorted(unknown)}")
        sub = {
            "audio": AudioEncoderConfig,
            "vision": VisionEncoderConfig,
            "audio_qformer": QFormerConfig,
            "vision_qformer": QFormerConfig,
            "llm": LLMConfig,
        }
        kwargs = {}
        for name, value in data.items():
            kwargs[name] = sub[name](**value) if name in sub else value
        return cls(**kwargs)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "BuboGPTConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


def bubogpt_7b(llm_path: str | None = None) -> BuboGPTConfig:
    """The released model: ImageBind-H audio, EVA ViT-g, two BERT-base Q-Formers, Vicuna-7B."""
    return BuboGPTConfig(llm=LLMConfig(path=llm_path), max_txt_len=196, preset="7b")


def bubogpt_13b(llm_path: str | None = None) -> BuboGPTConfig:
    """Same encoders and Q-Formers, Vicuna-13B (hidden 5120, 40 layers, 40 heads)."""
    llm = LLMConfig(
        path=llm_path, hidden_size=5120, num_layers=40, num_heads=40, intermediate_size=13824
    )
    return BuboGPTConfig(llm=llm, max_txt_len=160, preset="13b")


# Where the tiny preset keeps its own choices (README, "The tiny preset's own choices"): it trains its
# LLM and encoders (float32); its synthetic images are not square and their questions are about
# positions up to the edges (the whole image); its stereo sounds are panned, so the louder channel may
# be either (the mean keeps the level its loud/quiet answers depend on); 3 evenly spaced clips, no
# augmentation (its prepared data is computed once). The stage-1 end symbol stays "###", the one its
# sample generations stop at.
TINY_CHOICES = dict(
    frozen_dtype="float32", audio_channel="mean", audio_global_clip=False, spec_augment="replace",
    image_eval_resize="squash", stage1_end_sym="###",
)


def tiny() -> BuboGPTConfig:
    """All widths <= 128: trains on 2 CPU cores in minutes. Same architecture, smaller sizes.

    The encoders, the vision Q-Former and the LLM are the sizes of the shipped pretrained tiny
    components (bubogpt/assets/*/config.json; `pretraining.assets.load_pretrained_tiny`): the vision
    encoder has a convolutional stem for its 8-px patches of 112-px scenes."""
    return BuboGPTConfig(
        audio=AudioEncoderConfig(embed_dim=64, num_blocks=2, num_heads=4, drop_path=0.0),
        vision=VisionEncoderConfig(img_size=112, patch_size=8, embed_dim=64, depth=3, num_heads=4,
                                   stem_channels=(16, 32, 64)),
        audio_qformer=QFormerConfig(
            hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, num_query_token=8
        ),
        vision_qformer=QFormerConfig(
            hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, num_query_token=16
        ),
        llm=LLMConfig(
            hidden_size=128,
            num_layers=4,
            num_heads=4,
            intermediate_size=344,
            vocab_size=0,  # set from the tokenizer (the tiny LLM asset's: 771)
            max_position_embeddings=1024,
        ),
        max_txt_len=96,
        max_context_tokens=1000,
        audio_clips=3,
        preset="tiny",
        **TINY_CHOICES,
    )


PRESETS = {"tiny": tiny, "7b": bubogpt_7b, "13b": bubogpt_13b}
