"""The model folders of a training job: the starting model (OUT/init), the exported final model
(OUT/model, what serving loads), and whether a prepared corpus's precomputed encoder tokens came
from the starting model's encoders."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from bubogpt.atomic import atomic_directory
from bubogpt.checkpoints.native import CONFIG_FILE, WEIGHTS_FILE, save_model
from bubogpt.checkpoints.training_state import LORA_DIR, MODEL_DIR, read_model, write_model


class ModelDirError(ValueError):
    """A starting model that is missing or is not a BuboGPT model directory."""


def check_initial_model(preset: str, out_dir: Path, init: Path | None) -> None:
    """`ModelDirError` when `build_initial_model` could not make OUT/init (checked before any job starts)."""
    if (out_dir / "init" / CONFIG_FILE).is_file():
        return
    if init is None and preset != "tiny":
        raise ModelDirError(
            f"preset {preset} starts from pretrained encoders, Q-Formers and a Vicuna: pass --init with a "
            "BuboGPT model directory converted from the original checkpoints"
        )
    if init is not None and not (init / CONFIG_FILE).is_file():
        raise ModelDirError(f"--init {init} is not a BuboGPT model directory (no {CONFIG_FILE})")


def build_initial_model(preset: str, out_dir: Path, init: Path | None, seed: int) -> Path:
    """OUT/init: the first stage's starting model (tiny: the shipped pretrained tiny components,
    `load_pretrained_tiny`; 7b/13b: a copy of --init)."""
    target = out_dir / "init"
    if (target / CONFIG_FILE).is_file():
        return target
    check_initial_model(preset, out_dir, init)
    with atomic_directory(target) as staging:
        if init is not None:
            shutil.copytree(init, staging, dirs_exist_ok=True)
        else:
            from bubogpt.pretraining.assets import load_pretrained_tiny

            write_model(load_pretrained_tiny(seed=seed), staging, include_llm=True)
    return target


def export_model(checkpoint: str | Path, out_dir: Path) -> Path:
    """OUT/model (what serving loads): the final checkpoint's model, LoRA merged into the LLM.
    `checkpoint`: a checkpoint folder's location, a local path or a storage URI (`--storage`)."""
    from workflows.run_storage import local_folder

    with local_folder(f"{checkpoint}/{MODEL_DIR}") as source, atomic_directory(Path(out_dir) / "model") as staging:
        if (source / LORA_DIR).is_dir():
            model = read_model(source, trainable_lora=False)
            model.llm = model.llm.merge_and_unload()
            save_model(model, staging, include_llm=True)
        else:
            shutil.copytree(source, staging, dirs_exist_ok=True)
    return Path(out_dir) / "model"


def _tensor_fingerprint(path: Path, prefix: str) -> str | None:
    from safetensors import safe_open

    if not path.is_file():
        return None
    digest = hashlib.sha1()
    with safe_open(str(path), framework="pt") as tensors:
        for key in sorted(k for k in tensors.keys() if k.startswith(prefix)):
            digest.update(key.encode())
            digest.update(tensors.get_tensor(key).float().numpy().tobytes())
    return digest.hexdigest()


def precomputed_tokens_match(manifest: dict, model_dir: Path) -> bool:
    """Precomputed encoder tokens are usable when they came from exactly this model's encoders."""
    features_model = manifest.get("features_model")
    if not manifest.get("features") or not features_model:
        return False
    ours, theirs = model_dir / WEIGHTS_FILE, Path(features_model) / WEIGHTS_FILE
    return all(
        _tensor_fingerprint(ours, prefix) == _tensor_fingerprint(theirs, prefix) is not None
        for prefix in ("audio_encoder.", "vision_encoder.")
    )
