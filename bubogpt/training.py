"""The BuboGPT training recipe as plain PyTorch pieces: stages, hyper-parameters, what trains,
optimiser, learning-rate schedule, dataset mixing, instruction phrasings and collation.

No Ray and no MLflow here: `workflows/train.py` runs these pieces inside Ray Train.

Stages (in the order `--stage all` runs them):

    lm_warmup     tiny only. The tiny preset has no pretrained Vicuna: language-model the tiny LLM on
                  the corpus text (instruction + answer, in the stage-2 template, no media).
    vision_align  tiny only. The tiny preset has no pretrained BLIP-2 / MiniGPT-4: train the vision
                  encoder, the vision Q-Former, the vision projection and the LLM on image captions and
                  image QA (what the real recipe receives pretrained).
    stage1        audio alignment (reference): audio Q-Former + audio projection on audio captions,
                  no instruction: `[BOS] + audio tokens + caption + end_sym`.
    stage2        multimodal instruction tuning (reference): both projections on image captions,
                  image QA, detailed audio captions, sound localisation and negative image-audio
                  pairs, in the `###Human: ... ###Assistant: ` template.

`TrainConfig` holds a stage's hyper-parameters; `stage_configs(preset)` gives the reference values
(7b/13b) or the tiny recipe. Flags that train more than the reference (`train_vision_encoder`,
`train_audio_encoder`, `train_llm`) exist for the tiny preset only and are off for 7b/13b.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bubogpt.conversation import Segment, caption_prompt, instruction_prompt

# --------------------------------------------------------------------------------------------------
# Stages and their hyper-parameters
# --------------------------------------------------------------------------------------------------

STAGE_ORDER = ("lm_warmup", "vision_align", "stage1", "stage2")
TINY_ONLY_STAGES = ("lm_warmup", "vision_align")

# How a stage turns a record into (prompt, target).
PROMPT_STYLES = ("text", "caption", "instruction")

# Sample ratios of the reference recipe (BUBOGPT_REFERENCE.md, "Training recipe"). WavCaps' four
# subsets (BBC 31, AudioSet-SL 108, SoundBible 2, FreeSound 262) are one `wavcaps` dataset here.
STAGE1_RATIOS = {"wavcaps": 1.0}
STAGE2_RATIOS = {"cc_sbu_align": 3.0, "llava_instruct": 150.0, "clotho": 4.0, "vggss": 5.0, "negative_pairs": 3.0}


class TrainConfigError(ValueError):
    """A training configuration that cannot run (unknown stage or field, bad values)."""


@dataclass
class LoraSettings:
    """LoRA on the LLM's attention projections (peft). Off by default, as in the paper."""

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
    precision: str = "fp16"  # autocast dtype on GPU: fp16 | bf16 | fp32; CPU always runs fp32
    train_qformers: bool = False  # stage2 option: unfreeze both Q-Formers
    lora: LoraSettings | None = None  # LoRA on the LLM (stage2 option)
    # Tiny preset only: also train what the real recipe receives pretrained.
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
        return cls(**dict(data))

    def with_overrides(self, overrides: Mapping[str, Any]) -> "TrainConfig":
        return TrainConfig.from_dict({**self.to_dict(), **overrides})


def reference_stage_configs(preset: str) -> dict[str, TrainConfig]:
    """The released recipe (7b/13b): 4 x 5000 iterations of stage 1, 10 x 5000 of stage 2."""
    stage2_txt_len = 196 if preset == "7b" else 160
    return {
        "stage1": TrainConfig(
            stage="stage1", datasets=dict(STAGE1_RATIOS), prompt_style="caption", batch_size=64,
            lr=1e-4, min_lr=8e-5, warmup_start_lr=1e-6, warmup_steps=5000, max_steps=4 * 5000,
            max_txt_len=128, log_every=50, checkpoint_every=5000,
        ),
        "stage2": TrainConfig(
            stage="stage2", datasets=dict(STAGE2_RATIOS), prompt_style="instruction", batch_size=12,
            lr=3e-5, min_lr=1e-5, warmup_start_lr=1e-6, warmup_steps=5000, max_steps=10 * 5000,
            max_txt_len=stage2_txt_len, log_every=50, checkpoint_every=5000,
        ),
    }  # fmt: skip


