"""The training recipe's pieces (bubogpt/training.py, checkpoints/training_state.py), without Ray."""

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bubogpt.checkpoints.training_state import (
    CheckpointError,
    TrainState,
    latest_checkpoint,
    load_optimizer_state,
    read_model,
    read_state,
    read_stream_positions,
    save_checkpoint,
    write_model,
)
from bubogpt.config import tiny
from bubogpt.conversation import SYSTEM, ModalitySlot, prompt_modalities
from bubogpt.modeling_bubogpt import IGNORE_INDEX, BuboGPT
from bubogpt.tokenizer import build_tiny_tokenizer
from bubogpt.training import (
    SHARED_INSTRUCTION_SETS,
    SOUND_SOURCE_INSTRUCTIONS,
    CollateError,
    RatioMixer,
    TrainConfig,
    TrainConfigError,
    apply_lora,
    build_optimizer,
    build_scheduler,
    collate,
    configure_trainable,
    learning_rate,
    parameter_groups,
    resolve_stages,
    stage_configs,
)

REPO = Path(__file__).resolve().parents[1]


def make_config(**overrides) -> TrainConfig:
    fields = dict(
        stage="stage2", datasets={"llava_instruct": 1.0}, prompt_style="instruction", batch_size=2,
        lr=1e-3, min_lr=1e-4, warmup_start_lr=1e-5, warmup_steps=10, max_steps=110, max_txt_len=32,
    )  # fmt: skip
    return TrainConfig(**{**fields, **overrides})


@pytest.fixture(scope="module")
def tokenizer():
    from bubogpt.data.vocab import sample_texts

    return build_tiny_tokenizer(sample_texts(), vocab_size=512)


@pytest.fixture()
def model(tokenizer):
    torch.manual_seed(0)
    return BuboGPT.build(tiny(), tokenizer)


# --- schedule -------------------------------------------------------------------------------------


def test_warmup_is_linear_from_warmup_start_then_cosine_to_min():
    config = make_config()
    lrs = [learning_rate(s, config) for s in range(config.max_steps + 1)]
    assert lrs[0] == pytest.approx(1e-5)
    assert lrs[5] == pytest.approx(1e-5 + (1e-3 - 1e-5) * 5 / 10)  # halfway through warm-up
    assert lrs[10] == pytest.approx(1e-3)  # peak at the end of warm-up
    assert lrs[60] == pytest.approx((1e-3 + 1e-4) / 2)  # cosine halfway: the mean of peak and floor
    assert lrs[110] == pytest.approx(1e-4)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:11]))  # rising during warm-up
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # falling afterwards
    assert learning_rate(500, config) == pytest.approx(1e-4)  # stays at the floor past max_steps


def test_scheduler_drives_the_optimizer_along_the_schedule(model):
    config = make_config(max_steps=30, warmup_steps=5)
    configure_trainable(model, config)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config)
    seen = []
    for _ in range(30):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([learning_rate(s, config) for s in range(30)])
    assert len(optimizer.param_groups) == 2
    assert optimizer.param_groups[0]["lr"] == optimizer.param_groups[1]["lr"]  # both groups follow it


