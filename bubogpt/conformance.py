"""Check this project's modules and loaders against fixtures saved by the original code.

    python -m bubogpt.conformance DIR [--converted MODEL_DIR]

DIR holds tiny checkpoints in the original formats plus `io.pt` (inputs and the outputs the
original implementation computed) and `config.json` (their dimensions); see
`shared/golden/README.md`. A directory with `ram.pth` is a RAM tagger fixture instead.

Checked: each loader on its file; the joiner of `bubogpt_joiner.pth` (vision Q-Former inside), of
BLIP-2 + MiniGPT-4, and, when DIR has it, of `bubogpt_release.pth` (the released layout: no vision
Q-Former, which comes from BLIP-2). With `--converted`, also a model directory written by
`bubogpt convert` from DIR's files: its encoders and joiner must reproduce io.pt.
Exits 0 only if every output is within 1e-4 (max absolute error, float32 on the CPU); a file that
fails to load is named with its error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from bubogpt.checkpoints.blip2 import load_blip2_vision_qformer
from bubogpt.checkpoints.bubogpt_joiner import load_bubogpt_joiner
from bubogpt.checkpoints.common import CheckpointMismatchError
from bubogpt.checkpoints.eva_vit import load_eva_vit
from bubogpt.checkpoints.imagebind import load_imagebind_audio
from bubogpt.checkpoints.minigpt4 import load_minigpt4_projection
from bubogpt.config import AudioEncoderConfig, BuboGPTConfig, QFormerConfig, VisionEncoderConfig
from bubogpt.modeling_audio import ImageBindAudioEncoder
from bubogpt.modeling_qformer import MultimodalJoiner
from bubogpt.modeling_vision import EvaVisionEncoder

TOLERANCE = 1e-4
RELEASE_FILE = "bubogpt_release.pth"


def configs_from_fixture(fixture: dict, io: dict) -> tuple[AudioEncoderConfig, VisionEncoderConfig, QFormerConfig, QFormerConfig]:
    """Build component configs from the fixture's `config.json` (mel bins and frames from io.pt)."""
    mels, frames = io["fbank"].shape[-2:]
    audio = AudioEncoderConfig(
        embed_dim=fixture["audio_embed_dim"],
        num_blocks=fixture["audio_num_blocks"],
        num_heads=fixture["audio_num_heads"],
        num_mel_bins=mels,
        target_length=frames,
        drop_path=0.0,
    )
    vision = VisionEncoderConfig(
        img_size=fixture["eva_img_size"],
        patch_size=fixture.get("eva_patch_size", 14),
        embed_dim=fixture["eva_embed_dim"],
        depth=fixture["eva_depth"],
        num_heads=fixture["eva_num_heads"],
    )

    def qformer(encoder_width: int) -> QFormerConfig:
        return QFormerConfig(
            hidden_size=fixture["qformer_hidden"],
            num_layers=fixture["qformer_layers"],
            num_heads=fixture["qformer_heads"],
            intermediate_size=fixture["qformer_intermediate"],
            cross_attention_freq=fixture["cross_attention_freq"],
            num_query_token=fixture["num_query_token"],
            encoder_width=encoder_width,
        )

    return audio, vision, qformer(audio.embed_dim), qformer(vision.embed_dim)


def max_error(actual: torch.Tensor, expected: torch.Tensor, name: str) -> float:
    if actual.shape != expected.shape:
        raise ValueError(f"{name}: shape {tuple(actual.shape)} vs expected {tuple(expected.shape)}")
    return (actual.float() - expected.float()).abs().max().item()


def output_errors(audio_encoder, vision_encoder, joiner, io: dict) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """Max abs error of each io.pt output; also returns the encoders' tokens."""
    audio_tokens = audio_encoder(io["fbank"])
    vision_tokens = vision_encoder(io["image"])
    errors = {
        "audio_tokens": max_error(audio_tokens, io["audio_tokens"], "audio_tokens"),
        "vision_tokens": max_error(vision_tokens, io["vision_tokens"], "vision_tokens"),
        "joiner_audio": max_error(joiner("audio", audio_tokens), io["joiner_audio"], "joiner_audio"),
        "joiner_vision": max_error(joiner("vision", vision_tokens), io["joiner_vision"], "joiner_vision"),
    }
    return errors, audio_tokens, vision_tokens