def tiny_stage_configs() -> dict[str, TrainConfig]:
    """The quickstart recipe of the tiny preset: all stages within 15 minutes on 2 CPU cores
    (measured on the medium corpus: 14.8 min with Ray start-up, on 2 cores shared with other jobs
    at load average 5-17; results in benchmarks/train_quickstart.md).

    Nothing of the tiny model is pretrained, so the two tiny-only stages come first, and stage 1/2
    also train the encoders' and the LLM's stand-ins where the real model brings them trained; the
    starting model has the spatial prior of `init_spatial_prior`. Learning rates are ~10-30x the
    reference: tiny randomly initialised modules, few steps.
    """
    image_sets = {"cc_sbu_align": 1.0, "llava_instruct": 3.0}
    every_set = {"wavcaps": 2.0, "cc_sbu_align": 1.0, "llava_instruct": 2.0, "clotho": 1.0, "vggss": 1.0, "negative_pairs": 1.0}
    # Stage 2 keeps the reference's datasets; the ratios are flattened so that the small localisation
    # and negative sets are seen often enough in a few hundred steps (reference: 3/150/4/5/3).
    stage2_sets = {"cc_sbu_align": 1.0, "llava_instruct": 3.0, "clotho": 1.0, "vggss": 2.0, "negative_pairs": 2.0}
    return {
        "lm_warmup": TrainConfig(
            stage="lm_warmup", datasets=every_set, prompt_style="text", batch_size=32,
            lr=3e-3, min_lr=3e-4, warmup_start_lr=1e-5, warmup_steps=10, max_steps=150,
            max_txt_len=160, grad_clip=1.0, train_llm=True, log_every=10, checkpoint_every=75,
        ),
        "vision_align": TrainConfig(
            stage="vision_align", datasets=image_sets, prompt_style="instruction", batch_size=16,
            lr=1e-3, min_lr=1e-4, warmup_start_lr=1e-5, warmup_steps=50, max_steps=1000,
            max_txt_len=96, grad_clip=1.0, train_vision_encoder=True, train_llm=True,
            use_precomputed_tokens=False, log_every=25, checkpoint_every=250,
        ),
        "stage1": TrainConfig(
            stage="stage1", datasets=dict(STAGE1_RATIOS), prompt_style="caption", batch_size=16,
            lr=1e-3, min_lr=1e-4, warmup_start_lr=1e-5, warmup_steps=20, max_steps=300,
            max_txt_len=64, grad_clip=1.0, train_audio_encoder=True, use_precomputed_tokens=False,
            log_every=25, checkpoint_every=150,
        ),
        "stage2": TrainConfig(
            stage="stage2", datasets=stage2_sets, prompt_style="instruction", batch_size=16,
            lr=5e-4, min_lr=5e-5, warmup_start_lr=1e-5, warmup_steps=40, max_steps=900,
            max_txt_len=96, grad_clip=1.0, train_qformers=True, train_llm=True,
            use_precomputed_tokens=False, log_every=25, checkpoint_every=300,
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
            hint = " (tiny-only stage)" if name in TINY_ONLY_STAGES else ""
            raise TrainConfigError(f"preset {preset} has no stage {name!r}{hint}; expected one of {sorted(configs)} or 'all'")
    names = [n for n in configs if n in names]  # always in recipe order
    resolved = [configs[n].with_overrides(overrides.get(n, {})) for n in names]
    if preset != "tiny":
        for config in resolved:
            extra = [f for f in ("train_vision_encoder", "train_audio_encoder", "train_llm") if getattr(config, f)]
            if extra:
                raise TrainConfigError(f"{config.stage}: {extra} are tiny-preset options, off for {preset}")
    return resolved


def load_overrides(path: str | Path) -> dict[str, dict[str, Any]]:
    """A JSON (or YAML) file {stage: {field: value}}."""
    path = Path(path)
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise TrainConfigError(f"{path}: expected an object {{stage: {{field: value}}}}")
    return data


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


# --------------------------------------------------------------------------------------------------
# The tiny preset's starting model
# --------------------------------------------------------------------------------------------------


def build_tiny_model(seed: int = 0, vocab_size: int = 1024, spatial_prior: bool = True):
    """A randomly initialised tiny BuboGPT with a byte-level BPE tokenizer trained on the corpus
    vocabulary (`vocab.sample_texts`); deterministic for a seed. `spatial_prior`: see
    `init_spatial_prior` (tiny recipe only)."""
    from bubogpt.config import tiny
    from bubogpt.data.vocab import sample_texts
    from bubogpt.modeling_bubogpt import BuboGPT
    from bubogpt.tokenizer import build_tiny_tokenizer

    torch.manual_seed(seed)
    model = BuboGPT.build(tiny(), build_tiny_tokenizer(sample_texts(), vocab_size))
    if spatial_prior:
        init_spatial_prior(model)
    return model


def sincos_2d(rows: torch.Tensor, cols: torch.Tensor, dim: int) -> torch.Tensor:
    """(N,) row and column coordinates -> (N, dim) [sin x, cos x, sin y, cos y] features, dim/4
    frequencies each (MAE's 2-D position embedding). Two codes' dot product peaks where they meet."""
    quarter = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    x, y = cols.float()[:, None] * omega, rows.float()[:, None] * omega
    return torch.cat([torch.sin(x), torch.cos(x), torch.sin(y), torch.cos(y)], dim=1)


@torch.no_grad()
def init_spatial_prior(model, sharpness: float = 1.5, position_scale: float = 2.0) -> None:
    """Tiny recipe only: start the vision Q-Former's queries looking at different places.

    A random vision encoder and Q-Former attend almost uniformly over the image tokens at first, so
    every query returns about the image's mean and where things are (and which colour goes with
    which place) is averaged away; learning to attend sharply from the LM loss alone is slow
    (issue #4). Here: the encoder's position embedding becomes a 2-D sin-cos code, the Q queries are
    the codes of a sqrt(Q) x sqrt(Q) grid of image places, and the first cross-attention's query and
    key projections are `sharpness` x identity, so at step 0 each query attends around its own
    place (code dot products peak where positions meet). Everything stays trainable. A pretrained
    BLIP-2 (7b/13b) brings its own attention: this is never applied to them.
    """
    vision, qformer = model.vision_encoder, model.joiner.qformers["vision"]
    dim, hidden = vision.config.embed_dim, qformer.config.hidden_size
    if dim != hidden or dim % 4:
        raise ValueError(f"the spatial prior needs the Q-Former width ({hidden}) to equal the encoder width ({dim}), a multiple of 4")
    grid = vision.config.img_size // vision.config.patch_size
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    codes = sincos_2d(rows.flatten(), cols.flatten(), dim) * position_scale  # (grid * grid, D)
    vision.pos_embed.copy_(torch.cat([torch.zeros(1, dim), codes])[None])  # CLS keeps a zero code
    side = int(round(qformer.config.num_query_token**0.5))
    if side * side != qformer.config.num_query_token:
        raise ValueError(f"the spatial prior needs a square number of queries, got {qformer.config.num_query_token}")
    places = torch.linspace(0.5, grid - 1.5, side)  # cell centres of a side x side grid over the patches
    q_rows, q_cols = torch.meshgrid(places, places, indexing="ij")
    qformer.query_tokens.copy_(sincos_2d(q_rows.flatten(), q_cols.flatten(), dim)[None])
    cross = next(layer.cross_attn for layer in qformer.layers if layer.cross_attn is not None)
    for projection in (cross.query, cross.key):
        projection.weight.copy_(torch.eye(dim) * sharpness)
        projection.bias.zero_()


# --------------------------------------------------------------------------------------------------
# What trains
# --------------------------------------------------------------------------------------------------


def configure_trainable(model: nn.Module, config: TrainConfig) -> list[str]:
    """Freeze everything, then unfreeze what `config.stage` trains. Returns the trainable names.

    With `config.lora`, call `apply_lora` first: the LoRA weights are then the LLM's trainable part.
    """
    if config.stage == "lm_warmup":
        prefixes: tuple[str, ...] = ("llm.",)
    elif config.stage == "vision_align":
        prefixes = ("joiner.qformers.vision.", "joiner.projections.vision.")
    elif config.stage == "stage1":
        prefixes = ("joiner.qformers.audio.", "joiner.projections.audio.")
    else:  # stage2
        prefixes = ("joiner.projections.",)
    if config.train_qformers and config.stage == "stage2":
        prefixes += ("joiner.qformers.",)
    if config.train_vision_encoder:
        prefixes += ("vision_encoder.",)
    if config.train_audio_encoder:
        prefixes += ("audio_encoder.",)
    if config.train_llm:
        prefixes += ("llm.",)
    names = []
    for name, parameter in model.named_parameters():
        trains = name.startswith(prefixes) or (config.lora is not None and "lora_" in name)
        parameter.requires_grad_(trains)
        if trains:
            names.append(name)
    if not names:
        raise TrainConfigError(f"{config.stage}: no parameter is trainable")
    return names


def apply_lora(model: nn.Module, settings: LoraSettings) -> None:
    """Wrap `model.llm` with peft LoRA adapters (in place)."""
    from peft import LoraConfig, get_peft_model

    lora_config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    model.llm = get_peft_model(model.llm, lora_config)


# --------------------------------------------------------------------------------------------------
# Optimiser and schedule
# --------------------------------------------------------------------------------------------------


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters in two AdamW groups: >= 2-D weights decay, biases/norms/scalars do not."""
    decay, no_decay = [], []
    for _, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    groups = [g for g in parameter_groups(model, config.weight_decay) if g["params"]]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas)


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warm-up from `warmup_start_lr` to `lr` over `warmup_steps`, then cosine to `min_lr` at
    `max_steps`. (LAVIS steps its cosine once per epoch; here it is smooth per step.)"""
    if step < config.warmup_steps:
        return config.warmup_start_lr + (config.lr - config.warmup_start_lr) * step / config.warmup_steps
    decay_steps = max(1, config.max_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    return config.min_lr + (config.lr - config.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """`LambdaLR` following `learning_rate`; all groups share the base lr `config.lr`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: learning_rate(step, config) / config.lr)


# --------------------------------------------------------------------------------------------------
# Dataset mixing
# --------------------------------------------------------------------------------------------------


class RatioMixer:
    """Chooses the dataset of each batch with probability proportional to its ratio.

    The choice depends only on (seed, step, micro-step), so every data-parallel worker picks the same
    dataset at the same step (their gradients then cover the same modules) and a resumed run makes
    the same choices as an uninterrupted one.
    """

    def __init__(self, ratios: Mapping[str, float], seed: int = 0):
        if not ratios or any(r <= 0 for r in ratios.values()):
            raise TrainConfigError(f"sample ratios must be positive, got {dict(ratios)}")
        self.names = sorted(ratios)
        weights = np.array([ratios[n] for n in self.names], dtype=np.float64)
        self.probabilities = weights / weights.sum()
        self.seed = seed

    def choose(self, step: int, micro_step: int = 0) -> str:
        rng = np.random.default_rng([self.seed, step, micro_step])
        return self.names[int(rng.choice(len(self.names), p=self.probabilities))]


# --------------------------------------------------------------------------------------------------
# Instructions (our own phrasings; the reference's prompt files are not copied)
# --------------------------------------------------------------------------------------------------

IMAGE_CAPTION_INSTRUCTIONS = (
    "Describe this picture.",
    "What does the image show?",
    "Give a short description of the image.",
    "Tell me what is drawn here.",
    "What can you see in this picture?",
)
AUDIO_DESCRIPTION_INSTRUCTIONS = (
    "Describe the sound you hear.",
    "What can be heard in this recording?",
    "Give a detailed description of this audio clip.",
    "What kind of sound is this?",
    "Listen and tell me about this sound.",
)
# Shared by sound localisation and negative pairs: the instruction does not say whether the pair
# matches, so only the image and the sound can decide between locating and "unrelated".
SOUND_SOURCE_INSTRUCTIONS = (
    "What in this picture makes the sound?",
    "Where does the sound come from in this image?",
    "Find the object that makes this sound.",
    "Which part of the picture is the sound coming from?",
    "Look and listen: what is making this noise?",
)
IMAGE_QA_FALLBACK = IMAGE_CAPTION_INSTRUCTIONS  # a QA record always carries its question

INSTRUCTIONS: dict[str, tuple[str, ...]] = {
    "wavcaps": AUDIO_DESCRIPTION_INSTRUCTIONS,
    "cc_sbu_align": IMAGE_CAPTION_INSTRUCTIONS,
    "llava_instruct": IMAGE_QA_FALLBACK,
    "clotho": AUDIO_DESCRIPTION_INSTRUCTIONS,
    "vggss": SOUND_SOURCE_INSTRUCTIONS,
    "negative_pairs": SOUND_SOURCE_INSTRUCTIONS,
}
# Sets whose own instruction (from the corpus) is used only half of the time: it differs between
# matching and non-matching pairs and would let the model answer from the instruction alone.
SHARED_INSTRUCTION_SETS = ("vggss", "negative_pairs")

# The fixed instruction per evaluated task (evaluation always asks the same way).
EVAL_INSTRUCTIONS = {
    "sound": AUDIO_DESCRIPTION_INSTRUCTIONS[0],
    "source": SOUND_SOURCE_INSTRUCTIONS[0],
}


def pick_instruction(dataset: str, own: str, rng: np.random.Generator) -> str:
    """The record's own instruction, or one of our phrasings for its dataset."""
    if dataset not in INSTRUCTIONS:
        raise TrainConfigError(f"no instruction phrasings for dataset {dataset!r}; expected one of {sorted(INSTRUCTIONS)}")
    pool = INSTRUCTIONS[dataset]
    if own and (dataset not in SHARED_INSTRUCTION_SETS or rng.random() < 0.5):
        return own
    return pool[int(rng.integers(len(pool)))]


# --------------------------------------------------------------------------------------------------
# Collation: decoded rows -> model inputs
# --------------------------------------------------------------------------------------------------


@dataclass
class ModelBatch:
    """Inputs of `BuboGPT.forward`. Modality tensors are compact: one row per prompt with that slot."""

    prompts: list[list[Segment]]
    targets: list[str]
    image: torch.Tensor | None = None  # (n_image, 3, S, S)
    audio: torch.Tensor | None = None  # (n_audio, clips, 1, mels, frames)
    vision_tokens: torch.Tensor | None = None  # (n_image, T, vision_width)
    audio_tokens: torch.Tensor | None = None  # (n_audio, T, audio_width)
    datasets: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.prompts)

    def to(self, device: torch.device | str) -> "ModelBatch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return dataclasses.replace(
            self,
            image=move(self.image),
            audio=move(self.audio),
            vision_tokens=move(self.vision_tokens),
            audio_tokens=move(self.audio_tokens),
        )

    def model_inputs(self) -> dict[str, Any]:
        return {
            "prompts": self.prompts,
            "targets": self.targets,
            "image": self.image,
            "audio": self.audio,
            "vision_tokens": self.vision_tokens,
            "audio_tokens": self.audio_tokens,
        }


class CollateError(ValueError):
    """Rows that cannot form a batch (missing media for the stage, mixed shapes)."""


def _stack(tensors: list[torch.Tensor], column: str) -> torch.Tensor:
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1:
        raise CollateError(f"{column}: rows of different shapes {sorted(shapes)} in one batch")
    return torch.stack(tensors)


def _as_tensor(value: Any) -> torch.Tensor | None:
    if value is None:
        return None
    return value.float() if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value), dtype=torch.float32)