def test_7b_and_13b_follow_lavis_linear_warmup_cosine():
    """LAVIS's LinearWarmupCosineLRScheduler (bubogpt/common/optims.py:79-112 of the original),
    stepped before every iteration (tasks/base_task.py:235): warm-up
    min(init_lr, warmup_lr + (init_lr - warmup_lr) * step / warmup_steps), then
    min_lr + (init_lr - min_lr) * 0.5 * (1 + cos(pi * step / (max_epoch * iters_per_epoch))),
    whose progress counts the warm-up's steps too."""
    for preset in ("7b", "13b"):
        stage1, stage2 = stage_configs(preset)["stage1"], stage_configs(preset)["stage2"]
        assert stage1.schedule == stage2.schedule == "lavis"
        # Stage 1: init_lr 1e-4, min_lr 8e-5, warmup_lr 1e-6, 5000 warm-up steps of 4 x 5000.
        assert learning_rate(0, stage1) == pytest.approx(1e-6)
        assert learning_rate(2500, stage1) == pytest.approx(1e-6 + (1e-4 - 1e-6) * 0.5)
        assert learning_rate(4999, stage1) == pytest.approx(1e-6 + (1e-4 - 1e-6) * 4999 / 5000)
        assert learning_rate(5000, stage1) == pytest.approx(9.7071e-5, rel=1e-4)  # not 1e-4: the cosine is 1/4 in
        assert learning_rate(10000, stage1) == pytest.approx(9e-5)  # halfway: the mean of 1e-4 and 8e-5
        assert learning_rate(20000, stage1) == pytest.approx(8e-5)
        # Stage 2: 3e-5 -> 1e-5 over 10 x 5000; at the end of the warm-up the cosine is a tenth in.
        assert learning_rate(5000, stage2) == pytest.approx(1e-5 + 2e-5 * 0.5 * (1 + math.cos(math.pi / 10)))
        assert learning_rate(25000, stage2) == pytest.approx(2e-5)
    # The tiny recipe keeps its own: the cosine starts at the peak when the warm-up ends.
    tiny_stage1 = stage_configs("tiny")["stage1"]
    assert tiny_stage1.schedule == "warmup_then_cosine"
    assert learning_rate(tiny_stage1.warmup_steps, tiny_stage1) == pytest.approx(tiny_stage1.lr)
    with pytest.raises(TrainConfigError, match="schedule"):
        make_config(schedule="linear")


def test_13b_recipe_is_the_originals():
    """train_configs/mmgpt4_stage1_audio_13b.yaml and mmgpt4_stage2_mm_13b.yaml of the original."""
    seven, thirteen = stage_configs("7b"), stage_configs("13b")
    s1, s2 = thirteen["stage1"], thirteen["stage2"]
    assert s1.batch_size == 32  # :71 (7B: 64)
    assert (s1.datasets, s1.lr, s1.min_lr, s1.warmup_start_lr) == (seven["stage1"].datasets, 1e-4, 8e-5, 1e-6)
    assert s2.batch_size == 10  # :95 (7B: 12)
    assert s2.max_txt_len == 160  # :6 (7B: 196)
    assert s2.datasets == {"cc_sbu_align": 3, "llava_instruct": 150, "clotho": 4, "vggss": 31}  # :41-82, no negatives
    assert (s2.lr, s2.min_lr, s2.warmup_start_lr, s2.warmup_steps, s2.max_steps) == (3e-5, 1e-5, 1e-6, 5000, 50000)
    # Both big presets compute in bf16, the dtype their frozen LLM and encoders load in.
    assert {c.precision for c in (*seven.values(), *thirteen.values())} == {"bf16"}
    assert {c.precision for c in stage_configs("tiny").values()} == {"fp16"}  # tiny: unchanged (CPU: fp32 anyway)


