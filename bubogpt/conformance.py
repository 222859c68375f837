"""Check this project's modules and loaders against fixtures saved by the original code.

    python -m bubogpt.conformance DIR

DIR holds tiny checkpoints in the original formats plus `io.pt` (inputs and the outputs the
original implementation computed) and `config.json` (their dimensions); see
`shared/golden/README.md`. A directory with `ram.pth` is a RAM tagger fixture instead.
Exits 0 only if every output is within 1e-4 (max absolute error, float32 on the CPU).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from bubogpt.checkpoints.blip2 import load_blip2_vision_qformer
from bubogpt.checkpoints.bubogpt_joiner import load_bubogpt_joiner
from bubogpt.checkpoints.eva_vit import load_eva_vit
from bubogpt.checkpoints.imagebind import load_imagebind_audio
from bubogpt.checkpoints.minigpt4 import load_minigpt4_projection
from bubogpt.config import AudioEncoderConfig, QFormerConfig, VisionEncoderConfig
from bubogpt.modeling_audio import ImageBindAudioEncoder
from bubogpt.modeling_qformer import MultimodalJoiner
from bubogpt.modeling_vision import EvaVisionEncoder

TOLERANCE = 1e-4


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

    audio_tokens = audio_encoder(io["fbank"])
    vision_tokens = vision_encoder(io["image"])
    errors = {
        "audio_tokens": max_error(audio_tokens, io["audio_tokens"], "audio_tokens"),
        "vision_tokens": max_error(vision_tokens, io["vision_tokens"], "vision_tokens"),
        "joiner_audio": max_error(joiner("audio", audio_tokens), io["joiner_audio"], "joiner_audio"),
        "joiner_vision": max_error(joiner("vision", vision_tokens), io["joiner_vision"], "joiner_vision"),
    }
    # The two routes must agree with each other, not only each with the fixture.
    errors["joiner_vision (blip2 + minigpt4 vs bubogpt_joiner)"] = max_error(
        joiner_from_blip2("vision", vision_tokens), joiner("vision", vision_tokens), "routes"
    )
    for name, error in errors.items():
        verdict = "ok" if error <= TOLERANCE else "FAIL"
        print(f"{name}: max abs error {error:.3e} [{verdict}]")
    return 0 if all(e <= TOLERANCE for e in errors.values()) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bubogpt.conformance", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", type=Path)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if (args.directory / "ram.pth").is_file():
        from bubogpt.grounding.ram_conformance import check_ram_fixture

        return check_ram_fixture(args.directory)
    return check_bubogpt_fixture(args.directory)


if __name__ == "__main__":
    sys.exit(main())
