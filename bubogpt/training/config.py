"""The stages of BuboGPT's recipe and their hyper-parameters: `TrainConfig`, the presets' values
(`stage_configs`), which stages a job runs (`resolve_stages`) and overrides from a file or flags.

Stages (in the order `--stage all` runs them), the same two at every size:

    stage1        audio alignment: audio Q-Former + audio projection on audio captions, no
                  instruction: `[BOS] + audio tokens + caption + end_sym`.
    stage2        multimodal instruction tuning: both projections (tiny: + LoRA on the LLM) on image
                  captions, image QA, detailed audio captions, sound localisation and negative
                  image-audio pairs, in the served chat template (prompt style "chat").

`stage_configs(preset)` gives the reference values (7b/13b) or the tiny recipe, which starts from the
shipped pretrained tiny components as the reference starts from ImageBind, BLIP-2 and Vicuna. Flags
that train more than the reference (`train_vision_encoder`, `train_audio_encoder`, `train_llm`) are
tiny-preset experiments, off in every preset's recipe and refused for 7b/13b.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STAGE_ORDER = ("stage1", "stage2")

# A Llama decoder layer's linear layers (attention and MLP): the tiny recipe's LoRA targets.
LLAMA_LINEAR_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# How a stage turns a record into (prompt, target).
PROMPT_STYLES = ("caption", "instruction", "chat")
# The style users are served in (Serve's chat template): stage 2 trains in it, evaluation asks in it.
SERVED_PROMPT_STYLE = "chat"

# Sample ratios of the reference recipe (BUBOGPT_REFERENCE.md, "Training recipe"). WavCaps' four
# subsets (BBC 31, AudioSet-SL 108, SoundBible 2, FreeSound 262) are one `wavcaps` dataset here.
STAGE1_RATIOS = {"wavcaps": 1.0}
STAGE2_RATIOS = {"cc_sbu_align": 3.0, "llava_instruct": 150.0, "clotho": 4.0, "vggss": 5.0, "negative_pairs": 3.0}
# The 13B stage 2 (mmgpt4_stage2_mm_13b.yaml:33-82): the 31k VGGSS set at ratio 31, no negative pairs.
STAGE2_RATIOS_13B = {"cc_sbu_align": 3.0, "llava_instruct": 150.0, "clotho": 4.0, "vggss": 31.0}

# Learning-rate schedules (bubogpt/training/optim.py, `learning_rate`):
#   lavis               LAVIS's LinearWarmupCosineLRScheduler, as the released weights were trained:
#                       warm-up, then a cosine whose progress counts every step from 0 (so the peak
#                       is never reached: 1e-4 -> 9.707e-5 at step 5000 of stage 1's 20000)
#   warmup_then_cosine  the cosine starts at the peak when the warm-up ends (the tiny recipe's)
SCHEDULES = ("lavis", "warmup_then_cosine")


class TrainConfigError(ValueError):
    """A training configuration that cannot run (unknown stage or field, bad values)."""


@dataclass
class LoraSettings:
    """LoRA on the LLM (peft), by default on attention's q and v. Off in the 7b/13b recipe, as in the paper."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")


