"""The released BuboGPT checkpoints -> this project's model directory (bubogpt/checkpoints/native.py).

    imagebind_huge.pth               -> audio_encoder.*                    checkpoints/imagebind.py
    eva_vit_g.pth                    -> vision_encoder.* (but ln_vision)   checkpoints/eva_vit.py
    blip2_pretrained_flant5xxl.pth   -> vision_encoder.ln_vision.*, and joiner.qformers.vision.*
                                        when the BuboGPT file has none      checkpoints/blip2.py
    bubogpt_7b.pth                   -> joiner.*                           checkpoints/bubogpt_joiner.py
    prerained_minigpt4_7b.pth (opt.) -> joiner.projections.vision.* when
                                        the BuboGPT file has none           checkpoints/minigpt4.py
    a Vicuna directory               -> the LLM: referenced by path (or copied with copy_llm)

Every dimension comes from the tensors' shapes (and the LLM's config.json), so the same code
converts the tiny conformance fixtures and the real 7B/13B files. Head counts are the one thing no
weight shape holds: by default they are width / the released head width (64 for ImageBind's audio
trunk and the Q-Formers, 88 for EVA ViT-g), or given explicitly (`HeadCounts`).

A set of files that do not fit together is refused before anything is written (`ConversionError`,
naming the files and the widths): a 5120-wide projection with a 4096-wide LLM, a Q-Former that
attends to tokens of another width than its encoder's, and so on. Then the whole state is checked
against the model built on the meta device, key by key and shape by shape.

Memory: the sources are memory-mapped (`torch.load(mmap=True)`), the key tables only rename, and the
output is written one tensor at a time (`write_safetensors`): a 7B conversion never holds a second
copy of the weights (the LLM itself is not read at all unless copied, and then file by file).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from bubogpt.atomic import atomic_directory
from bubogpt.checkpoints.blip2 import convert_blip2
from bubogpt.checkpoints.bubogpt_joiner import complete_joiner_state, convert_bubogpt_joiner
from bubogpt.checkpoints.common import CheckpointMismatchError, check_state_shapes, load_torch_file, write_safetensors
from bubogpt.checkpoints.eva_vit import convert_eva_vit
from bubogpt.checkpoints.imagebind import convert_imagebind_audio
from bubogpt.checkpoints.native import CONFIG_FILE, LLM_DIR, WEIGHTS_FILE
from bubogpt.config import (AudioEncoderConfig, BuboGPTConfig, LLMConfig, QFormerConfig, VisionEncoderConfig,
                            bubogpt_7b, bubogpt_13b)  # fmt: skip

REPORT_FILE = "conversion.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FROZEN_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# Released head widths: ImageBind-H audio 768 / 12, EVA ViT-g 1408 / 16, BERT-base Q-Former 768 / 12.
AUDIO_HEAD_WIDTH, VISION_HEAD_WIDTH, QFORMER_HEAD_WIDTH = 64, 88, 64
# Not in any weight shape either: the audio stem's stride and the fbank it was trained on.
AUDIO_STRIDE, AUDIO_MEL_BINS, AUDIO_FRAMES = 10, 128, 204


class ConversionError(CheckpointMismatchError):
    """The given files do not form one model; the message names the files and the dimensions."""


@dataclass
class ReleasedFiles:
    imagebind: Path  # imagebind_huge.pth
    eva: Path  # eva_vit_g.pth
    blip2: Path  # blip2_pretrained_flant5xxl.pth
    bubogpt: Path  # bubogpt_7b.pth (or a stage-1 / re-exported joiner file)
    llm: Path  # a Hugging Face causal-LM directory (Vicuna v0)
    minigpt4: Path | None = None  # prerained_minigpt4_7b.pth, for a file without the vision projection

    def __post_init__(self) -> None:
        for name in ("imagebind", "eva", "blip2", "bubogpt", "llm", "minigpt4"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, Path(value))
        missing = [f"{name}: {path}" for name, path in self.files().items() if not path.is_file()]
        if missing:
            raise FileNotFoundError(f"checkpoint files not found: {missing}")
        if not (self.llm / "config.json").is_file():
            raise FileNotFoundError(f"{self.llm} is not a Hugging Face model directory (no config.json)")

    def files(self) -> dict[str, Path]:
        names = ("imagebind", "eva", "blip2", "bubogpt", "minigpt4")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


@dataclass
class HeadCounts:
    """Attention heads, which no weight shape holds; None = width / the released head width."""

    audio: int | None = None
    vision: int | None = None
    qformer: int | None = None


@dataclass
class ConversionReport:
    out: str
    preset: str
    dtype: str
    llm: str  # the referenced directory, or "llm/" when copied
    sources: dict[str, str] = field(default_factory=dict)  # part -> the file(s) it came from
    ignored: dict[str, int] = field(default_factory=dict)  # file -> keys known and not used
    unexpected: dict[str, list[str]] = field(default_factory=dict)  # file -> unknown keys, skipped
    tensors: int = 0
    bytes: int = 0

    def summary(self) -> str:
        lines = [f"{self.out}: preset {self.preset}, {self.tensors} tensors ({self.bytes / 2**20:.1f} MiB, "
                 f"encoders in {self.dtype}, joiner in fp32), LLM {self.llm}"]  # fmt: skip
        lines += [f"  {part}: {source}" for part, source in self.sources.items()]
        lines += [f"  {name}: {count} keys not used (known)" for name, count in self.ignored.items() if count]
        lines += [f"  {name}: {len(keys)} unknown keys skipped: {keys[:5]}" for name, keys in self.unexpected.items() if keys]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Files -> one state dict in BuboGPT's names (tensors memory-mapped, only renamed)
# --------------------------------------------------------------------------------------------------


def released_state(files: ReleasedFiles) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """All non-LLM weights of the model, named as `BuboGPT.state_dict()` names them."""
    report = ConversionReport(out="", preset="", dtype="", llm=str(files.llm))
    raw = {name: load_torch_file(path, mmap=True) for name, path in files.files().items()}
    names = {name: path.name for name, path in files.files().items()}
    state: dict[str, torch.Tensor] = {}

    audio, ignored, unexpected = convert_imagebind_audio(raw["imagebind"])
    state.update({f"audio_encoder.{k}": v for k, v in audio.items()})
    report.sources["audio encoder"] = names["imagebind"]
    report.ignored[names["imagebind"]] = len(ignored)
    report.unexpected[names["imagebind"]] = unexpected

    patches = _grid_tokens(raw["eva"].get("pos_embed"), names["eva"], "pos_embed") - 1
    vision, ignored = convert_eva_vit(raw["eva"], patches)
    state.update({f"vision_encoder.{k}": v for k, v in vision.items()})
    report.ignored[names["eva"]] = len(ignored)

    _, ln_vision, blip2_ignored = convert_blip2(raw["blip2"])
    state.update({f"vision_encoder.ln_vision.{k}": v for k, v in ln_vision.items()})
    report.sources["vision encoder"] = f"{names['eva']} + ln_vision from {names['blip2']}"

    joiner, ignored, unexpected = convert_bubogpt_joiner(raw["bubogpt"])
    minigpt4 = (raw["minigpt4"], names["minigpt4"]) if "minigpt4" in raw else None
    joiner, origins, _ = complete_joiner_state(joiner, names["bubogpt"], (raw["blip2"], names["blip2"]), minigpt4)
    state.update({f"joiner.{k}": v for k, v in joiner.items()})
    report.sources.update(origins)
    report.ignored[names["bubogpt"]] = len(ignored)
    report.unexpected[names["bubogpt"]] = unexpected
    report.ignored[names["blip2"]] = len(blip2_ignored)
    if minigpt4 is not None and origins["vision projection"] != names["minigpt4"]:
        report.sources["not used"] = f"{names['minigpt4']} ({names['bubogpt']} has its own vision projection)"
    return state, report


def _grid_tokens(pos_embed: torch.Tensor | None, file: str, key: str) -> int:
    if pos_embed is None or pos_embed.ndim != 3:
        raise ConversionError(f"{file}: no {key} of shape (1, tokens, width); is it an EVA ViT state dict?")
    return pos_embed.shape[1]


# --------------------------------------------------------------------------------------------------
# Shapes -> config, with the cross-file checks
# --------------------------------------------------------------------------------------------------


def _count(state: dict[str, torch.Tensor], template: str) -> int:
    """How many consecutive i have template.format(i) in state."""
    count = 0
    while template.format(count) in state:
        count += 1
    return count


def _heads(width: int, given: int | None, head_width: int, what: str) -> int:
    heads = given if given is not None else width // head_width
    if heads < 1 or width % heads:
        hint = "" if given is not None else f" (width / the released head width {head_width})"
        raise ConversionError(
            f"{what}: {heads} heads{hint} do not divide its width {width}; give the head count explicitly"
        )
    return heads


def _need(state: dict[str, torch.Tensor], key: str, file: str) -> torch.Tensor:
    if key not in state:
        raise ConversionError(f"{file}: has no tensor for {key} (named as this project names it)")
    return state[key]


def infer_audio_config(state: dict[str, torch.Tensor], file: str, heads: int | None) -> AudioEncoderConfig:
    stem = _need(state, "audio_encoder.patch_embed.weight", file)  # (D, 1, k, k)
    width, kernel = stem.shape[0], stem.shape[-1]
    blocks = _count(state, "audio_encoder.blocks.{}.norm_1.weight")
    hidden = _need(state, "audio_encoder.blocks.0.mlp.fc1.weight", file).shape[0]
    config = AudioEncoderConfig(
        embed_dim=width, num_blocks=blocks, num_heads=_heads(width, heads, AUDIO_HEAD_WIDTH, f"{file} audio trunk"),
        mlp_ratio=hidden / width, kernel_size=kernel, stride=AUDIO_STRIDE,
        num_mel_bins=AUDIO_MEL_BINS, target_length=AUDIO_FRAMES,
    )  # fmt: skip
    tokens = _need(state, "audio_encoder.pos_embed", file).shape[1]
    if tokens != config.num_patches + 1:
        raise ConversionError(
            f"{file}: the audio position embedding has {tokens} positions, but a {AUDIO_MEL_BINS}x{AUDIO_FRAMES} "
            f"fbank with a {kernel}x{kernel} stem of stride {AUDIO_STRIDE} gives {config.num_patches} patches + CLS"
        )
    return config


def infer_vision_config(state: dict[str, torch.Tensor], file: str, heads: int | None) -> VisionEncoderConfig:
    stem = _need(state, "vision_encoder.patch_embed.proj.weight", file)  # (D, 3, p, p)
    width, patch = stem.shape[0], stem.shape[-1]
    grid = round((_need(state, "vision_encoder.pos_embed", file).shape[1] - 1) ** 0.5)
    hidden = _need(state, "vision_encoder.blocks.0.mlp.fc1.weight", file).shape[0]
    # EVA's MLP width is int(width * 4.3637); keep that ratio when it gives this width.
    released = VisionEncoderConfig().mlp_ratio
    ratio = released if int(width * released) == hidden else (hidden + 0.5) / width
    return VisionEncoderConfig(
        img_size=grid * patch, patch_size=patch, embed_dim=width, depth=_count(state, "vision_encoder.blocks.{}.norm1.weight"),
        num_heads=_heads(width, heads, VISION_HEAD_WIDTH, f"{file} EVA ViT"), mlp_ratio=ratio,
    )  # fmt: skip


def infer_qformer_config(state: dict[str, torch.Tensor], modality: str, file: str, heads: int | None) -> QFormerConfig:
    prefix = f"joiner.qformers.{modality}."
    queries = _need(state, prefix + "query_tokens", file)  # (1, Q, H)
    hidden = queries.shape[-1]
    layers = _count(state, prefix + "layers.{}.self_attn.query.weight")
    cross = [i for i in range(layers) if f"{prefix}layers.{i}.cross_attn.key.weight" in state]
    if not cross or cross[0] != 0:
        raise ConversionError(f"{file}: the {modality} Q-Former has no cross-attention on layer 0 (layers with it: {cross})")
    freq = cross[1] if len(cross) > 1 else layers
    if cross != [i for i in range(layers) if i % freq == 0]:
        raise ConversionError(f"{file}: the {modality} Q-Former's cross-attention layers {cross} are not every n-th layer")
    return QFormerConfig(
        hidden_size=hidden, num_layers=layers, num_heads=_heads(hidden, heads, QFORMER_HEAD_WIDTH, f"{file} {modality} Q-Former"),
        intermediate_size=_need(state, prefix + "layers.0.ffn.fc1.weight", file).shape[0],
        cross_attention_freq=freq, num_query_token=queries.shape[1],
        encoder_width=state[f"{prefix}layers.0.cross_attn.key.weight"].shape[1],
    )  # fmt: skip


def read_llm_config(directory: Path) -> LLMConfig:
    """The LLM's sizes from its config.json (the weights are not read)."""
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(directory, local_files_only=True)
    return LLMConfig(
        path=str(directory.resolve()), hidden_size=hf.hidden_size, num_layers=hf.num_hidden_layers,
        num_heads=hf.num_attention_heads, num_kv_heads=getattr(hf, "num_key_value_heads", None),
        intermediate_size=hf.intermediate_size, vocab_size=hf.vocab_size,
        max_position_embeddings=hf.max_position_embeddings, rms_norm_eps=getattr(hf, "rms_norm_eps", 1e-6),
    )  # fmt: skip