def test_caption_stage_targets_end_with_the_stage1_end_symbol(tokenizer):
    """Stage 1 of the original ends its caption targets with "\n" (mm_gpt4.py:68, :214, :275; its
    stage-1 configs set no end_sym), stage 2 with "###" (mmgpt4_stage2_mm.yaml:7)."""
    from bubogpt.training import Callbacks, TorchStepper, train_stage

    torch.manual_seed(0)
    model = BuboGPT.build(tiny(), tokenizer)
    model.config.stage1_end_sym = "\n"  # the 7b/13b value (the tiny preset keeps "###")
    seen = []

    class Recorder(torch.nn.Module):
        """Calls the model and keeps what each supervised row ends with."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **inputs):
            output = self.inner(**inputs)
            seen.append([row[row != IGNORE_INDEX].tolist() for row in output.labels])
            return output

    def stepper(model, optimizer, scheduler, config):
        return TorchStepper(Recorder(model), optimizer, scheduler)

    for stage, style, dataset, row, end in (
        ("stage1", "caption", "wavcaps", _row("wavcaps", audio=True, answer="A low buzz."), "\n"),
        ("stage2", "instruction", "clotho", _row("clotho", audio=True, answer="A low buzz."), "###"),
    ):
        config = make_config(stage=stage, prompt_style=style, datasets={dataset: 1.0}, max_steps=1, warmup_steps=0)
        seen.clear()
        train_stage(model, config, {dataset: FixedStream([row])}, stepper, Callbacks(lambda *a: None, lambda line: None))
        assert seen == [[tokenizer("A low buzz." + end, add_special_tokens=False).input_ids]], stage


# --- weight decay groups --------------------------------------------------------------------------


def test_weight_decay_only_on_matrices_of_trainable_parameters(model):
    config = make_config(train_qformers=True)
    trainable = configure_trainable(model, config)
    decay, no_decay = parameter_groups(model, 0.05)
    named = dict(model.named_parameters())
    decay_ids = {id(p) for p in decay["params"]}
    no_decay_ids = {id(p) for p in no_decay["params"]}
    for name in trainable:
        p = named[name]
        assert (id(p) in decay_ids) == (p.ndim >= 2), name
        assert (id(p) in no_decay_ids) == (p.ndim < 2), name
    assert len(decay_ids) + len(no_decay_ids) == len(trainable)  # frozen ones are in no group
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    # Both kinds are really there: Linear weights and the 3-D query tokens decay; biases and norms do not.
    assert id(named["joiner.qformers.vision.query_tokens"]) in decay_ids
    assert id(named["joiner.projections.vision.fc.bias"]) in no_decay_ids


def test_adamw_step_with_zero_gradients_decays_only_the_decay_group(model):
    config = make_config(lr=0.1, weight_decay=0.5)
    configure_trainable(model, config)
    optimizer = build_optimizer(model, config)
    weight = model.joiner.projections.vision.fc.weight
    bias = model.joiner.projections.vision.fc.bias
    with torch.no_grad():
        bias.fill_(1.0)
    w0, b0 = weight.detach().clone(), bias.detach().clone()
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    assert torch.allclose(weight, w0 * (1 - 0.1 * 0.5))  # decoupled decay: w <- w (1 - lr wd)
    assert torch.equal(bias, b0)


# --- what trains ----------------------------------------------------------------------------------


def test_reference_stages_train_what_the_model_says(model):
    # The model's own `set_trainable` (modeling_bubogpt.py) is the independent statement of the recipe.
    for stage, qformers in (("stage1", False), ("stage2", False), ("stage2", True)):
        expected = model.set_trainable(stage, train_qformers=qformers)
        got = configure_trainable(model, make_config(stage=stage, train_qformers=qformers))
        assert got == expected


def test_tiny_only_flags_add_encoders_and_llm(model):
    names = configure_trainable(model, make_config(stage="stage1", train_audio_encoder=True, use_precomputed_tokens=False))
    assert any(n.startswith("audio_encoder.") for n in names)
    assert not any(n.startswith(("vision_encoder.", "llm.", "joiner.qformers.vision")) for n in names)
    names = configure_trainable(model, make_config(stage="stage2", train_vision_encoder=True, train_llm=True, use_precomputed_tokens=False))
    prefixes = {n.split(".")[0] if not n.startswith("joiner") else ".".join(n.split(".")[:2]) for n in names}
    assert prefixes == {"vision_encoder", "llm", "joiner.projections"}


def test_presets_follow_the_reference_and_keep_tiny_stages_tiny():
    seven = stage_configs("7b")
    assert list(seven) == ["stage1", "stage2"]
    s1, s2 = seven["stage1"], seven["stage2"]
    # BUBOGPT_REFERENCE.md, "Training recipe"
    assert (s1.lr, s1.min_lr, s1.warmup_start_lr, s1.warmup_steps, s1.batch_size) == (1e-4, 8e-5, 1e-6, 5000, 64)
    assert (s2.lr, s2.min_lr, s2.warmup_start_lr, s2.batch_size) == (3e-5, 1e-5, 1e-6, 12)
    assert s1.max_steps == 4 * 5000 and s2.max_steps == 10 * 5000
    assert (s1.max_txt_len, s2.max_txt_len) == (128, 196)
    assert s1.schedule == s2.schedule == "lavis"
    assert s2.datasets == {"cc_sbu_align": 3, "llava_instruct": 150, "clotho": 4, "vggss": 5, "negative_pairs": 3}
    assert s1.prompt_style == "caption" and s2.prompt_style == "chat"  # stage 2 in the served template
    for config in seven.values():
        assert not (config.train_llm or config.train_vision_encoder or config.train_audio_encoder or config.lora)
    # The tiny recipe is the same two stages on the pretrained tiny components, encoders frozen.
    tiny_stages = stage_configs("tiny")
    assert list(tiny_stages) == ["stage1", "stage2"]
    assert [c.prompt_style for c in tiny_stages.values()] == ["caption", "chat"]
    for config in tiny_stages.values():
        assert not (config.train_llm or config.train_vision_encoder or config.train_audio_encoder or config.train_qformers)
    with pytest.raises(TrainConfigError, match="has no stage 'lm_warmup'"):
        resolve_stages("tiny", "lm_warmup")
    with pytest.raises(TrainConfigError, match="tiny-preset options"):
        resolve_stages("13b", "stage2", {"stage2": {"train_llm": True}})
    with pytest.raises(TrainConfigError, match="unknown TrainConfig fields"):
        resolve_stages("tiny", "all", {"stage2": {"learning_rate": 1.0}})


def test_bad_configs_are_refused_with_the_field_named():
    with pytest.raises(TrainConfigError, match="min_lr"):
        make_config(min_lr=1.0)
    with pytest.raises(TrainConfigError, match="positive sample ratios"):
        make_config(datasets={"vggss": 0.0})
    with pytest.raises(TrainConfigError, match="batch_size"):
        make_config(batch_size=0)


# --- dataset mixing -------------------------------------------------------------------------------


def test_ratio_mixing_frequencies_follow_the_ratios():
    ratios = {"cc_sbu_align": 3, "llava_instruct": 150, "clotho": 4, "vggss": 5, "negative_pairs": 3}
    mixer = RatioMixer(ratios, seed=1)
    n = 20000
    picks = [mixer.choose(step) for step in range(n)]
    total = sum(ratios.values())
    for name, ratio in ratios.items():
        p = ratio / total
        observed = picks.count(name) / n
        assert abs(observed - p) < 4 * math.sqrt(p * (1 - p) / n), (name, observed, p)
    # The same step picks the same dataset in another worker or after a restart.
    again = RatioMixer(ratios, seed=1)
    assert [again.choose(step) for step in range(5000, 5100)] == picks[5000:5100]
    assert [RatioMixer(ratios, seed=2).choose(s) for s in range(200)] != picks[:200]


# --- collation ------------------------------------------------------------------------------------


def _row(dataset, image=False, audio=False, instruction="", answer="An answer."):
    g = torch.Generator().manual_seed(hash((dataset, instruction)) % 1000)
    return {
        "dataset": dataset, "id": f"{dataset}-{instruction}", "instruction": instruction, "answer": answer,
        "pixel_values": torch.randn(3, 112, 112, generator=g).numpy() if image else None,
        "fbank": torch.randn(3, 1, 128, 204, generator=g).numpy() if audio else None,
    }  # fmt: skip


def test_collate_builds_compact_modality_tensors_in_prompt_order(model, tokenizer):
    rows = [
        _row("llava_instruct", image=True, instruction="What colour is the star?", answer="It is red."),
        _row("clotho", audio=True, answer="A steady tone."),
        _row("vggss", image=True, audio=True, instruction="Where is the sound from?", answer="The red star."),
        _row("cc_sbu_align", image=True, answer="A picture of a blue circle."),
    ]
    batch = collate(rows, "instruction", np.random.default_rng(0))
    assert [prompt_modalities(p) for p in batch.prompts] == [["vision"], ["audio"], ["audio", "vision"], ["vision"]]
    assert batch.image.shape == (3, 3, 112, 112) and batch.audio.shape == (2, 3, 1, 128, 204)
    # Row order is kept: image rows 0, 2, 3 and audio rows 1, 2.
    assert torch.equal(batch.image[1], torch.as_tensor(rows[2]["pixel_values"]))
    assert torch.equal(batch.audio[0], torch.as_tensor(rows[1]["fbank"]))
    assert "What colour is the star?" in "".join(s for s in batch.prompts[0] if isinstance(s, str))
    assert batch.targets == [r["answer"] for r in rows]
    out = model(**batch.model_inputs())
    for i, target in enumerate(batch.targets):
        supervised = out.labels[i][out.labels[i] != IGNORE_INDEX].tolist()
        assert supervised == tokenizer(target + "###", add_special_tokens=False).input_ids


def test_collate_prompt_styles():
    rng = np.random.default_rng(0)
    caption = collate([_row("wavcaps", audio=True, answer="A low buzz.")], "caption", rng)
    assert caption.prompts == [[ModalitySlot("audio")]]  # stage 1: no instruction at all
    chat = collate([_row("llava_instruct", image=True, instruction="How many shapes?", answer="Two.")], "chat", rng)
    assert chat.prompts == [[f"{SYSTEM}###Human: <Vision>", ModalitySlot("vision"), "</Vision> How many shapes?###Assistant:"]]
    assert chat.targets == ["Two."] and chat.image is not None
    with pytest.raises(CollateError, match="neither image nor audio"):
        collate([_row("clotho")], "instruction", rng)
    with pytest.raises(CollateError, match="different shapes"):
        bad = _row("cc_sbu_align", image=True)
        bad["pixel_values"] = np.zeros((3, 64, 64), dtype=np.float32)
        collate([_row("cc_sbu_align", image=True), bad], "instruction", rng)


def test_matched_and_mismatched_pairs_share_their_instructions():
    rng = np.random.default_rng(0)
    seen = {name: set() for name in SHARED_INSTRUCTION_SETS}
    for name in SHARED_INSTRUCTION_SETS:
        own = f"own instruction of {name}"
        for _ in range(80):
            batch = collate([_row(name, image=True, audio=True, instruction=own)], "instruction", rng)
            text = "".join(s for s in batch.prompts[0] if isinstance(s, str))
            seen[name].add(next((i for i in (*SOUND_SOURCE_INSTRUCTIONS, own) if i in text)))
    for name, instructions in seen.items():
        assert set(SOUND_SOURCE_INSTRUCTIONS) <= instructions  # the shared pool is used ...
        assert f"own instruction of {name}" in instructions  # ... and the record's own one


# --- checkpoints ----------------------------------------------------------------------------------


def _state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_checkpoint_holds_the_whole_model_and_the_optimizer(model, tmp_path):
    config = make_config(stage="stage2")
    configure_trainable(model, config)  # only the projections train ...
    optimizer = build_optimizer(model, config)
    model(**collate([_row("vggss", image=True, audio=True, instruction="Where?")], "instruction",
                    np.random.default_rng(0)).model_inputs()).loss.backward()  # fmt: skip
    optimizer.step()
    path = save_checkpoint(tmp_path / "ckpt", model, TrainState("stage2", 7, config.to_dict(), [(7, 1.5)]), optimizer)
    rebuilt = read_model(path / "model")
    assert _state_equal(model, rebuilt)  # ... but the audio Q-Former, encoders and LLM are all there
    state = read_state(path)
    assert (state.stage, state.step, state.loss_history) == ("stage2", 7, [(7, 1.5)])
    configure_trainable(rebuilt, config)
    fresh = build_optimizer(rebuilt, config)
    fresh.load_state_dict(load_optimizer_state(path))  # read with weights_only=True
    assert fresh.state_dict()["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"]
    assert latest_checkpoint(tmp_path) == path


WRITER = """
import sys, torch
sys.path.insert(0, {repo!r})
from bubogpt.config import tiny
from bubogpt.checkpoints.training_state import TrainState, save_checkpoint
from bubogpt.modeling_bubogpt import BuboGPT
from bubogpt.tokenizer import build_tiny_tokenizer
config = tiny()
config.llm.num_layers = 24  # a bigger LLM: the write takes long enough to be caught half-way
model = BuboGPT.build(config, build_tiny_tokenizer(["a b c red circle"] * 20, vocab_size=300))
print("ready", flush=True)
sys.stdin.readline()
while True:
    save_checkpoint({target!r}, model, TrainState("stage1", 20))
