"""`bubogpt convert`: the released checkpoint files -> the native model directory.

On the shared conformance fixtures (in the original formats, outputs computed by the original code)
and on fixtures of other sizes built here: converted, the directory must reproduce the fixture's
outputs (`python -m bubogpt.conformance DIR --converted OUT`), load as a model whose LLM is the
referenced directory, and refuse files that do not fit together, naming them. The real 7B/13B sizes
are checked on the meta device (no memory).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import LlamaForCausalLM

from bubogpt.checkpoints.common import CheckpointMismatchError
from bubogpt.config import (AudioEncoderConfig, BuboGPTConfig, LLMConfig, QFormerConfig, VisionEncoderConfig,
                            bubogpt_7b, bubogpt_13b)  # fmt: skip
from bubogpt.convert import ConversionError, HeadCounts, ReleasedFiles, convert_released, infer_config
from released_fixtures import stand_in_vicuna, write_released_fixture

FIXTURE_HEADS = "audio=4,vision=4,qformer=2"  # the shared fixture's (config.json); no shape holds them


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def bubogpt_cli(capsys):
    """`bubogpt ARGS` in this process (the imports are already paid for); one test runs it as a
    subprocess, as a user does."""
    from workflows.cli import main

    def run(*args: str) -> Run:
        capsys.readouterr()
        code = main(list(args))
        out = capsys.readouterr()
        return Run(code, out.out, out.err)

    return run


@pytest.fixture
def conformance(capsys):
    """`python -m bubogpt.conformance FIXTURE --converted OUT` in this process."""
    from bubogpt.conformance import main

    def run(fixture: Path, converted: Path) -> Run:
        capsys.readouterr()
        code = main([str(fixture), "--converted", str(converted)])
        out = capsys.readouterr()
        return Run(code, out.out, out.err)

    return run


def convert_args(fixture: Path, llm: Path, out: Path, release: str = "bubogpt_release.pth", *extra: str) -> list[str]:
    return ["convert", "--imagebind", str(fixture / "imagebind_audio.pth"), "--eva", str(fixture / "eva_vit.pth"),
            "--blip2", str(fixture / "blip2_pretrained.pth"), "--bubogpt", str(fixture / release),
            "--llm", str(llm), "--out", str(out), *extra]  # fmt: skip


def other_sizes() -> tuple[AudioEncoderConfig, VisionEncoderConfig, dict[str, QFormerConfig]]:
    """Widths 48 (audio, Q-Formers) and 96 (EVA), patch 8 at 32 px, 3 Q-Former layers, 6 queries."""
    audio = AudioEncoderConfig(embed_dim=48, num_blocks=1, num_heads=3, drop_path=0.0)
    vision = VisionEncoderConfig(img_size=32, patch_size=8, embed_dim=96, depth=1, num_heads=6)
    qformer = QFormerConfig(hidden_size=48, num_layers=3, num_heads=3, intermediate_size=80, num_query_token=6)
    audio_q = QFormerConfig(**{**qformer.__dict__, "encoder_width": 48})
    vision_q = QFormerConfig(**{**qformer.__dict__, "encoder_width": 96})
    return audio, vision, {"audio": audio_q, "vision": vision_q}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Other-size fixture files, and stand-in Vicunas of width 96 (the fixture's) and 64."""
    root = tmp_path_factory.mktemp("convert")
    audio, vision, qformer = other_sizes()
    fixture = write_released_fixture(root / "fixture", audio, vision, qformer, llm_hidden=96, seed=3)
    return {"fixture": fixture, "llm96": stand_in_vicuna(root / "llm96", 96), "llm64": stand_in_vicuna(root / "llm64", 64),
            "llm48": stand_in_vicuna(root / "llm48", 48), "root": root}  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Converting and checking
# --------------------------------------------------------------------------------------------------