def infer_config(state: dict[str, torch.Tensor], names: dict[str, str], llm: LLMConfig, origins: dict[str, str],
                 heads: HeadCounts | None = None) -> BuboGPTConfig:
    """A BuboGPTConfig from the shapes (`state` in BuboGPT's names; meta tensors will do), after
    checking that the parts fit together and with `llm`. `names`: file name per source
    ("imagebind", "eva", "blip2", "bubogpt"); `origins`: the file each joiner part came from
    (`ConversionReport.sources`). Both only serve the messages."""
    heads = heads or HeadCounts()
    name = names
    audio = infer_audio_config(state, name["imagebind"], heads.audio)
    vision = infer_vision_config(state, name["eva"], heads.vision)
    ln_width = _need(state, "vision_encoder.ln_vision.weight", name["blip2"]).shape[0]
    if ln_width != vision.embed_dim:
        raise ConversionError(f"{name['blip2']}: ln_vision is {ln_width} wide, but the EVA ViT in {name['eva']} is {vision.embed_dim} wide")
    qformer_files = {m: origins[f"{m} Q-Former"] for m in ("audio", "vision")}
    qformers = {m: infer_qformer_config(state, m, qformer_files[m], heads.qformer) for m in ("audio", "vision")}
    encoders = {"audio": (audio.embed_dim, f"the ImageBind audio trunk in {name['imagebind']}"),
                "vision": (vision.embed_dim, f"the EVA ViT in {name['eva']}")}  # fmt: skip
    for modality, qformer in qformers.items():
        width, encoder = encoders[modality]
        if qformer.encoder_width != width:
            raise ConversionError(
                f"the {modality} Q-Former in {qformer_files[modality]} attends to {qformer.encoder_width}-wide tokens, "
                f"but {encoder} is {width} wide"
            )
    for modality, qformer in qformers.items():
        origin = origins[f"{modality} projection"]
        out_width, in_width = _need(state, f"joiner.projections.{modality}.fc.weight", origin).shape
        if in_width != qformer.hidden_size:
            raise ConversionError(
                f"the {modality} projection in {origin} takes {in_width}-wide queries, but its Q-Former ({qformer_files[modality]}) "
                f"is {qformer.hidden_size} wide"
            )
        if out_width != llm.hidden_size:
            raise ConversionError(
                f"the {modality} projection in {origin} maps to {out_width}, but the language model in {llm.path} has hidden "
                f"size {llm.hidden_size} (projections and LLM must come from the same model size: 4096 = 7B, 5120 = 13B)"
            )
    config = BuboGPTConfig(audio=audio, vision=vision, audio_qformer=qformers["audio"], vision_qformer=qformers["vision"],
                           llm=llm, preset="custom")  # fmt: skip
    for preset in (bubogpt_7b(), bubogpt_13b()):
        if _same_sizes(config, preset):
            config.preset, config.max_txt_len = preset.preset, preset.max_txt_len
    return config


