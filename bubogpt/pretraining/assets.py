"""The shipped tiny components, in the original checkpoints' formats, and the model built from them.

    bubogpt/assets/tiny_imagebind/   imagebind_audio.pth    ImageBind layout (`imagebind_huge.pth`'s
                                                            audio keys), read by `load_imagebind_audio`
    bubogpt/assets/tiny_vision/      eva_vit.pth            EVA layout (`eva_vit_g.pth`), `load_eva_vit`
                                     blip2_pretrained.pth   BLIP-2 layout: the vision Q-Former (LAVIS
                                                            names) and `ln_vision`, `load_blip2_vision_qformer`
                                     minigpt4_proj.pth      MiniGPT-4 layout (`llama_proj`), `load_minigpt4_projection`
    bubogpt/assets/tiny_llm/         a Hugging Face Llama directory with its tokenizer (the Vicuna analogue)

Each folder also holds `config.json` (the component configs), `training_scores.json` and a README.
Tensors are stored in float16; the loaders cast them to the model's dtype.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bubogpt.config import AudioEncoderConfig, BuboGPTConfig, QFormerConfig, VisionEncoderConfig

ASSETS = Path(__file__).resolve().parent.parent / "assets"
AUDIO_DIR, VISION_DIR, LLM_DIR = ASSETS / "tiny_imagebind", ASSETS / "tiny_vision", ASSETS / "tiny_llm"
CONFIG_FILE = "config.json"
PROBE_HEADS = "probe_heads.pth"  # the pretraining's classification heads: how a test scores an encoder
# The vision phase's `ln_vision` (BLIP-2 keeps it beside the ViT, not in eva_vit.pth). The alignment
# phase writes it into `blip2_pretrained.pth`, where the BLIP-2 loader reads it.
LN_VISION_FILE = "ln_vision.pth"

# Ours -> LAVIS, the inverse of `checkpoints.blip2.QFORMER_RENAMES` (most specific first).
_TO_LAVIS = [
    ("layernorm.", "embeddings.LayerNorm."),
    (".self_attn.out.", ".attention.output.dense."),
    (".self_attn.norm.", ".attention.output.LayerNorm."),
    (".self_attn.", ".attention.self."),
    (".cross_attn.out.", ".crossattention.output.dense."),
    (".cross_attn.norm.", ".crossattention.output.LayerNorm."),
    (".cross_attn.", ".crossattention.self."),
    (".ffn.fc1.", ".intermediate_query.dense."),
    (".ffn.fc2.", ".output_query.dense."),
    (".ffn.norm.", ".output_query.LayerNorm."),
]
# Ours -> ImageBind, the inverse of `checkpoints.imagebind.KEY_TABLE` (ImageBind's own stem name).
_TO_IMAGEBIND = {
    "patch_embed.weight": "modality_preprocessors.audio.rgbt_stem.proj.0.weight",
    "patch_norm.weight": "modality_preprocessors.audio.rgbt_stem.norm_layer.weight",
    "patch_norm.bias": "modality_preprocessors.audio.rgbt_stem.norm_layer.bias",
    "cls_token": "modality_preprocessors.audio.cls_token",
    "pos_embed": "modality_preprocessors.audio.pos_embedding_helper.pos_embed",
    "log_logit_scale": "modality_postprocessors.audio.1.log_logit_scale",
}


def _half(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", torch.float16).contiguous() if v.is_floating_point() else v for k, v in state.items()}


def lavis_qformer_state(qformer_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our `QFormer` state dict -> `Qformer.bert.*` + `query_tokens` (BLIP-2's names)."""
    out = {}
    for name, value in qformer_state.items():
        if name == "query_tokens":
            out[name] = value
            continue
        lavis = name
        if lavis.startswith("layers."):
            lavis = "encoder.layer." + lavis[len("layers."):]
        for ours, theirs in _TO_LAVIS:
            if ours in lavis if ours.startswith(".") else lavis.startswith(ours):
                lavis = lavis.replace(ours, theirs, 1)
                break
        out[f"Qformer.bert.{lavis}"] = value
    return out