def test_convert_the_shared_fixtures_then_conformance_passes(golden_dir, built, tmp_path):
    # As a user runs them: `bubogpt convert ...`, then `python -m bubogpt.conformance FIXTURE --converted OUT`.
    out = tmp_path / "model"
    args = convert_args(golden_dir, built["llm48"], out, "bubogpt_release.pth",
                        "--minigpt4", str(golden_dir / "minigpt4_proj.pth"), "--num-heads", FIXTURE_HEADS)  # fmt: skip
    result = subprocess.run([sys.executable, "-m", "workflows.cli", *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "vision Q-Former: blip2_pretrained.pth" in result.stdout  # the released layout: from BLIP-2
    assert "minigpt4_proj.pth (bubogpt_release.pth has its own vision projection)" in result.stdout
    check = subprocess.run([sys.executable, "-m", "bubogpt.conformance", str(golden_dir), "--converted", str(out)],
                           capture_output=True, text=True, timeout=600)  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    converted = [line for line in check.stdout.splitlines() if line.startswith("converted ")]
    assert len(converted) == 4 and all(line.endswith("[ok]") for line in converted)
    assert "bubogpt_release.pth" in check.stdout  # the released layout is checked and named
    # The LLM is referenced, not copied; the config records the sizes read from the shapes.
    config = json.loads((out / "bubogpt_config.json").read_text())
    assert config["llm"]["path"] == str(built["llm48"].resolve()) and not (out / "llm").exists()
    assert (config["audio"]["embed_dim"], config["vision"]["img_size"], config["vision_qformer"]["num_query_token"]) == (64, 56, 4)
    report = json.loads((out / "conversion.json").read_text())
    assert report["ignored"]["imagebind_audio.pth"] == 3  # the audio head: known, not used


def test_conformance_fails_on_a_converted_directory_with_a_changed_weight(golden_dir, built, tmp_path, bubogpt_cli, conformance):
    out = tmp_path / "model"
    assert bubogpt_cli(*convert_args(golden_dir, built["llm48"], out, "bubogpt_release.pth", "--num-heads", FIXTURE_HEADS)).returncode == 0
    from safetensors.torch import load_file, save_file

    weights = load_file(out / "model.safetensors")
    weights["joiner.qformers.vision.layers.1.ffn.fc2.bias"][0] += 0.05  # of the vision Q-Former BLIP-2 supplied
    save_file(weights, out / "model.safetensors", metadata={"format": "bubogpt"})
    check = conformance(golden_dir, out)
    assert check.returncode == 1
    assert "converted joiner_vision (model): max abs error" in check.stdout and "FAIL" in check.stdout
    # Wrong head counts give another function of the same weights: caught too.
    wrong = tmp_path / "wrong_heads"
    assert bubogpt_cli(*convert_args(golden_dir, built["llm48"], wrong, "bubogpt_release.pth", "--num-heads", "audio=2,vision=4,qformer=2")).returncode == 0
    assert conformance(golden_dir, wrong).returncode == 1


def test_convert_fixtures_of_other_sizes_and_layouts(built, tmp_path, bubogpt_cli, conformance):
    fixture = built["fixture"]
    for release, extra in (("bubogpt_release.pth", ()), ("bubogpt_joiner.pth", ("--dtype", "fp32", "--copy-llm"))):
        out = tmp_path / release.split(".")[0]
        result = bubogpt_cli(*convert_args(fixture, built["llm96"], out, release, "--num-heads", "audio=3,vision=6,qformer=3", *extra))
        assert result.returncode == 0, result.stderr
        origin = "blip2_pretrained.pth" if release == "bubogpt_release.pth" else release
        assert f"vision Q-Former: {origin}" in result.stdout  # a file with its own vision Q-Former uses it
        check = conformance(fixture, out)
        assert check.returncode == 0, check.stdout + check.stderr
        config = BuboGPTConfig.load(out / "bubogpt_config.json")
        assert (config.audio.embed_dim, config.vision.embed_dim, config.vision.patch_size, config.vision.img_size) == (48, 96, 8, 32)
        assert (config.audio_qformer.num_layers, config.audio_qformer.num_query_token, config.llm.hidden_size) == (3, 6, 96)
        assert config.audio_qformer.cross_attention_freq == 2 and config.vision.mlp_hidden == int(96 * 4.3637)
    report = json.loads((tmp_path / "bubogpt_joiner" / "conversion.json").read_text())
    assert report["unexpected"]["eva_vit.pth"] == ["vision_encoder.mask_token_of_another_export"]  # listed, skipped
    assert (tmp_path / "bubogpt_joiner" / "llm" / "config.json").is_file()  # --copy-llm
    assert BuboGPTConfig.load(tmp_path / "bubogpt_joiner" / "bubogpt_config.json").llm.path is None


def test_the_vision_projection_comes_from_minigpt4_only_when_the_file_has_none(built, tmp_path):
    # Original: stage 2 starts from a stage-1 checkpoint (trainable parameters only: no vision parts)
    # with `proj_model` = MiniGPT-4 (train_configs/mmgpt4_stage2_mm.yaml:10-16); a file loaded after
    # it (`ckpt`, mm_gpt4.py:300-307) overrides it.
    fixture = built["fixture"]
    state = torch.load(fixture / "bubogpt_release.pth", weights_only=True)["model"]
    stage1 = {k: v for k, v in state.items() if ".vision." not in k}
    torch.save({"model": stage1}, tmp_path / "stage1.pth")
    other = {"llama_proj.weight": torch.randn(96, 48), "llama_proj.bias": torch.randn(96)}
    torch.save({"model": other}, tmp_path / "minigpt4.pth")
    args = ReleasedFiles(imagebind=fixture / "imagebind_audio.pth", eva=fixture / "eva_vit.pth", blip2=fixture / "blip2_pretrained.pth",
                         bubogpt=tmp_path / "stage1.pth", llm=built["llm96"])  # fmt: skip
    with pytest.raises(CheckpointMismatchError, match="no vision projection"):
        convert_released(args, tmp_path / "a", heads=HeadCounts(3, 6, 3))
    assert not (tmp_path / "a").exists()  # nothing half-written
    args.minigpt4 = tmp_path / "minigpt4.pth"
    report = convert_released(args, tmp_path / "b", heads=HeadCounts(3, 6, 3))
    assert report.sources["vision projection"] == "minigpt4.pth"
    args.bubogpt = fixture / "bubogpt_release.pth"
    report = convert_released(args, tmp_path / "c", heads=HeadCounts(3, 6, 3))
    assert report.sources["vision projection"] == "bubogpt_release.pth"
    for out, expected in (("b", other["llama_proj.weight"]), ("c", state["multimodal_joiner.modality_post_projectors.vision.fc.weight"])):
        with safe_open(str(tmp_path / out / "model.safetensors"), "pt") as weights:
            assert torch.equal(weights.get_tensor("joiner.projections.vision.fc.weight"), expected)


def test_the_converted_directory_loads_as_a_model_and_generates(golden_dir, built, tmp_path, bubogpt_cli):
    from bubogpt.checkpoints.native import load_model
    from bubogpt.conversation import instruction_prompt

    out = tmp_path / "model"
    assert bubogpt_cli(*convert_args(golden_dir, built["llm48"], out, "bubogpt_release.pth", "--num-heads", FIXTURE_HEADS, "--dtype", "bf16")).returncode == 0
    with safe_open(str(out / "model.safetensors"), "pt") as weights:
        assert weights.get_slice("vision_encoder.blocks.0.attn.qkv.weight").get_dtype() == "BF16"  # --dtype: encoders
        assert weights.get_slice("joiner.qformers.vision.query_tokens").get_dtype() == "F32"  # the joiner stays fp32
    model = load_model(out)
    llm = LlamaForCausalLM.from_pretrained(built["llm48"])
    assert torch.equal(model.llm.lm_head.weight, llm.lm_head.weight)  # the referenced Vicuna itself
    io = torch.load(golden_dir / "io.pt", weights_only=True)
    answers = model.generate([instruction_prompt(["audio", "vision"], "what is it?")], audio=io["fbank"][:1], image=io["image"][:1],
                             max_new_tokens=3)  # fmt: skip
    assert len(answers) == 1 and isinstance(answers[0], str)


# --------------------------------------------------------------------------------------------------
# Refused sets
# --------------------------------------------------------------------------------------------------


def test_a_projection_of_another_width_than_the_llm_is_refused(golden_dir, built, tmp_path, bubogpt_cli):
    # The fixture's projections map to 48; a 64-wide LLM is the miniature of a 13B file with a 7B Vicuna.
    result = bubogpt_cli(*convert_args(golden_dir, built["llm64"], tmp_path / "out", "bubogpt_release.pth", "--num-heads", FIXTURE_HEADS))
    assert result.returncode == 2
    assert "projection in bubogpt_release.pth maps to 48" in result.stderr and "hidden size 64" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_qformer_that_does_not_fit_its_encoder_is_refused(golden_dir, built, tmp_path, bubogpt_cli):
    # BLIP-2 of the other fixture: its vision Q-Former attends to 96-wide tokens, the shared EVA is 40 wide.
    args = convert_args(golden_dir, built["llm48"], tmp_path / "out", "bubogpt_release.pth", "--num-heads", FIXTURE_HEADS)
    args[args.index("--blip2") + 1] = str(built["fixture"] / "blip2_pretrained.pth")
    result = bubogpt_cli(*args)
    assert result.returncode == 2
    assert "ln_vision is 96 wide, but the EVA ViT in eva_vit.pth is 40 wide" in result.stderr
    # Same with a matching ln_vision: now the Q-Former itself is named.
    blip2 = torch.load(built["fixture"] / "blip2_pretrained.pth", weights_only=True)
    blip2["model"]["ln_vision.weight"], blip2["model"]["ln_vision.bias"] = torch.ones(40), torch.zeros(40)
    torch.save(blip2, tmp_path / "blip2_other.pth")
    args[args.index("--blip2") + 1] = str(tmp_path / "blip2_other.pth")
    result = bubogpt_cli(*args)
    assert result.returncode == 2
    assert "vision Q-Former in blip2_other.pth attends to 96-wide tokens, but the EVA ViT in eva_vit.pth is 40 wide" in result.stderr


def test_missing_and_mis_shaped_tensors_are_refused_naming_file_and_key(golden_dir, built, tmp_path, bubogpt_cli):
    state = torch.load(golden_dir / "bubogpt_release.pth", weights_only=True)
    del state["model"]["multimodal_joiner.modality_qformers.audio.Qformer.bert.encoder.layer.1.output_query.dense.weight"]
    torch.save(state, tmp_path / "broken.pth")
    args = convert_args(golden_dir, built["llm48"], tmp_path / "out", "bubogpt_release.pth", "--num-heads", FIXTURE_HEADS)
    args[args.index("--bubogpt") + 1] = str(tmp_path / "broken.pth")
    result = bubogpt_cli(*args)
    assert result.returncode == 2
    assert "joiner.qformers.audio.layers.1.ffn.fc2.weight (32, 64)" in result.stderr
    result = bubogpt_cli(*convert_args(golden_dir, built["llm48"], tmp_path / "x", "bubogpt_release.pth", "--num-heads", "audio=3"))
    assert result.returncode == 2 and "3 heads do not divide its width 64" in result.stderr


def test_real_7b_and_13b_sizes_are_inferred_with_the_released_head_counts():
    # The released files' shapes, on the meta device: nothing is allocated.
    from bubogpt.modeling_bubogpt import BuboGPT

    names = {"imagebind": "imagebind_huge.pth", "eva": "eva_vit_g.pth", "blip2": "blip2_pretrained_flant5xxl.pth",
             "bubogpt": "bubogpt_7b.pth"}  # fmt: skip
    origins = {"audio Q-Former": "bubogpt_7b.pth", "audio projection": "bubogpt_7b.pth",
               "vision Q-Former": "blip2_pretrained_flant5xxl.pth", "vision projection": "bubogpt_7b.pth"}  # fmt: skip
    for preset in (bubogpt_7b(), bubogpt_13b()):
        with torch.device("meta"):
            state = {k: v for k, v in BuboGPT.build(preset, dtype=torch.float32).state_dict().items() if not k.startswith("llm.")}
        config = infer_config(state, names, preset.llm, origins)
        assert config.preset == preset.preset and config.max_txt_len == preset.max_txt_len
        for part in ("audio", "vision", "audio_qformer", "vision_qformer"):
            ours, theirs = getattr(config, part).__dict__, getattr(preset, part).__dict__
            assert {k: v for k, v in ours.items() if k != "drop_path"} == {k: v for k, v in theirs.items() if k != "drop_path"}, part
        assert (config.audio.num_heads, config.vision.num_heads, config.vision_qformer.num_heads) == (12, 16, 12)
        # ... and the 13B projections with a 7B Vicuna (4096) are refused by name.
        if preset.preset == "13b":
            with pytest.raises(ConversionError, match="maps to 5120, but the language model .* has hidden size 4096"):
                infer_config(state, names, LLMConfig(path="vicuna-7b-v0"), origins)


# --------------------------------------------------------------------------------------------------
# convert-grounding: RAM, Grounding DINO, SAM -> serving's grounding_dir
# --------------------------------------------------------------------------------------------------

RAM_FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "golden" / "ram_tiny"


@pytest.fixture(scope="module")
def grounding_sources(tmp_path_factory):
    """Released-format files from each library's own builder at small sizes: RAM as the original code
    saved it (the golden fixture, here with the older `vision_multi.*` head name), Grounding DINO from
    groundingdino-py's builder ({"model": {"module." + key}}), SAM from segment-anything's (a bare
    state dict)."""
    from segment_anything.build_sam import _build_sam
    from transformers import BertConfig, BertModel, BertTokenizer

    from bubogpt.grounding.detector import OriginalGroundingDinoConfig, build_original_grounding_dino, write_detector_vocab

    root = tmp_path_factory.mktemp("grounding_sources")
    ram = torch.load(RAM_FIXTURE / "ram.pth", weights_only=True)
    ram["model"] = {k.replace("tagging_head.", "vision_multi.", 1): v for k, v in ram["model"].items()}
    torch.save(ram, root / "ram_swin_large_14m.pth")
    (root / "ram_tag_list.txt").write_text((RAM_FIXTURE / "tags.txt").read_text())
    (root / "ram_tag_list_threshold.txt").write_text((RAM_FIXTURE / "tag_thresholds.txt").read_text())
    bert = root / "bert-base-uncased"
    bert.mkdir()
    write_detector_vocab(bert / "vocab.txt", ["circle", "square", "dog", "red"])
    tokenizer = BertTokenizer(str(bert / "vocab.txt"))
    tokenizer.save_pretrained(bert)
    torch.manual_seed(1)
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=512)).save_pretrained(bert)  # fmt: skip
    torch.manual_seed(0)
    dino_config = OriginalGroundingDinoConfig(hidden_dim=256, nheads=4, enc_layers=1, dec_layers=2, dim_feedforward=96, num_queries=10)
    dino = build_original_grounding_dino(dino_config, bert).eval()
    with torch.no_grad():
        for parameter in dino.bbox_embed.parameters():
            parameter.normal_(0, 0.05)
    state = {f"module.{k}": v for k, v in dino.state_dict().items()}
    state["module.label_enc.weight"] = torch.zeros(2001, 256)  # training-only, in the release
    torch.save({"model": state, "epoch": 0}, root / "groundingdino_swint_ogc.pth")
    torch.manual_seed(0)
    sam = _build_sam(encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2, encoder_global_attn_indexes=[1])
    torch.save(sam.state_dict(), root / "sam_vit_h_4b8939.pth")
    (root / "ram_config.json").write_text(json.dumps({"bert_heads": 2}))  # the fixture's; no shape holds it
    return {"root": root, "bert": bert, "dino": dino, "dino_config": dino_config, "sam": sam.eval()}


