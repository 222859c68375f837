"""BuboGPT's training recipe as plain PyTorch (no Ray, no MLflow: `workflows/train.py` runs it in
Ray Train).

    config.py    stages and hyper-parameters: TrainConfig, stage_configs, resolve_stages, overrides
    recipe.py    the recipe top to bottom: what trains, optimiser, step loop, checkpoints (train)
    stepper.py   Stepper: what differs between DDP and DeepSpeed; TorchStepper, Resume
    optim.py     AdamW groups and the warm-up + cosine schedule (shared with grounding training)
    data.py      RatioMixer, collate (decoded rows -> ModelBatch), generation_batch
    prompts.py   row_prompt (a row -> its prompt, for training, evaluation and samples), instructions
"""

from bubogpt.training.config import (
    PROMPT_STYLES,
    SERVED_PROMPT_STYLE,
    STAGE_ORDER,
    LoraSettings,
    TrainConfig,
    TrainConfigError,
    flatten,
    load_overrides,
    resolve_stages,
    stage_configs,
    with_job_overrides,
)
from bubogpt.training.data import (
    DATASET_MODALITIES,
    ModelBatch,
    RatioMixer,
    collate,
    count_target_tokens,
    generation_batch,
    mixes_modalities,
)
from bubogpt.training.optim import build_optimizer, build_scheduler, learning_rate, parameter_groups, warmup_cosine
from bubogpt.training.prompts import (
    EVAL_INSTRUCTIONS,
    INSTRUCTIONS,
    SHARED_INSTRUCTION_SETS,
    SOUND_SOURCE_INSTRUCTIONS,
    CollateError,
    fixed_instruction,
    pick_instruction,
    row_prompt,
)
from bubogpt.training.recipe import Callbacks, Worker, apply_lora, configure_trainable, train, train_stage
from bubogpt.training.stepper import Resume, Stepper, TorchStepper

__all__ = [
    "CollateError", "Callbacks", "DATASET_MODALITIES", "EVAL_INSTRUCTIONS", "INSTRUCTIONS", "LoraSettings",
    "ModelBatch", "PROMPT_STYLES", "RatioMixer", "Resume", "SERVED_PROMPT_STYLE", "SHARED_INSTRUCTION_SETS", "SOUND_SOURCE_INSTRUCTIONS",
    "STAGE_ORDER", "Stepper", "TorchStepper", "TrainConfig", "TrainConfigError", "Worker",
    "apply_lora", "build_optimizer", "build_scheduler", "collate", "configure_trainable",
    "count_target_tokens", "fixed_instruction", "flatten", "generation_batch",
    "learning_rate", "load_overrides", "mixes_modalities", "parameter_groups", "pick_instruction",
    "resolve_stages", "row_prompt", "stage_configs", "train", "train_stage", "warmup_cosine", "with_job_overrides",
]  # fmt: skip