def save_audio_asset(encoder, out_dir: Path, heads=None) -> None:
    """The ImageBind-layout audio trunk (+ the pretraining's heads, `PROBE_HEADS`, to score it)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if heads is not None:
        torch.save(_half(heads.state_dict()), out_dir / PROBE_HEADS)
    state = {}
    for name, value in encoder.state_dict().items():
        key = _TO_IMAGEBIND.get(name, f"modality_trunks.audio.{name}")
        state[key] = value
    torch.save(_half(state), out_dir / "imagebind_audio.pth")
    (out_dir / CONFIG_FILE).write_text(json.dumps({"audio": encoder.config.__dict__}, indent=2, default=list))


def save_vision_encoder(encoder, heads, out_dir: Path) -> None:
    """The EVA-layout vision encoder alone (the vision pretraining's output; the alignment adds the
    Q-Former and projection) and the heads that score it (`PROBE_HEADS`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    vit = {k: v for k, v in encoder.state_dict().items() if not k.startswith("ln_vision.")}
    torch.save(_half(vit), out_dir / "eva_vit.pth")
    torch.save(_half({f"ln_vision.{k}": v for k, v in encoder.ln_vision.state_dict().items()}), out_dir / LN_VISION_FILE)
    torch.save(_half(heads.state_dict()), out_dir / PROBE_HEADS)
    (out_dir / CONFIG_FILE).write_text(json.dumps({"vision": encoder.config.__dict__}, indent=2, default=list))


def save_vision_asset(encoder, qformer, projection, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    vit = {k: v for k, v in encoder.state_dict().items() if not k.startswith("ln_vision.")}
    torch.save(_half(vit), out_dir / "eva_vit.pth")
    blip2 = lavis_qformer_state(qformer.state_dict())
    blip2.update({f"ln_vision.{k}": v for k, v in encoder.ln_vision.state_dict().items()})
    torch.save({"model": _half(blip2)}, out_dir / "blip2_pretrained.pth")
    proj = {f"llama_proj.{k}": v for k, v in projection.fc.state_dict().items()}
    torch.save({"model": _half(proj)}, out_dir / "minigpt4_proj.pth")
    configs = {"vision": encoder.config.__dict__, "vision_qformer": qformer.config.__dict__}
    (out_dir / CONFIG_FILE).write_text(json.dumps(configs, indent=2, default=list))


def save_llm_asset(llm, tokenizer, out_dir: Path) -> None:
    llm.to(torch.float16).save_pretrained(out_dir, safe_serialization=True)
    llm.float()
    tokenizer.save_pretrained(out_dir)


def read_component_configs(audio_dir: Path = AUDIO_DIR, vision_dir: Path = VISION_DIR):
    audio = json.loads((audio_dir / CONFIG_FILE).read_text())
    vision = json.loads((vision_dir / CONFIG_FILE).read_text())
    return (AudioEncoderConfig(**audio["audio"]), VisionEncoderConfig(**vision["vision"]),
            QFormerConfig(**vision["vision_qformer"]))  # fmt: skip


def load_pretrained_tiny(config: BuboGPTConfig | None = None, audio_dir: Path = AUDIO_DIR, vision_dir: Path = VISION_DIR,
                         llm_dir: Path = LLM_DIR, seed: int = 0):
    """A tiny BuboGPT whose encoders, vision Q-Former + projection and LLM are the shipped assets,
    read through the original-format loaders; the audio Q-Former and projection start random (stage 1
    trains them). `config` defaults to the `tiny` preset, which matches the assets."""
    from bubogpt.checkpoints.blip2 import load_blip2_vision_qformer
    from bubogpt.checkpoints.eva_vit import load_eva_vit
    from bubogpt.checkpoints.imagebind import load_imagebind_audio
    from bubogpt.checkpoints.minigpt4 import load_minigpt4_projection
    from bubogpt.config import tiny
    from bubogpt.llm import load_tokenizer
    from bubogpt.modeling_bubogpt import BuboGPT

    if config is None:  # the tiny preset's sizes, with the encoders and vision Q-Former the assets hold
        config = tiny()
        config.audio, config.vision, config.vision_qformer = read_component_configs(audio_dir, vision_dir)
    config.llm.path = str(llm_dir)
    torch.manual_seed(seed)
    model = BuboGPT.build(config, load_tokenizer(str(llm_dir)))
    load_imagebind_audio(model.audio_encoder, audio_dir / "imagebind_audio.pth")
    load_eva_vit(model.vision_encoder, vision_dir / "eva_vit.pth")
    load_blip2_vision_qformer(model.joiner.qformers["vision"], model.vision_encoder, vision_dir / "blip2_pretrained.pth")
    load_minigpt4_projection(model.joiner.projections["vision"], vision_dir / "minigpt4_proj.pth")
    return model


def _load_probe_heads(heads, folder: Path):
    from bubogpt.checkpoints.common import load_torch_file

    heads.load_state_dict({k: v.float() for k, v in load_torch_file(folder / PROBE_HEADS).items()})
    return heads.eval()


def load_vision_encoder(encoder, folder: Path) -> None:
    """The EVA-layout ViT of a vision folder into `encoder`, with its `ln_vision` from the vision
    phase's `ln_vision.pth` or the aligned asset's `blip2_pretrained.pth`."""
    from bubogpt.checkpoints.common import assign_state_dict, load_torch_file
    from bubogpt.checkpoints.eva_vit import load_eva_vit

    load_eva_vit(encoder, folder / "eva_vit.pth")
    norm_file = folder / LN_VISION_FILE if (folder / LN_VISION_FILE).is_file() else folder / "blip2_pretrained.pth"
    norm = {k[len("ln_vision."):]: v for k, v in load_torch_file(norm_file).items() if k.startswith("ln_vision.")}
    assign_state_dict(encoder.ln_vision, norm, f"ln_vision ({norm_file.name})")


def read_vision_encoder(folder: Path = VISION_DIR):
    """(vision encoder with its `ln_vision`, its scoring heads) from a vision folder."""
    from bubogpt.modeling_vision import EvaVisionEncoder
    from bubogpt.pretraining.tiny_components import VisionHeads

    config = VisionEncoderConfig(**json.loads((folder / CONFIG_FILE).read_text())["vision"])
    encoder = EvaVisionEncoder(config)
    load_vision_encoder(encoder, folder)
    return encoder.eval(), _load_probe_heads(VisionHeads(config.embed_dim), folder)


def model_for_alignment(encoder_dir: Path, llm_dir: Path = LLM_DIR, seed: int = 0):
    """The alignment phase's start: a tiny BuboGPT with the vision phase's encoder (+ ln_vision)
    and the pretrained LLM; the vision Q-Former and projection start random (the phase trains them)."""
    from bubogpt.config import tiny
    from bubogpt.llm import load_tokenizer
    from bubogpt.modeling_bubogpt import BuboGPT

    config = tiny()
    config.vision = VisionEncoderConfig(**json.loads((encoder_dir / CONFIG_FILE).read_text())["vision"])
    config.llm.path = str(llm_dir)
    torch.manual_seed(seed)
    model = BuboGPT.build(config, load_tokenizer(str(llm_dir)))
    load_vision_encoder(model.vision_encoder, encoder_dir)
    return model


def read_audio_encoder(folder: Path = AUDIO_DIR):
    """(audio encoder, its scoring heads) from an audio folder, through the ImageBind loader."""
    from bubogpt.checkpoints.imagebind import load_imagebind_audio
    from bubogpt.modeling_audio import ImageBindAudioEncoder
    from bubogpt.pretraining.tiny_components import AudioHeads

    config = AudioEncoderConfig(**json.loads((folder / CONFIG_FILE).read_text())["audio"])
    encoder = ImageBindAudioEncoder(config)
    load_imagebind_audio(encoder, folder / "imagebind_audio.pth")
    return encoder.eval(), _load_probe_heads(AudioHeads(config.embed_dim), folder)
