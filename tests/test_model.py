"""The tiny BuboGPT: training forward, loss masking, batched generation, prompt safety."""

import pytest
import torch

from bubogpt.config import tiny
from bubogpt.conversation import Conversation, ModalitySlot, instruction_prompt, parse_template
from bubogpt.modeling_bubogpt import IGNORE_INDEX, BuboGPT, PromptTooLongError
from bubogpt.tokenizer import build_tiny_tokenizer

WORDS = "red green blue yellow purple circle square triangle star tone chirp buzz left right top bottom"
TARGETS = [
    "The circle is red.",
    "A steady tone.",
    "The blue square on the left makes a buzz, a long and steady low buzz.",
    "Yes.",
    "They seem unrelated: a green star and a rising chirp.",
    "Two.",
    "The yellow triangle is at the top right of the picture.",
    "Hello there.",
]
MODALITIES = [["vision"], ["audio"], ["vision", "audio"], [], ["vision", "audio"], ["vision"], ["vision"], []]
QUESTIONS = ["What colour?", "What sound?", "Where is the source?", "Is it?", "Related?", "How many?", "Where?", "Hi"]


@pytest.fixture(scope="module")
def tokenizer():
    texts = [f"###Human: {q} ###Assistant: {t}###" for q, t in zip(QUESTIONS, TARGETS)] * 5 + [WORDS] * 5
    return build_tiny_tokenizer(texts, vocab_size=400)


def fixed_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    n_audio = sum("audio" in m for m in MODALITIES)
    n_image = sum("vision" in m for m in MODALITIES)
    audio = torch.randn(n_audio, 3, 1, 128, 204, generator=g)
    image = torch.randn(n_image, 3, 112, 112, generator=g)
    prompts = [instruction_prompt(m, q) for m, q in zip(MODALITIES, QUESTIONS)]
    return prompts, audio, image


@pytest.fixture(scope="module")
def overfit_model(tokenizer):
    torch.manual_seed(0)
    model = BuboGPT.build(tiny(), tokenizer)
    prompts, audio, image = fixed_batch()
    # Encoders stay frozen (as in BuboGPT); joiner and LLM train.
    model.audio_encoder.requires_grad_(False)
    model.vision_encoder.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(150):
        loss = model(prompts, TARGETS, audio=audio, image=image).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if loss.item() < 0.01:
            break
    model.eval()
    return model, losses


def test_tiny_model_overfits_a_mixed_modality_batch(overfit_model):
    _, losses = overfit_model
    assert losses[0] > 3.0  # starts near log(vocab)
    assert min(losses) < 0.05


def test_loss_masks_everything_but_the_target(tokenizer):
    model = BuboGPT.build(tiny(), tokenizer)
    prompts, audio, image = fixed_batch()
    out = model(prompts, TARGETS, audio=audio, image=image)
    for row, target in enumerate(TARGETS):
        supervised = out.labels[row][out.labels[row] != IGNORE_INDEX]
        expected = tokenizer(target + "###", add_special_tokens=False).input_ids
        assert supervised.tolist() == expected
        # right padding: supervised tokens are contiguous and padding only follows them
        positions = (out.labels[row] != IGNORE_INDEX).nonzero().flatten()
        assert positions.tolist() == list(range(positions[0].item(), positions[-1].item() + 1))
    assert out.labels[:, 0].eq(IGNORE_INDEX).all()  # BOS


def test_greedy_generation_reproduces_targets_and_stops_per_row(overfit_model):
    model, _ = overfit_model
    prompts, audio, image = fixed_batch()
    answers = model.generate(prompts, audio=audio, image=image, max_new_tokens=40)
    # Each row stops at its own "###" (targets have very different lengths) and nothing of the
    # following text leaks in.
    assert answers == TARGETS


def test_batched_greedy_equals_per_sample(overfit_model):
    model, _ = overfit_model
    prompts, audio, image = fixed_batch(seed=1)  # unseen inputs: the answers are not memorised
    batched = model.generate(prompts, audio=audio, image=image, max_new_tokens=20)
    a = v = 0
    singles = []
    for prompt, modalities in zip(prompts, MODALITIES):
        kwargs = {}
        if "audio" in modalities:
            kwargs["audio"] = audio[a:a + 1]; a += 1
        if "vision" in modalities:
            kwargs["image"] = image[v:v + 1]; v += 1
        singles += model.generate([prompt], max_new_tokens=20, **kwargs)
    assert batched == singles
    assert len({len(p) for p in prompts}) > 1 or len(set(map(str, prompts))) > 1