def text_target(row: Mapping[str, Any], rng: np.random.Generator) -> str:
    """lm_warmup's whole-text target: the stage-2 template around the record's text, no media."""
    instruction = pick_instruction(row["dataset"], row.get("instruction") or "", rng)
    return f"###Human: {instruction} ###Assistant: {row['answer']}"


def collate(
    rows: Sequence[Mapping[str, Any]],
    prompt_style: str,
    rng: np.random.Generator,
    use_precomputed_tokens: bool = False,
) -> ModelBatch:
    """Decoded rows -> `ModelBatch`.

    A row holds `dataset`, `instruction`, `answer` and tensors (or None) `pixel_values` (3, S, S),
    `fbank` (clips, 1, mels, frames) and optionally `vision_tokens` / `audio_tokens` (T, D).
    prompt_style "text": no media, the whole text is the target; "caption": `[modality tokens]` then
    the answer (stage 1); "instruction": the `###Human: ... ###Assistant: ` template.
    """
    if not rows:
        raise CollateError("empty batch")
    if prompt_style not in PROMPT_STYLES:
        raise CollateError(f"prompt_style must be one of {PROMPT_STYLES}, got {prompt_style!r}")
    prompts, targets, datasets = [], [], []
    media: dict[str, list[torch.Tensor]] = {"image": [], "audio": [], "vision_tokens": [], "audio_tokens": []}
    for row in rows:
        datasets.append(row["dataset"])
        if prompt_style == "text":
            prompts.append([])
            targets.append(text_target(row, rng))
            continue
        modalities = []
        image, audio = _as_tensor(row.get("pixel_values")), _as_tensor(row.get("fbank"))
        vision_tokens, audio_tokens = _as_tensor(row.get("vision_tokens")), _as_tensor(row.get("audio_tokens"))
        if image is not None or vision_tokens is not None:
            modalities.append("vision")
            media["image"].append(image)
            media["vision_tokens"].append(vision_tokens)
        if audio is not None or audio_tokens is not None:
            modalities.append("audio")
            media["audio"].append(audio)
            media["audio_tokens"].append(audio_tokens)
        if not modalities:
            raise CollateError(f"row {row.get('id')!r} of {row['dataset']} has neither image nor audio")
        if prompt_style == "caption":
            prompts.append(caption_prompt(modalities))
        else:
            instruction = pick_instruction(row["dataset"], row.get("instruction") or "", rng)
            prompts.append(instruction_prompt(modalities, instruction))
        targets.append(row["answer"])
    batch = ModelBatch(prompts, targets, datasets=datasets)
    for raw, tokens in (("image", "vision_tokens"), ("audio", "audio_tokens")):
        if not media[raw]:
            continue
        if use_precomputed_tokens and all(t is not None for t in media[tokens]):
            setattr(batch, tokens, _stack(media[tokens], tokens))
        elif all(t is not None for t in media[raw]):
            setattr(batch, raw, _stack(media[raw], raw))
        else:
            raise CollateError(f"some rows have {tokens} but no {raw}, and precomputed tokens are not used")
    return batch


def count_target_tokens(labels: torch.Tensor, ignore_index: int = -100) -> int:
    """Supervised tokens in a batch's labels (B, T)."""
    return int((labels != ignore_index).sum())
