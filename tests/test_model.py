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
    conversation.add_user("What is it?", modalities=["audio", "vision"])
    conversation.add_assistant("A red circle.")
    conversation.add_user("And the sound?")
    assert conversation.modalities() == ["vision", "audio"]
    rendered = "".join(s if isinstance(s, str) else f"[{s.modality}]" for s in conversation.render())
    assert rendered.endswith(
        "###Human: <Vision>[vision]</Vision> <Audio>[audio]</Audio> What is it?###Assistant: A red circle.###"
        "Human: And the sound?###Assistant:"
    )


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