def _same_sizes(config: BuboGPTConfig, preset: BuboGPTConfig) -> bool:
    ours, theirs = config.to_dict(), preset.to_dict()
    ours["llm"], theirs["llm"] = config.llm.hidden_size, preset.llm.hidden_size
    keys = ("audio", "vision", "audio_qformer", "vision_qformer", "llm")
    return all(_comparable(ours[k]) == _comparable(theirs[k]) for k in keys)


def _comparable(value):
    if isinstance(value, dict):
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in value.items() if k not in ("drop_path", "dropout")}
    return value


def check_against_model(state: dict[str, torch.Tensor], config: BuboGPTConfig) -> tuple[list[str], list[str]]:
    """Every non-LLM key of the model built from `config` (on the meta device: no memory) must be in
    `state` with its shape. Returns (the model's keys in order, the keys of `state` it has no place
    for: skipped and reported)."""
    from bubogpt.modeling_bubogpt import BuboGPT

    sizes = BuboGPTConfig.from_dict(config.to_dict())
    sizes.llm.path = None
    with torch.device("meta"):
        model = BuboGPT.build(sizes, dtype=torch.float32)
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith("llm.")}
    check_state_shapes(expected, state, "converted checkpoints")
    return list(expected), sorted(k for k in state if k not in expected)