@torch.no_grad()
def check_bubogpt_fixture(directory: Path) -> int:
    fixture = json.loads((directory / "config.json").read_text())
    io = torch.load(directory / "io.pt", map_location="cpu", weights_only=True)
    audio_cfg, vision_cfg, audio_q, vision_q = configs_from_fixture(fixture, io)
    llm_hidden = fixture["llm_hidden"]

    audio_encoder = ImageBindAudioEncoder(audio_cfg).eval()
    load_imagebind_audio(audio_encoder, directory / "imagebind_audio.pth")
    vision_encoder = EvaVisionEncoder(vision_cfg).eval()
    load_eva_vit(vision_encoder, directory / "eva_vit.pth")

    # Route 1: the released BuboGPT joiner file alone.
    joiner = MultimodalJoiner(audio_q, vision_q, llm_hidden).eval()
    load_bubogpt_joiner(joiner, directory / "bubogpt_joiner.pth")
    # Route 2: the vision joiner from BLIP-2 + MiniGPT-4 (also supplies ln_vision).
    joiner_from_blip2 = MultimodalJoiner(audio_q, vision_q, llm_hidden).eval()
    load_blip2_vision_qformer(joiner_from_blip2.qformers["vision"], vision_encoder, directory / "blip2_pretrained.pth")
    load_minigpt4_projection(joiner_from_blip2.projections["vision"], directory / "minigpt4_proj.pth")

    errors, audio_tokens, vision_tokens = output_errors(audio_encoder, vision_encoder, joiner, io)
    # The two routes must agree with each other, not only each with the fixture.
    errors["joiner_vision (blip2 + minigpt4 vs bubogpt_joiner)"] = max_error(
        joiner_from_blip2("vision", vision_tokens), joiner("vision", vision_tokens), "routes"
    )
    failed_files = []
    # Route 3: the file as released, its vision Q-Former from BLIP-2 (as the original's eval config).
    if (directory / RELEASE_FILE).is_file():
        released = MultimodalJoiner(audio_q, vision_q, llm_hidden).eval()
        try:
            load_bubogpt_joiner(released, directory / RELEASE_FILE, blip2=directory / "blip2_pretrained.pth")
        except (CheckpointMismatchError, FileNotFoundError) as error:
            print(f"{RELEASE_FILE}: cannot load: {error} [FAIL]")
            failed_files.append(RELEASE_FILE)
        else:
            for modality, tokens in (("audio", audio_tokens), ("vision", vision_tokens)):
                name = f"joiner_{modality}"
                errors[f"{name} ({RELEASE_FILE} + blip2_pretrained.pth)"] = max_error(
                    released(modality, tokens), io[name], name
                )
    for name, error in errors.items():
        verdict = "ok" if error <= TOLERANCE else "FAIL"
        print(f"{name}: max abs error {error:.3e} [{verdict}]")
    return 0 if all(e <= TOLERANCE for e in errors.values()) and not failed_files else 1


@torch.no_grad()
def check_converted(directory: Path, converted: Path) -> int:
    """A model directory written by `bubogpt convert` from DIR's files reproduces io.pt's outputs.
    Only its encoders and joiner are read (float32); the LLM it references is not loaded."""
    from bubogpt.checkpoints.native import CONFIG_FILE, WEIGHTS_FILE, load_weights

    io = torch.load(directory / "io.pt", map_location="cpu", weights_only=True)
    try:
        config = BuboGPTConfig.load(converted / CONFIG_FILE)
        audio_encoder = ImageBindAudioEncoder(config.audio).eval()
        vision_encoder = EvaVisionEncoder(config.vision).eval()
        joiner = MultimodalJoiner(config.audio_qformer, config.vision_qformer, config.llm.hidden_size).eval()
        for prefix, module in (("audio_encoder.", audio_encoder), ("vision_encoder.", vision_encoder), ("joiner.", joiner)):
            load_weights(module, converted / WEIGHTS_FILE, prefix)
    except (CheckpointMismatchError, FileNotFoundError, ValueError) as error:
        print(f"{converted}: cannot load: {error} [FAIL]")
        return 1
    errors, _, _ = output_errors(audio_encoder, vision_encoder, joiner, io)
    for name, error in errors.items():
        verdict = "ok" if error <= TOLERANCE else "FAIL"
        print(f"converted {name} ({converted.name}): max abs error {error:.3e} [{verdict}]")
    return 0 if all(e <= TOLERANCE for e in errors.values()) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bubogpt.conformance", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", type=Path)
    parser.add_argument("--converted", type=Path, help="a model directory `bubogpt convert` wrote from DIR's files")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if (args.directory / "ram.pth").is_file():
        from bubogpt.grounding.ram_conformance import check_ram_fixture

        return check_ram_fixture(args.directory)
    try:
        status = check_bubogpt_fixture(args.directory)
    except (CheckpointMismatchError, FileNotFoundError) as error:  # the message names the file
        print(f"cannot load: {error} [FAIL]")
        return 1
    if args.converted is not None:
        status = max(status, check_converted(args.directory, args.converted))
    return status


if __name__ == "__main__":
    sys.exit(main())