def test_convert_grounding_writes_what_serving_loads(grounding_sources, tmp_path, bubogpt_cli):
    import numpy as np
    from PIL import Image

    from bubogpt.grounding.pipeline import load_grounding
    from bubogpt.grounding.segmenter import SamSegmenter

    root = grounding_sources["root"]
    out = tmp_path / "grounding"
    result = bubogpt_cli("convert-grounding", "--ram", str(root / "ram_swin_large_14m.pth"), "--ram-config", str(root / "ram_config.json"),
                         "--gdino", str(root / "groundingdino_swint_ogc.pth"), "--bert", str(grounding_sources["bert"]),
                         "--sam", str(root / "sam_vit_h_4b8939.pth"), "--out", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "grounding.json").read_text())
    assert manifest["grounding_dino"] == {**grounding_sources["dino_config"].__dict__}  # sizes from the shapes
    assert manifest["sam"]["encoder_embed_dim"] == 32 and manifest["sam"]["encoder_global_attn_indexes"] == [1]
    assert "vision_multi.* keys read as tagging_head.*" in manifest["ram_load_report"]

    # The detector settings live in grounding.json (the reference's 800 px by default): smaller here, for speed.
    manifest["detector"].update(resize_short=64, resize_max=96)
    (out / "grounding.json").write_text(json.dumps(manifest))
    pipeline = load_grounding(out)  # what serve/app.py's Grounder calls with grounding_dir
    assert pipeline.detector.config.resize_short == 64
    io = torch.load(RAM_FIXTURE / "io.pt", weights_only=True)
    with torch.no_grad():
        torch.testing.assert_close(pipeline.tagger.model(io["image"]), io["logits"], atol=1e-4, rtol=0)  # the original's logits
        pixels = torch.randn(1, 3, 96, 128, generator=torch.Generator().manual_seed(0))
        expected = grounding_sources["dino"](pixels, captions=["red circle . dog ."])
        logits, boxes = pipeline.detector.model.predict(pixels, ["red circle . dog ."])
    torch.testing.assert_close(logits, expected["pred_logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(boxes, expected["pred_boxes"], atol=1e-5, rtol=0)
    image = np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)
    box = np.array([[10, 5, 50, 40]], dtype=np.float32)
    theirs = SamSegmenter(grounding_sources["sam"], min_region_area=0).mask_logits(image, box)
    ours = SamSegmenter(pipeline.segmenter.sam, min_region_area=0).mask_logits(image, box)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    entities = pipeline.ground_image(Image.fromarray(image))  # the whole pipeline runs on it
    assert isinstance(entities, list)
    # A directory that exists is not overwritten by accident.
    again = bubogpt_cli("convert-grounding", "--ram", str(root / "ram_swin_large_14m.pth"), "--gdino", str(root / "groundingdino_swint_ogc.pth"),
                        "--bert", str(grounding_sources["bert"]), "--sam", str(root / "sam_vit_h_4b8939.pth"), "--out", str(out))  # fmt: skip
    assert again.returncode == 2 and "not empty" in again.stderr
