"""Released-format checkpoint files built at test time, shared by tests/test_convert.py and
tests/test_released_end_to_end.py: random modules of chosen sizes saved as the original's files, and a
stand-in Vicuna directory."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bubogpt.config import AudioEncoderConfig, QFormerConfig, VisionEncoderConfig
from bubogpt.modeling_audio import ImageBindAudioEncoder
from bubogpt.modeling_qformer import MultimodalJoiner
from bubogpt.modeling_vision import EvaVisionEncoder
from bubogpt.tokenizer import build_tiny_tokenizer


def stand_in_vicuna(directory: Path, hidden: int, texts: list[str] | None = None) -> Path:
    """A small LlamaForCausalLM + tokenizer saved with save_pretrained: what a Vicuna directory is."""
    texts = texts or ["###Human: what is it? ###Assistant: a red circle and a dog barking."] * 8
    tokenizer = build_tiny_tokenizer(texts, 300 if len(texts) < 50 else 1024)
    torch.manual_seed(hidden)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


# --------------------------------------------------------------------------------------------------
# Fixtures of other sizes, written in the original formats
# --------------------------------------------------------------------------------------------------

# Our Q-Former names -> LAVIS's (the inverse of checkpoints/blip2.py's table), most specific first.
TO_LAVIS = [
    (".self_attn.out.", ".attention.output.dense."), (".self_attn.norm.", ".attention.output.LayerNorm."),
    (".self_attn.", ".attention.self."), (".cross_attn.out.", ".crossattention.output.dense."),
    (".cross_attn.norm.", ".crossattention.output.LayerNorm."), (".cross_attn.", ".crossattention.self."),
    (".ffn.fc1.", ".intermediate_query.dense."), (".ffn.fc2.", ".output_query.dense."),
    (".ffn.norm.", ".output_query.LayerNorm."),
]  # fmt: skip


def lavis_qformer(state: dict[str, torch.Tensor], prefix: str, text_side: bool) -> dict[str, torch.Tensor]:
    """A QFormer state -> `{prefix}Qformer.bert.*` + `{prefix}query_tokens`, optionally with text-side
    weights the loaders must ignore (as the released audio Q-Former carries)."""
    out = {}
    for name, tensor in state.items():
        if name == "query_tokens":
            out[prefix + name] = tensor
            continue
        for ours, theirs in TO_LAVIS:
            name = name.replace(ours, theirs)
        name = name.replace("layernorm.", "embeddings.LayerNorm.", 1) if name.startswith("layernorm.") else name
        out[f"{prefix}Qformer.bert.{name.replace('layers.', 'encoder.layer.', 1)}"] = tensor
    if text_side:
        hidden = state["query_tokens"].shape[-1]
        out[f"{prefix}Qformer.bert.embeddings.word_embeddings.weight"] = torch.randn(30, hidden)
        out[f"{prefix}Qformer.bert.encoder.layer.0.intermediate.dense.weight"] = torch.randn(7, hidden)
        out[f"{prefix}Qformer.cls.predictions.bias"] = torch.randn(30)
    return out


def write_released_fixture(directory: Path, audio: AudioEncoderConfig, vision: VisionEncoderConfig,
                           qformer: dict[str, QFormerConfig], llm_hidden: int, seed: int = 0) -> Path:
    """Random modules of these sizes, saved as the released files are, with io.pt computed by the
    modules themselves (the shared fixture pins our modules to the original's outputs)."""
    directory.mkdir(parents=True)
    torch.manual_seed(seed)
    audio_encoder, vision_encoder = ImageBindAudioEncoder(audio).eval(), EvaVisionEncoder(vision).eval()
    joiner = MultimodalJoiner(qformer["audio"], qformer["vision"], llm_hidden).eval()
    with torch.no_grad():
        for module in (audio_encoder, vision_encoder, joiner):
            for parameter in module.parameters():  # not LayerNorm's ones and zeros: every tensor matters
                parameter.normal_(0, 0.2 if parameter.ndim < 2 else 0.5 / parameter.shape[-1] ** 0.5).add_(
                    1.0 if parameter.ndim == 1 and parameter.shape[0] in (audio.embed_dim, vision.embed_dim) else 0.0)
    a = audio_encoder.state_dict()
    imagebind = {
        "modality_preprocessors.audio.rgbt_stem.proj.0.weight": a.pop("patch_embed.weight"),  # the nn.Sequential name
        "modality_preprocessors.audio.rgbt_stem.norm_layer.weight": a.pop("patch_norm.weight"),
        "modality_preprocessors.audio.rgbt_stem.norm_layer.bias": a.pop("patch_norm.bias"),
        "modality_preprocessors.audio.cls_token": a.pop("cls_token"),
        "modality_preprocessors.audio.pos_embedding_helper.pos_embed": a.pop("pos_embed"),
        "modality_postprocessors.audio.1.log_logit_scale": a.pop("log_logit_scale"),
        "modality_heads.audio.2.weight": torch.randn(16, audio.embed_dim),  # the head BuboGPT drops
        "modality_trunks.vision.blocks.0.attn.in_proj_weight": torch.randn(6, 2),  # another modality
    }
    imagebind.update({f"modality_trunks.audio.{k}": v for k, v in a.items()})
    torch.save(imagebind, directory / "imagebind_audio.pth")
    v = vision_encoder.state_dict()
    ln_vision = {k: v.pop(f"ln_vision.{k}") for k in ("weight", "bias")}
    v["mask_token_of_another_export"] = torch.zeros(1, 1, vision.embed_dim)  # unknown: listed and skipped
    torch.save(v, directory / "eva_vit.pth")
    j = joiner.state_dict()
    part = lambda prefix: {k[len(prefix):]: t for k, t in j.items() if k.startswith(prefix)}  # noqa: E731
    blip2 = lavis_qformer(part("qformers.vision."), "", text_side=True)
    blip2.update({f"ln_vision.{k}": t for k, t in ln_vision.items()})
    blip2["t5_proj.weight"] = torch.randn(4, qformer["vision"].hidden_size)  # a BLIP-2 part BuboGPT drops
    torch.save({"model": blip2}, directory / "blip2_pretrained.pth")
    # As in the shared fixture, the vision parts equal BLIP-2 + MiniGPT-4 (conformance checks both routes).
    projection = part("projections.vision.fc.")
    torch.save({"model": {f"llama_proj.{k}": t for k, t in projection.items()}, "optimizer_extra": torch.zeros(1)},
               directory / "minigpt4_proj.pth")  # fmt: skip
    release = lavis_qformer(part("qformers.audio."), "multimodal_joiner.modality_qformers.audio.", text_side=True)
    for modality in ("audio", "vision"):
        release.update({f"multimodal_joiner.modality_post_projectors.{modality}.{k}": t
                        for k, t in part(f"projections.{modality}.").items()})  # fmt: skip
    torch.save({"model": release}, directory / "bubogpt_release.pth")
    full = dict(release, **lavis_qformer(part("qformers.vision."), "multimodal_joiner.modality_qformers.vision.", False))
    torch.save({"model": full}, directory / "bubogpt_joiner.pth")
    generator = torch.Generator().manual_seed(seed)
    fbank = torch.randn(2, 3, 1, audio.num_mel_bins, audio.target_length, generator=generator)
    image = torch.randn(2, 3, vision.img_size, vision.img_size, generator=generator)
    with torch.no_grad():
        audio_tokens, vision_tokens = audio_encoder(fbank), vision_encoder(image)
        io = {"fbank": fbank, "image": image, "audio_tokens": audio_tokens, "vision_tokens": vision_tokens,
              "joiner_audio": joiner("audio", audio_tokens), "joiner_vision": joiner("vision", vision_tokens)}  # fmt: skip
    torch.save(io, directory / "io.pt")
    q = qformer["audio"]
    (directory / "config.json").write_text(json.dumps({
        "audio_embed_dim": audio.embed_dim, "audio_num_blocks": audio.num_blocks, "audio_num_heads": audio.num_heads,
        "eva_img_size": vision.img_size, "eva_patch_size": vision.patch_size, "eva_embed_dim": vision.embed_dim, "eva_depth": vision.depth,
        "eva_num_heads": vision.num_heads, "qformer_hidden": q.hidden_size, "qformer_layers": q.num_layers,
        "qformer_heads": q.num_heads, "qformer_intermediate": q.intermediate_size,
        "cross_attention_freq": q.cross_attention_freq, "num_query_token": q.num_query_token, "llm_hidden": llm_hidden,
    }))  # fmt: skip
    return directory