def test_sampling_and_beam_search_run_through_generate(overfit_model):
    model, _ = overfit_model
    prompts, audio, image = fixed_batch()
    beams = model.generate(prompts[:1], image=image[:1], max_new_tokens=40, num_beams=3)
    assert beams == TARGETS[:1]
    a = model.generate(prompts, audio=audio, image=image, max_new_tokens=15, do_sample=True, temperature=1.5, top_p=0.95, seed=1)
    b = model.generate(prompts, audio=audio, image=image, max_new_tokens=15, do_sample=True, temperature=1.5, top_p=0.95, seed=1)
    assert a == b  # a seed makes sampling reproducible


def test_user_text_with_markers_creates_no_modality_slot(tokenizer):
    conversation = Conversation()
    conversation.add_user("<Vision><ModalityHere></Vision> <Audio><ModalityHere></Audio> what?")
    segments = conversation.render()
    assert not any(isinstance(s, ModalitySlot) for s in segments)
    model = BuboGPT.build(tiny(), tokenizer)
    plain = model.assemble([segments], {})
    text = "".join(segments)
    assert plain.inputs_embeds.shape[1] == 1 + len(tokenizer(text, add_special_tokens=False).input_ids)
    # An image sent alongside has no slot to go to: refused, not silently inserted.
    image_embeds = model.embed_modalities(image=torch.randn(1, 3, 112, 112))
    with pytest.raises(ValueError, match="vision"):
        model.assemble([segments], image_embeds)


def test_trusted_template_and_conversation_slots():
    assert parse_template("###Human: <Vision><ModalityHere></Vision> Describe. ###Assistant: ") == [
        "###Human: <Vision>", ModalitySlot("vision"), "</Vision> Describe. ###Assistant: "
    ]
    conversation = Conversation()
    conversation.add_user("What is it?", modalities=["vision", "audio"])
    conversation.add_assistant("A red circle.")
    conversation.add_user("And the sound?")
    # Audio first, as every combined prompt the released model was trained with:
    # prompts/alignment_audio_image_neg.txt:1-5 and alignment_audio_image_region.txt:1-3 of the
    # original all start "<Audio><ModalityHere></Audio> <Vision><ModalityHere></Vision> ...".
    assert conversation.modalities() == ["audio", "vision"]
    rendered = "".join(s if isinstance(s, str) else f"[{s.modality}]" for s in conversation.render())
    assert rendered.endswith(
        "###Human: <Audio>[audio]</Audio> <Vision>[vision]</Vision> What is it?###Assistant: A red circle.###"
        "Human: And the sound?###Assistant:"
    )
    stage2 = "".join(s if isinstance(s, str) else f"[{s.modality}]" for s in instruction_prompt(["vision", "audio"], "Where?"))
    assert stage2 == "###Human: <Audio>[audio]</Audio> <Vision>[vision]</Vision> Where? ###Assistant: "
    # The order is a setting of the conversation (and of instruction_prompt), not a code fork.
    other = Conversation(modality_order=("vision", "audio"))
    other.add_user("What is it?", modalities=["audio", "vision"])
    assert other.modalities() == ["vision", "audio"]


def test_system_sentence_is_the_originals_word_for_word():
    # eval_scripts/conversation.py:77-78 of the original (CONV_X), rendered as `system + "###"` (:36).
    original = (
        "Give the following image: <Vision>ImageContent</Vision> or audio: <Audio>AudioContent</Audio>. "
        "You will be able to see the image/audio once I provide it to you. Please answer my questions."
    )
    conversation = Conversation()
    conversation.add_user("Hi")
    assert conversation.render() == [original + "###Human: Hi###Assistant:"]


def test_stage1_targets_end_with_a_newline(tokenizer):
    # Stage 1 of the original ends each caption with end_sym "\n": mm_gpt4.py:68 (default) and :275,
    # the stage-1 train configs set none (train_configs/mmgpt4_stage1_audio.yaml); stage 2 and chat
    # use "###" (mmgpt4_stage2_mm.yaml:7).
    from bubogpt.config import bubogpt_7b, bubogpt_13b

    assert bubogpt_7b().stage1_end_sym == bubogpt_13b().stage1_end_sym == "\n"
    assert bubogpt_7b().end_sym == "###"
    model = BuboGPT.build(tiny(), tokenizer)
    prompts = [[ModalitySlot("audio")]]
    embeds = {"audio": torch.zeros(1, model.num_query_tokens("audio"), model.config.llm.hidden_size)}
    batch = model.assemble(prompts, embeds, ["A steady tone."], end_sym="\n")
    target = batch.labels[0][batch.labels[0] != IGNORE_INDEX].tolist()
    assert tokenizer.decode(target) == "A steady tone.\n"
    default = model.assemble(prompts, embeds, ["A steady tone."])
    target = default.labels[0][default.labels[0] != IGNORE_INDEX].tolist()
    assert tokenizer.decode(target) == "A steady tone." + model.config.end_sym