"""


def test_a_killed_checkpoint_write_leaves_the_previous_one_usable(model, tmp_path):
    previous = save_checkpoint(tmp_path / "step_000010", model, TrainState("stage1", 10))
    target = tmp_path / "step_000020"
    process = subprocess.Popen(
        [sys.executable, "-c", WRITER.format(repo=str(REPO), target=str(target))],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert process.stdout.readline().strip() == "ready"
        process.stdin.write("go\n")
        process.stdin.flush()
        deadline = time.time() + 120
        # Kill it while a write is in flight: a temporary sibling exists.
        while not any(p.name.startswith(".step_000020.partial-") for p in tmp_path.iterdir()):
            assert time.time() < deadline and process.poll() is None
            time.sleep(0.001)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".step_000020.partial-")]
    assert leftovers  # the write really was cut off half-way ...
    # ... and no half-written folder carries a checkpoint name: the latest usable one is intact.
    best = latest_checkpoint(tmp_path)
    assert best is not None
    if best == target:  # the kill may land after a previous loop's rename: then that one is complete
        assert read_state(target).step == 20
        read_model(target / "model")
    assert read_state(previous).step == 10
    assert _state_equal(model, read_model(previous / "model"))
    with pytest.raises(CheckpointError, match="not a complete"):
        read_state(leftovers[0])


def test_lora_trains_adapters_only_and_round_trips(model, tmp_path):
    from bubogpt.training import LoraSettings

    config = make_config(lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    apply_lora(model, config.lora)
    names = configure_trainable(model, config)
    assert any("lora_" in n for n in names)
    assert not any(n.startswith("llm.") and "lora_" not in n for n in names)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # non-zero adapters: they change the output
    batch = collate([_row("llava_instruct", image=True, instruction="What?")], "instruction", np.random.default_rng(0))
    model.eval()
    with torch.no_grad():
        expected = model(**batch.model_inputs()).logits
    write_model(model, tmp_path / "m", include_llm=True)
    rebuilt = read_model(tmp_path / "m").eval()
    with torch.no_grad():
        assert torch.allclose(rebuilt(**batch.model_inputs()).logits, expected, atol=1e-5)
        rebuilt.llm = rebuilt.llm.merge_and_unload()  # what the export does
        assert torch.allclose(rebuilt(**batch.model_inputs()).logits, expected, atol=1e-4)


# --- the tiny recipe's spatial prior ----------------------------------------------------------------


def _query_response(model, row: int, col: int) -> torch.Tensor:
    """How much each vision query's output moves when a bright square is painted in grid cell
    (row, col) of a 4 x 4 grid over an otherwise grey image: (16,) norms."""
    grey = torch.zeros(1, 3, 112, 112)
    painted = grey.clone()
    cell = 112 // 4
    painted[:, 0, row * cell + 6 : row * cell + 22, col * cell + 6 : col * cell + 22] = 2.0  # red-ish
    qformer = model.joiner.qformers["vision"].eval()
    with torch.no_grad():
        delta = qformer(model.vision_encoder(painted)) - qformer(model.vision_encoder(grey))
    return delta.norm(dim=-1)[0]


def test_place_queries_make_each_query_look_at_its_own_place(tokenizer):
    # The tiny vision alignment's start (bubogpt/pretraining/tiny_components.py).
    from bubogpt.pretraining.tiny_components import init_place_queries, init_position_codes

    torch.manual_seed(0)
    plain = BuboGPT.build(tiny(), tokenizer).eval()
    torch.manual_seed(0)
    prior = BuboGPT.build(tiny(), tokenizer).eval()
    init_position_codes(prior.vision_encoder)
    init_place_queries(prior)
    hits, plain_peaks, prior_peaks = 0, [], []
    for row, col in ((0, 0), (0, 3), (3, 0), (3, 3), (1, 2), (2, 1)):
        response = _query_response(prior, row, col)
        hits += int(response.argmax()) == row * 4 + col  # queries are laid out row by row
        prior_peaks.append(float(response.max() / response.mean()))
        flat = _query_response(plain, row, col)
        plain_peaks.append(float(flat.max() / flat.mean()))
    assert hits >= 5  # the query of that cell reacts most
    # Without the prior every query sees about the same average: no query stands out.
    assert min(prior_peaks) > 1.5 * max(plain_peaks)


def test_precomputed_tokens_with_a_trained_encoder_is_refused():
    with pytest.raises(TrainConfigError, match="use_precomputed_tokens needs frozen encoders.*train_audio_encoder"):
        make_config(stage="stage1", train_audio_encoder=True, use_precomputed_tokens=True)


def test_bubogpt_train_needs_data_except_for_grounding(tmp_path, capsys):
    from workflows.cli import main

    assert main(["train", "--out", str(tmp_path), "--stage", "stage1"]) == 2
    assert "--data is required" in capsys.readouterr().err


# --- one row -> prompt function for training, evaluation and samples -------------------------------


def test_training_evaluation_and_samples_ask_through_row_prompt():
    from bubogpt.conversation import caption_prompt, instruction_prompt
    from bubogpt.training import EVAL_INSTRUCTIONS, generation_batch, row_prompt
    from bubogpt.training.prompts import chat_prompt

    rows = [
        _row("llava_instruct", image=True, instruction="What colour is the star?"),
        _row("clotho", audio=True, instruction="ignored for audio"),
        _row("vggss", image=True, audio=True, instruction="Where is the tone from? (differs per pair)"),
        _row("negative_pairs", image=True, audio=True, instruction="Are they unrelated?"),
    ]
    asked = generation_batch(rows).prompts  # what the evaluator generates from: the served chat template
    assert asked == [
        chat_prompt(["vision"], "What colour is the star?"),
        chat_prompt(["audio"], EVAL_INSTRUCTIONS["sound"]),
        chat_prompt(["vision", "audio"], EVAL_INSTRUCTIONS["source"]),  # one question for matched ...
        chat_prompt(["vision", "audio"], EVAL_INSTRUCTIONS["source"]),  # ... and mismatched pairs
    ]
    # Training asks through the same function (an image QA record always with its own question);
    # stage 1 captions have no instruction.
    trained = collate(rows[:1], "chat", np.random.default_rng(0)).prompts
    assert trained == [chat_prompt(["vision"], "What colour is the star?")] == asked[:1]
    assert collate(rows[1:2], "caption", None).prompts == [caption_prompt(["audio"])]
    # The reference's stage-2 template stays available (released-weights conformance).
    assert row_prompt(rows[0], "instruction", "Q?") == instruction_prompt(["vision"], "Q?")


def test_the_samples_and_the_evaluator_share_the_generation_path():
    """workflows/train.py has no prompt text of its own: sample generations go through
    workflows/evaluate.generate_answers, like the evaluator."""
    source = (REPO / "workflows" / "train.py").read_text() + (REPO / "workflows" / "evaluate.py").read_text()
    assert "###Human" not in source and "###Assistant" not in source
    assert "instruction_prompt" not in source and "caption_prompt" not in source


# --- one optimiser/schedule for BuboGPT and grounding ------------------------------------------------


def test_grounding_uses_the_shared_schedule_and_groups():
    from bubogpt.grounding.training import LoopConfig, lr_factor, make_optimizer
    from bubogpt.training.optim import warmup_cosine

    config = LoopConfig(steps=1000, batch_size=1, lr=2e-3, warmup_steps=100, min_lr_ratio=0.05, weight_decay=0.01)
    # The grounding schedule as written before the merge: (step + 1) / warmup, then cosine to the floor.
    for step in (0, 1, 50, 99, 100, 101, 550, 999, 1500):
        if step < 100:
            expected = (step + 1) / 100
        else:
            expected = 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min((step - 100) / 900, 1.0)))
        assert lr_factor(step, config) == expected  # bit for bit: the shipped weights' recipe
        assert warmup_cosine(step, 1.0, 0.05, 100, 1000, warmup_offset=1) == expected
    layer, norm = torch.nn.Linear(4, 4), torch.nn.LayerNorm(4)
    optimizer = make_optimizer([(list(layer.parameters()), 0.1), (list(norm.parameters()), 1.0)], config)
    groups = [(len(g["params"]), g["weight_decay"], g["lr"], g["base_lr"]) for g in optimizer.param_groups]
    assert groups == [(1, 0.01, 2e-3 * 0.1, 2e-3 * 0.1), (1, 0.0, 2e-3 * 0.1, 2e-3 * 0.1), (2, 0.0, 2e-3, 2e-3)]  # a norm: 1-D only


# --- the recipe runs without a launcher ---------------------------------------------------------------


class FixedStream:
    """The same rows every call (a RowStream), counting the calls."""

    def __init__(self, rows):
        self.rows, self.calls = rows, 0

    def next_rows(self):
        self.calls += 1
        return self.rows

    def state(self):
        return {"calls": self.calls}

    def restore(self, state):
        self.calls = state["calls"]


def test_the_recipe_trains_and_resumes_in_one_process_without_ray(model, tmp_path):
    from bubogpt.training import Callbacks, Resume, TorchStepper, train_stage

    config = make_config(stage="stage2", datasets={"llava_instruct": 1.0, "clotho": 1.0}, max_steps=6, warmup_steps=1,
                         lr=3e-3, min_lr=1e-3, checkpoint_every=3, log_every=3, train_qformers=True)  # fmt: skip
    streams = {"llava_instruct": FixedStream([_row("llava_instruct", image=True, instruction="What?", answer="A red star.")] * 2),
               "clotho": FixedStream([_row("clotho", audio=True, answer="A steady tone.")] * 2)}  # fmt: skip
    saved, lines, metrics = {}, [], []

    def to_folder(name, write, step_metrics):
        write(tmp_path / name)
        saved[name] = step_metrics

    def stepper(model, optimizer, scheduler, config):
        return TorchStepper(model, optimizer, scheduler, config.grad_accum_steps, config.grad_clip)

    callbacks = Callbacks(to_folder, lines.append, lambda stage, rows: metrics.extend(rows))
    started = time.time()
    history = train_stage(model, config, streams, stepper, callbacks)
    assert [s for s, _ in history] == [1, 2, 3, 4, 5, 6] and history[-1][1] < history[0][1]
    assert sorted(saved) == ["stage2_step_000003", "stage2_step_000006"]
    assert [m["lr"] for _, m, _ in metrics] == pytest.approx([learning_rate(s, config) for s in range(1, 7)])
    assert all(started <= t <= time.time() for _, _, t in metrics)  # stamped when measured
    assert any("stage2 step 6/6" in line for line in lines) and "stage2: finished 6 steps" in lines[-1]
    # Resume from the step-3 checkpoint: only steps 4..6 run, the history runs on from the checkpoint,
    # and fresh streams continue from the positions the checkpoint recorded.
    final_calls = {name: stream.calls for name, stream in streams.items()}
    middle = tmp_path / "stage2_step_000003"
    positions = read_stream_positions(middle, rank=0, world=1)
    assert sum(p["calls"] for p in positions.values()) == 3  # three steps, one batch each
    assert read_stream_positions(middle, rank=0, world=2) is None  # written by one rank: no use to two
    fresh = {name: FixedStream(stream.rows) for name, stream in streams.items()}
    resumed_model = read_model(middle / "model")
    state = read_state(middle)
    resumed = train_stage(resumed_model, config, fresh, stepper, Callbacks(to_folder, lines.append),
                          resume=Resume(state, load_optimizer_state(middle), streams=positions))  # fmt: skip
    assert [s for s, _ in resumed] == [1, 2, 3, 4, 5, 6] and resumed[:3] == history[:3]
    assert lines[-2].startswith("stage2 step 6/6") and lines[-3].startswith("stage2: steps 3..6")
    assert {name: stream.calls for name, stream in fresh.items()} == final_calls


# --- the in-memory stream's position ------------------------------------------------------------------


def test_local_stream_state_restores_the_exact_position():
    import pyarrow as pa

    from workflows.streams import LocalStream

    table = pa.table({"id": list(range(7)), "dataset": ["clotho"] * 7})
    first = LocalStream(table, 3, {"shapes": {}}, seed=5)
    taken = [[r["id"] for r in first.next_rows()] for _ in range(4)]  # crosses an epoch
    assert sorted(sum(taken[:2], []) + taken[2][:1]) == list(range(7))  # one epoch: every row once
    state = first.state()
    assert state == {"seed": 5, "epoch": 1, "position": 5}
    ahead = [[r["id"] for r in first.next_rows()] for _ in range(5)]
    again = LocalStream(table, 3, {"shapes": {}}, seed=0)
    again.restore(state)
    assert [[r["id"] for r in again.next_rows()] for _ in range(5)] == ahead


def test_atomic_directory_keeps_the_old_folder_when_a_write_fails(tmp_path):
    from bubogpt.atomic import atomic_directory

    with atomic_directory(tmp_path / "out") as staging:
        (staging / "a.txt").write_text("first")
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "out") as staging:
            (staging / "a.txt").write_text("second, half written")
            raise RuntimeError("killed")
    assert (tmp_path / "out" / "a.txt").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left behind
    with atomic_directory(tmp_path / "out") as staging:
        (staging / "b.txt").write_text("third")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["b.txt"]  # replaced, not merged