@dataclass
class TrainConfig:
    """Hyper-parameters of one stage. Steps are optimiser steps (each of `grad_accum_steps` batches)."""

    stage: str
    datasets: dict[str, float]  # dataset -> sample ratio; each batch comes from one dataset
    prompt_style: str  # one of PROMPT_STYLES
    batch_size: int  # per worker
    lr: float  # peak ("init_lr" in the reference)
    min_lr: float
    warmup_start_lr: float
    warmup_steps: int
    max_steps: int
    max_txt_len: int  # target tokens kept per sample
    weight_decay: float = 0.05  # on >= 2-D weights only
    betas: tuple[float, float] = (0.9, 0.999)
    grad_accum_steps: int = 1
    grad_clip: float | None = None  # max gradient norm; the reference does not clip
    schedule: str = "warmup_then_cosine"  # one of SCHEDULES
    precision: str = "fp16"  # autocast dtype on GPU: fp16 | bf16 | fp32; CPU always runs fp32
    train_qformers: bool = False  # stage2 option: unfreeze both Q-Formers
    lora: LoraSettings | None = None  # LoRA on the LLM (stage2 option)
    # Tiny-preset experiments (no recipe sets them; refused for 7b/13b): also train what the
    # recipe keeps frozen.
    train_vision_encoder: bool = False
    train_audio_encoder: bool = False
    train_llm: bool = False
    use_precomputed_tokens: bool = True  # use vision/audio_tokens columns when the encoder is frozen
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 100

    def __post_init__(self) -> None:
        if isinstance(self.lora, Mapping):
            self.lora = LoraSettings(**self.lora)
        if self.lora is not None and isinstance(self.lora.target_modules, list):
            self.lora.target_modules = tuple(self.lora.target_modules)
        self.betas = tuple(self.betas)
        self.datasets = {str(k): float(v) for k, v in self.datasets.items()}
        self.validate()

    def validate(self) -> None:
        if self.stage not in STAGE_ORDER:
            raise TrainConfigError(f"unknown stage {self.stage!r}; expected one of {STAGE_ORDER}")
        if self.prompt_style not in PROMPT_STYLES:
            raise TrainConfigError(f"prompt_style must be one of {PROMPT_STYLES}, got {self.prompt_style!r}")
        if self.schedule not in SCHEDULES:
            raise TrainConfigError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.precision not in ("fp16", "bf16", "fp32"):
            raise TrainConfigError(f"precision must be fp16, bf16 or fp32, got {self.precision!r}")
        if not self.datasets or any(r <= 0 for r in self.datasets.values()):
            raise TrainConfigError(f"{self.stage}: datasets need positive sample ratios, got {self.datasets}")
        for name in ("batch_size", "max_steps", "grad_accum_steps", "log_every", "checkpoint_every", "max_txt_len"):
            if getattr(self, name) < 1:
                raise TrainConfigError(f"{self.stage}: {name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise TrainConfigError(f"{self.stage}: warmup_steps must be >= 0, got {self.warmup_steps}")
        trained_encoders = [n for n in ("train_vision_encoder", "train_audio_encoder") if getattr(self, n)]
        if self.use_precomputed_tokens and trained_encoders:
            # Tokens precomputed by a frozen copy would go stale as the encoder trains, and the
            # encoder would get no gradient.
            raise TrainConfigError(
                f"{self.stage}: use_precomputed_tokens needs frozen encoders, but {', '.join(trained_encoders)} is set"
            )
        if not 0 <= self.min_lr <= self.lr or not 0 <= self.warmup_start_lr <= self.lr:
            raise TrainConfigError(
                f"{self.stage}: need 0 <= min_lr, warmup_start_lr <= lr; got lr={self.lr}, "
                f"min_lr={self.min_lr}, warmup_start_lr={self.warmup_start_lr}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise TrainConfigError(f"unknown TrainConfig fields: {sorted(unknown)}")
        try:
            return cls(**dict(data))
        except TypeError as err:  # a value of the wrong type (e.g. "lr": "fast")
            raise TrainConfigError(f"bad TrainConfig values: {err}") from err

    def with_overrides(self, overrides: Mapping[str, Any]) -> "TrainConfig":
        return TrainConfig.from_dict({**self.to_dict(), **overrides})


def reference_stage_configs(preset: str) -> dict[str, TrainConfig]:
    """The released recipe (7b/13b): 4 x 5000 iterations of stage 1, 10 x 5000 of stage 2, LAVIS's
    schedule (train_configs/mmgpt4_stage1_audio*.yaml, mmgpt4_stage2_mm*.yaml).

    13B differs from 7B in batch sizes (stage 1: 32, stage 2: 10), stage 2's max_txt_len (160) and
    stage 2's data (the 31k VGGSS set at ratio 31, no negative pairs); learning rates are the same.

    Precision bf16 (the original: fp16 autocast over an fp16 Vicuna): the frozen LLM and encoders
    load in bf16 here (`BuboGPTConfig.frozen_dtype`), and bf16 autocast computes in their own dtype
    instead of casting each bf16 weight to fp16, needs no loss scaling, and cannot overflow fp16's
    range. On GPUs without bf16, set `precision: fp16` and `frozen_dtype: float16`.

    Stage 2's prompts are the served chat template ("chat": the system sentence, then
    `###Human: ...###Assistant:`), not the reference's `###Human: ... ###Assistant: ` without it: the
    reference trains in one template and chats in the other; here the model is trained as it is asked.
    """
    thirteen = preset == "13b"
    return {
        "stage1": TrainConfig(
            stage="stage1", datasets=dict(STAGE1_RATIOS), prompt_style="caption", batch_size=32 if thirteen else 64,
            lr=1e-4, min_lr=8e-5, warmup_start_lr=1e-6, warmup_steps=5000, max_steps=4 * 5000,
            max_txt_len=128, schedule="lavis", precision="bf16", log_every=50, checkpoint_every=5000,
        ),
        "stage2": TrainConfig(
            stage="stage2", datasets=dict(STAGE2_RATIOS_13B if thirteen else STAGE2_RATIOS), prompt_style=SERVED_PROMPT_STYLE,
            batch_size=10 if thirteen else 12, lr=3e-5, min_lr=1e-5, warmup_start_lr=1e-6, warmup_steps=5000,
            max_steps=10 * 5000, max_txt_len=160 if thirteen else 196, schedule="lavis", precision="bf16",
            log_every=50, checkpoint_every=5000,
        ),
    }  # fmt: skip


def tiny_stage_configs() -> dict[str, TrainConfig]:
    """The paper's two stages at tiny size, on the shipped pretrained tiny components
    (`pretraining.assets.load_pretrained_tiny`: frozen encoders, the vision Q-Former and projection
    pre-aligned to the frozen tiny LLM, as MiniGPT-4's are to Vicuna). Stage 1 trains the audio
    Q-Former and projection; stage 2 the projections and LoRA on the LLM (the tiny LLM has not seen
    the chat template, nor media tokens from the audio side). Learning rates are ~10x the
    reference's: small modules, few steps. Timings and scores: benchmarks/train_quickstart.md.
    """
    # Stage 2 keeps the reference's datasets; the ratios are flattened so that the small localisation
    # and negative sets are seen often enough in a few hundred steps (reference: 3/150/4/5/3). LoRA
    # on every linear layer of the LLM, not only attention: finding an object by a kind that only
    # the sound names, and copying its colour, is what the tiny LLM does worst (scratch runs,
    # benchmarks/train_quickstart.md, session 11).
    stage2_sets = {"cc_sbu_align": 1.0, "llava_instruct": 3.0, "clotho": 1.0, "vggss": 4.0, "negative_pairs": 3.0}
    return {
        "stage1": TrainConfig(
            stage="stage1", datasets=dict(STAGE1_RATIOS), prompt_style="caption", batch_size=16,
            lr=1e-3, min_lr=1e-4, warmup_start_lr=1e-5, warmup_steps=20, max_steps=300,
            max_txt_len=64, grad_clip=1.0, log_every=25, checkpoint_every=150,
        ),
        "stage2": TrainConfig(
            stage="stage2", datasets=stage2_sets, prompt_style=SERVED_PROMPT_STYLE, batch_size=16,
            lr=1e-3, min_lr=1e-4, warmup_start_lr=1e-5, warmup_steps=40, max_steps=900,
            max_txt_len=96, grad_clip=1.0, lora=LoraSettings(r=16, alpha=32, dropout=0.0,
            target_modules=LLAMA_LINEAR_LAYERS), log_every=25, checkpoint_every=300,
        ),
    }  # fmt: skip


def stage_configs(preset: str) -> dict[str, TrainConfig]:
    """The stages of a preset, in running order."""
    if preset == "tiny":
        return tiny_stage_configs()
    if preset in ("7b", "13b"):
        return reference_stage_configs(preset)
    raise TrainConfigError(f"unknown preset {preset!r}; expected tiny, 7b or 13b")


def resolve_stages(preset: str, stage: str, overrides: Mapping[str, Mapping[str, Any]] | None = None) -> list[TrainConfig]:
    """The configs to run for `--stage NAME[,NAME...]|all` (in recipe order), with per-stage overrides
    ({stage: {field: value}})."""
    configs = stage_configs(preset)
    overrides = dict(overrides or {})
    unknown = set(overrides) - set(configs)
    if unknown:
        raise TrainConfigError(f"overrides for stages {sorted(unknown)} that preset {preset} does not have: {sorted(configs)}")
    names = list(configs) if stage == "all" else [n.strip() for n in stage.split(",")]
    for name in names:
        if name not in configs:
            raise TrainConfigError(f"preset {preset} has no stage {name!r}; expected one of {sorted(configs)} or 'all'")
    names = [n for n in configs if n in names]  # always in recipe order
    resolved = [configs[n].with_overrides(overrides.get(n, {})) for n in names]
    if preset != "tiny":
        for config in resolved:
            extra = [f for f in ("train_vision_encoder", "train_audio_encoder", "train_llm") if getattr(config, f)]
            if extra:
                raise TrainConfigError(f"{config.stage}: {extra} are tiny-preset options, off for {preset}")
    return resolved


def load_overrides(path: str | Path) -> dict[str, dict[str, Any]]:
    """A JSON (or YAML) file {stage: {field: value}}. A missing or unreadable file is a
    `TrainConfigError` (a user error), not a traceback."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise TrainConfigError(f"cannot read the config file {path}: {err.strerror or err}") from err
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise TrainConfigError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from err
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise TrainConfigError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise TrainConfigError(f"{path}: expected an object {{stage: {{field: value}}}}")
    return data


def with_job_overrides(configs: list[TrainConfig], max_steps: int | None = None,
                       batch_size: int | None = None) -> list[TrainConfig]:  # fmt: skip
    """`--max-steps` / `--batch-size` on every stage. A shortened stage keeps its shape: warm-up at
    most a fifth of the steps, and it still logs and checkpoints (at least at its end)."""
    changed = []
    for config in configs:
        overrides: dict[str, Any] = {}
        if max_steps is not None:
            overrides["max_steps"] = max_steps
            overrides["warmup_steps"] = min(config.warmup_steps, max_steps // 5)
            overrides["checkpoint_every"] = min(config.checkpoint_every, max_steps)
            overrides["log_every"] = min(config.log_every, max_steps)
        if batch_size is not None:
            overrides["batch_size"] = batch_size
        changed.append(config.with_overrides(overrides))
    return changed


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and tuples become strings. For tracking params."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        elif isinstance(value, (list, tuple)):
            flat[name] = ",".join(str(v) for v in value)
        else:
            flat[name] = value
    return flat