# --------------------------------------------------------------------------------------------------
# Writing the model directory
# --------------------------------------------------------------------------------------------------


def convert_released(
    files: ReleasedFiles,
    out: str | Path,
    dtype: str = "fp32",
    copy_llm: bool = False,
    heads: HeadCounts | None = None,
    overwrite: bool = False,
) -> ConversionReport:
    """Write the native model directory `out` from the released files; returns what was done.

    `dtype` is the storage dtype of the frozen encoders (the joiner, which trains, stays float32;
    the released joiner file is float32 too). The LLM is referenced by its absolute path unless
    `copy_llm`. Nothing is left at `out` if the conversion fails."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite to replace it)")
    state, report = released_state(files)
    names = {key: path.name for key, path in files.files().items()}
    config = infer_config(state, names, read_llm_config(files.llm), report.sources, heads)
    order, extra = check_against_model(state, config)
    source_of = {"audio_encoder.": names["imagebind"], "vision_encoder.": names["eva"], "joiner.": names["bubogpt"]}
    for key in extra:  # e.g. EVA parts of another export: listed, not written
        file = next((f for prefix, f in source_of.items() if key.startswith(prefix)), "converted")
        report.unexpected.setdefault(file, []).append(key)

    with atomic_directory(out) as staging:
        target = DTYPES[dtype]
        frozen = ("audio_encoder.", "vision_encoder.")
        write_safetensors(
            staging / WEIGHTS_FILE, {k: state[k] for k in order},
            dtype_of=lambda name, tensor: target if name.startswith(frozen) else torch.float32,
            metadata={"format": "bubogpt", "preset": config.preset, "converted_from": json.dumps(report.sources)},
        )  # fmt: skip
        if copy_llm:
            shutil.copytree(files.llm, staging / LLM_DIR)
            config.llm.path = None  # the directory's own llm/
        config.save(staging / CONFIG_FILE)
        report.out, report.preset, report.dtype = str(out), config.preset, dtype
        report.llm = f"{LLM_DIR}/ (copied from {files.llm})" if copy_llm else str(files.llm.resolve())
        report.tensors = len(order)
        report.bytes = (staging / WEIGHTS_FILE).stat().st_size
        (staging / REPORT_FILE).write_text(json.dumps(asdict(report), indent=2) + "\n")
    return report


# --------------------------------------------------------------------------------------------------
# The grounding models: RAM, Grounding DINO, SAM -> the directory serving takes as `grounding_dir`
# --------------------------------------------------------------------------------------------------

GROUNDING_MANIFEST = "grounding.json"  # also read by bubogpt/grounding/pipeline.py
GROUNDING_FILES = {
    "ram": "ram.safetensors", "ram_tags": "ram_tags.txt", "ram_thresholds": "ram_tag_thresholds.txt",
    "grounding_dino": "grounding_dino.safetensors", "bert": "bert", "sam": "sam.safetensors",
}  # fmt: skip


@dataclass
class GroundingFiles:
    ram: Path  # ram_swin_large_14m.pth (`tagging_head.*` or the older `vision_multi.*`)
    gdino: Path  # groundingdino_swint_ogc.pth
    sam: Path  # sam_vit_h_4b8939.pth
    bert: Path  # a local bert-base-uncased directory (Grounding DINO's text side: config, tokenizer)
    ram_tags: Path | None = None  # ram_tag_list.txt; default: beside the RAM file
    ram_thresholds: Path | None = None  # ram_tag_list_threshold.txt; default: beside the RAM file
    ram_config: Path | None = None  # sizes no shape holds (tagging-head heads; default: the released 4)

    def __post_init__(self) -> None:
        for name in ("ram", "gdino", "sam", "bert", "ram_tags", "ram_thresholds", "ram_config"):
            if getattr(self, name) is not None:
                setattr(self, name, Path(getattr(self, name)))
        self.ram_tags = self.ram_tags or self.ram.parent / "ram_tag_list.txt"
        self.ram_thresholds = self.ram_thresholds or self.ram.parent / "ram_tag_list_threshold.txt"
        missing = [str(p) for p in (self.ram, self.gdino, self.sam, self.ram_tags, self.ram_thresholds) if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"grounding files not found: {missing}")


def convert_grounding(files: GroundingFiles, out: str | Path, dtype: str = "fp32", overwrite: bool = False) -> dict:
    """Write the grounding directory: each model's tensors in safetensors (the tagger's tagging path
    only: RAM's captioning branch is dropped), the tag list and thresholds, the BERT directory, and
    `grounding.json` with every size (inferred from the shapes) and the detector settings.
    Each model is loaded once, strictly, through its own loader, written, and dropped before the
    next; nothing is left at `out` if one fails."""
    from bubogpt.grounding.detector import DetectorConfig, check_bert_dir, load_original_grounding_dino
    from bubogpt.grounding.ram_checkpoint import load_ram_tagger
    from bubogpt.grounding.segmenter import infer_sam_config, load_sam

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite to replace it)")
    check_bert_dir(files.bert)
    target = DTYPES[dtype]
    cast = lambda name, tensor: target if tensor.is_floating_point() else tensor.dtype  # noqa: E731
    metadata = {"format": "bubogpt-grounding"}
    manifest: dict = {"format": "bubogpt-grounding", "dtype": dtype}
    with atomic_directory(out) as staging:
        ram, _, report = load_ram_tagger(files.ram, files.ram_tags, files.ram_thresholds, files.ram_config)
        write_safetensors(staging / GROUNDING_FILES["ram"], ram.state_dict(), cast, metadata)
        manifest["ram"], manifest["ram_load_report"] = asdict(ram.config), report.summary()
        del ram
        dino = load_original_grounding_dino(files.gdino, files.bert)  # sizes from its shapes
        write_safetensors(staging / GROUNDING_FILES["grounding_dino"], dino.model.state_dict(), cast, metadata)
        manifest["grounding_dino"] = asdict(dino.config)
        del dino
        sam = load_sam(files.sam)  # sizes from its shapes
        write_safetensors(staging / GROUNDING_FILES["sam"], sam.state_dict(), cast, metadata)
        manifest["sam"] = infer_sam_config(sam.state_dict()).to_dict()
        del sam
        manifest["detector"] = asdict(DetectorConfig())  # the reference's thresholds and sizes
        manifest["sources"] = {"ram": files.ram.name, "ram_tags": files.ram_tags.name, "grounding_dino": files.gdino.name,
                               "bert": str(files.bert), "sam": files.sam.name}  # fmt: skip
        shutil.copy(files.ram_tags, staging / GROUNDING_FILES["ram_tags"])
        shutil.copy(files.ram_thresholds, staging / GROUNDING_FILES["ram_thresholds"])
        shutil.copytree(files.bert, staging / GROUNDING_FILES["bert"])
        (staging / GROUNDING_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