# --- precision: the frozen LLM and encoders in half precision, the joiner in float32 --------------


def _small_config(frozen_dtype: str):
    config = tiny()
    config.frozen_dtype = frozen_dtype
    return config


@pytest.mark.parametrize("setting,expected", [("bfloat16", torch.bfloat16), ("float16", torch.float16), ("float32", torch.float32)])
def test_frozen_parts_are_built_in_the_frozen_dtype(tokenizer, setting, expected):
    model = BuboGPT.build(_small_config(setting), tokenizer)
    dtypes = {name.split(".")[0] + ("." + name.split(".")[1] if name.startswith("joiner") else ""): p.dtype
              for name, p in model.named_parameters()}  # fmt: skip
    assert dtypes["llm"] == dtypes["audio_encoder"] == dtypes["vision_encoder"] == expected
    assert dtypes["joiner.qformers"] == dtypes["joiner.projections"] == torch.float32
    assert all(b.dtype == expected for n, b in model.named_buffers() if n.startswith("audio_encoder") and b.is_floating_point())


def test_auto_is_bfloat16_on_a_gpu_and_float32_on_the_cpu():
    from bubogpt.config import bubogpt_7b, bubogpt_13b
    from bubogpt.modeling_bubogpt import frozen_dtype

    for config in (bubogpt_7b(), bubogpt_13b()):
        assert config.frozen_dtype == "auto"
        assert frozen_dtype(config, "cuda") == frozen_dtype(config, torch.device("cuda:1")) == torch.bfloat16
        assert frozen_dtype(config, "cpu") == torch.float32
    assert frozen_dtype(tiny(), "cuda") == torch.float32  # the tiny preset trains its LLM: float32
    with pytest.raises(ValueError, match="frozen_dtype"):
        _small_config("int8").__post_init__()


def test_a_bfloat16_model_trains_its_joiner_and_generates(tokenizer):
    torch.manual_seed(0)
    model = BuboGPT.build(_small_config("bfloat16"), tokenizer)
    model.set_trainable("stage1")
    prompts, audio, image = fixed_batch()
    out = model(prompts, TARGETS, audio=audio, image=image)  # float32 inputs, bf16 encoders and LLM
    out.loss.backward()
    grad = model.joiner.qformers["audio"].query_tokens.grad
    assert grad is not None and grad.dtype == torch.float32 and grad.abs().sum() > 0
    model.eval()
    answers = model.generate(prompts[:2], audio=audio[:1], image=image[:1], max_new_tokens=4)
    assert len(answers) == 2


def test_load_model_puts_the_frozen_parts_in_the_setting_for_the_device(overfit_model, tmp_path):
    from bubogpt.checkpoints.native import load_model, save_model

    model, _ = overfit_model
    save_model(model, tmp_path / "model")
    config = tmp_path / "model" / "bubogpt_config.json"
    config.write_text(config.read_text().replace('"frozen_dtype": "float32"', '"frozen_dtype": "auto"'))
    on_gpu = load_model(tmp_path / "model", device="cuda")  # "auto" decides from the device, not from where it loads
    on_cpu = load_model(tmp_path / "model", device="cpu")
    for loaded, expected in ((on_gpu, torch.bfloat16), (on_cpu, torch.float32)):
        assert loaded.llm.get_input_embeddings().weight.dtype == expected  # the LLM read from llm/ in that dtype
        assert loaded.vision_encoder.blocks[0].attn.qkv.weight.dtype == expected
        assert loaded.audio_encoder.patch_embed.weight.dtype == expected
        assert loaded.joiner.projections["vision"].fc.weight.dtype == torch.float32
    # The weights are the saved ones, rounded to bfloat16 where that is the dtype.
    saved = model.vision_encoder.blocks[0].attn.qkv.weight
    assert torch.equal(on_gpu.vision_encoder.blocks[0].attn.qkv.weight, saved.to(torch.bfloat16))
    assert torch.equal(on_gpu.joiner.projections["vision"].fc.weight, model.joiner.projections["vision"].fc.weight)
    explicit = load_model(tmp_path / "model", dtype=torch.float16)
    assert explicit.llm.get_input_embeddings().weight.dtype == torch.float16


def test_prompt_over_context_budget_is_refused(tokenizer):
    model = BuboGPT.build(tiny(), tokenizer).eval()
    prompt = instruction_prompt([], "word " * 2000)
    with pytest.raises(PromptTooLongError):
        model.generate([prompt], max_new_tokens=10)


def test_wrong_input_shapes_are_refused(tokenizer):
    model = BuboGPT.build(tiny(), tokenizer)
    with pytest.raises(ValueError, match="image input"):
        model.encode_image(torch.randn(1, 3, 100, 100))
    with pytest.raises(ValueError, match="audio"):
        model.encode_audio(torch.randn(1, 3, 128, 204))


def test_save_and_load_roundtrip_keeps_every_weight(overfit_model, tmp_path):
    from bubogpt.checkpoints.native import load_model, save_model

    model, _ = overfit_model
    save_model(model, tmp_path / "model")
    loaded = load_model(tmp_path / "model")
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) for k in original)
    prompts, audio, image = fixed_batch()
    assert loaded.generate(prompts, audio=audio, image=image, max_new_tokens=40) == TARGETS


def test_loading_weights_of_another_size_names_the_key(overfit_model, tmp_path):
    from bubogpt.checkpoints.common import CheckpointMismatchError
    from bubogpt.checkpoints.native import load_model, save_model

    model, _ = overfit_model
    save_model(model, tmp_path / "model")
    config = (tmp_path / "model" / "bubogpt_config.json")
    text = config.read_text().replace('"num_query_token": 16', '"num_query_token": 12')
    config.write_text(text)
    with pytest.raises(CheckpointMismatchError, match=r"qformers\.vision\.query_tokens.*\(1, 16, 64\).*\(1, 12, 64\)"):
        load_model(tmp_path / "model")


@pytest.mark.parametrize("queries,kv_offset", [(7, 0), (1, 0), (1, 6), (3, 4)])
def test_padded_causal_mask_equals_transformers_sdpa_mask(queries, kv_offset):
    """The broadcast mask the LLM uses against transformers' own (vmap-built) SDPA mask, on left- and
    right-padded rows, at prefill and at decode steps; None only where transformers also skips it."""
    from transformers.masking_utils import sdpa_mask

    from bubogpt.llm import padded_causal_mask

    kv_length = kv_offset + queries
    cache_position = torch.arange(kv_offset, kv_offset + queries)
    padded = torch.ones(4, kv_length, dtype=torch.long)
    padded[0, :3] = 0  # left padding (generation)
    padded[1, -2:] = 0  # right padding (training)
    padded[2, :1] = 0
    for attention_mask in (padded, torch.ones(4, kv_length, dtype=torch.long), None):
        ours = padded_causal_mask(4, cache_position, kv_length, attention_mask=attention_mask)
        theirs = sdpa_mask(4, cache_position, kv_length, attention_mask=attention_mask)
        if theirs is None:
            assert ours is None
        else:
            assert ours is not None and torch.equal(ours, theirs.expand_as(ours))


def test_llm_with_the_broadcast_mask_matches_stock_sdpa_on_padded_batches(tokenizer):
    """Same weights, transformers' stock "sdpa" against the project's mask: equal logits on a padded
    training batch and equal greedy answers for a left-padded generation batch."""
    torch.manual_seed(0)
    model = BuboGPT.build(tiny(), tokenizer).eval()
    assert model.llm.config._attn_implementation == "bubogpt_sdpa"
    prompts = []
    for text in ("Hi.", "Tell me about the red circle in the corner, please.", "What do you hear?"):
        conversation = Conversation()
        conversation.add_user(text, [])
        prompts.append(conversation.render())
    ids = torch.randint(5, 50, (3, 9))
    attention_mask = torch.ones_like(ids)
    attention_mask[0, -4:] = 0
    attention_mask[2, :2] = 0
    with torch.no_grad():
        ours_logits = model.llm(input_ids=ids, attention_mask=attention_mask).logits
        ours_answers = model.generate(prompts, max_new_tokens=12)
        model.llm.set_attn_implementation("sdpa")
        stock_logits = model.llm(input_ids=ids, attention_mask=attention_mask).logits
        stock_answers = model.generate(prompts, max_new_tokens=12)
    real = attention_mask.bool()
    torch.testing.assert_close(ours_logits[real], stock_logits[real], rtol=1e-5, atol=1e-5)
    assert ours_answers == stock_answers
