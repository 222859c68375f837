"""Scoring of generated answers from the ground truth (bubogpt/evaluation.py)."""

import inspect

import pytest

from bubogpt.data import vocab
from bubogpt.evaluation import (
    CHANCE,
    IMAGE_WORDS,
    SOUND_WORDS,
    EvalReport,
    ScoringError,
    describes_image,
    format_table,
    meets_target,
    named_sounds,
    says_unrelated,
    score_image_qa,
    score_localisation,
    score_sound,
    talks_about_sound,
)
from bubogpt.training import SERVED_PROMPT_STYLE, fixed_instruction, stage_configs
from bubogpt.training.prompts import row_prompt
from workflows.evaluate import report_json


def qa_meta(qtype, key):
    return {"qtype": qtype, "answer_key": key}


@pytest.mark.parametrize(
    "answer, meta, right",
    [
        ("The circle is red.", qa_meta("colour", "red"), True),
        ("It is blue.", qa_meta("colour", "red"), False),
        ("The red circle is blue.", qa_meta("colour", "blue"), False),  # two colours named: ambiguous
        ("The purple object is a hexagon.", qa_meta("kind", "hexagon"), True),  # the asked colour repeated
        ("It is a star or a cross.", qa_meta("kind", "star"), False),
        ("The green square is on the left.", qa_meta("position", "left"), True),
        ("It is in the centre of the image.", qa_meta("position", "center"), True),
        ("You can find the green square at the top.", qa_meta("position", "bottom"), False),
        ("There are three shapes in the image.", qa_meta("count", "three"), True),
        ("I can see two shapes.", qa_meta("count", "three"), False),
        ("", qa_meta("colour", "red"), False),
    ],
)
def test_image_qa_scoring(answer, meta, right):
    assert score_image_qa(answer, meta) is right


def test_every_rendered_corpus_answer_scores_right():
    # The corpus's own answer templates, rendered for every value, must score as right and every
    # other value as wrong: the parser understands the whole answer vocabulary.
    for qtype in vocab.QUESTION_TYPES:
        for variant in range(9):
            for colour in vocab.COLOUR_NAMES:
                for kind in vocab.OBJECT_KINDS:
                    for position in vocab.POSITIONS:
                        _, answer = vocab.question_answer(qtype, colour, kind, position, 2, variant)
                        key = {"colour": colour, "kind": kind, "position": position, "count": "two"}[qtype]
                        assert score_image_qa(answer, qa_meta(qtype, key)), answer
                        others = {"colour": vocab.COLOUR_NAMES, "kind": vocab.OBJECT_KINDS,
                                  "position": vocab.POSITIONS, "count": ("one", "three")}[qtype]  # fmt: skip
                        wrong = next(o for o in others if o != key)
                        assert not score_image_qa(answer, qa_meta(qtype, wrong)), answer


def test_sound_kinds_are_told_apart_in_every_caption_template():
    for sound in vocab.SOUND_KINDS:
        for variant in range(12):
            short = vocab.audio_caption(sound, 3.0, True, variant)
            detailed = vocab.detailed_audio_caption(sound, 3.0, False, 4, variant)
            for caption in (short, detailed):
                assert named_sounds(caption) == {sound}, caption
                assert score_sound(caption, {"sound_kind": sound})
    assert named_sounds("a two-tone siren") == {"siren"}  # not also a "tone"
    assert not score_sound("A steady tone, then a siren.", {"sound_kind": "tone"})


def test_localisation_needs_the_source_object_and_no_unrelated_claim():
    meta = {"source_kind": "circle", "colour": "red", "position": "left", "sound_kind": "tone"}
    for variant in range(4):
        caption = vocab.localisation_caption("tone", "red", "circle", "left", variant)
        assert score_localisation(caption, meta) == (True, True), caption
    assert score_localisation("The sound comes from the red circle at the top.", meta) == (True, False)
    assert score_localisation("The sound comes from the blue circle on the left.", meta) == (False, False)
    assert score_localisation("They seem unrelated. A red circle on the left.", meta) == (False, False)
    with pytest.raises(ScoringError, match="source_kind"):
        score_localisation("x", {"colour": "red"})


def test_unrelated_phrases():
    for variant in range(3):
        assert says_unrelated(vocab.negative_caption("A picture of a star.", "A low buzz.", variant))
    assert says_unrelated("The sound and the image are not related.")
    assert not says_unrelated("The sound is a low buzz, coming from the red square on the left.")


def test_report_rates_and_table():
    report = EvalReport()
    report.add_row("llava_instruct", qa_meta("colour", "red"), "The star is red.")
    report.add_row("llava_instruct", qa_meta("colour", "red"), "The star is blue.")
    report.add_row("clotho", {"sound_kind": "buzz"}, "The audio is a low buzz.")
    report.add_row("vggss", {"related": True, "source_kind": "star", "colour": "red", "position": "top"},
                   "The red star at the top is making a rapid beeping.")  # fmt: skip
    report.add_row("vggss", {"related": True, "source_kind": "star", "colour": "red", "position": "top"},
                   "They seem unrelated.")  # fmt: skip
    report.add_row("negative_pairs", {"related": False}, "They seem unrelated. A picture of a circle.")
    metrics = report.metrics()
    assert metrics["image_qa_colour"] == 0.5
    assert metrics["sound_kind"] == 1.0
    assert metrics["localisation"] == 0.5 and metrics["localisation_position"] == 0.5
    assert metrics["false_alarm_rate"] == 0.5
    assert metrics["unrelated_rate"] == 1.0
    assert meets_target("unrelated_rate", 1.0) and not meets_target("false_alarm_rate", 0.5)
    table = format_table({"full": metrics, "ablation": {"unrelated_rate": 0.0}})
    assert "unrelated_rate" in table and "100.0%" in table and "0.0%" in table
    with pytest.raises(ScoringError, match="no evaluation"):
        report.add_row("grounding", {}, "A picture.")


def test_an_answer_that_describes_the_modality_it_was_not_given_is_not_right():
    # The demo's failures (issue 16): a sound answer that also invents a picture, and the reverse.
    assert not score_sound("A rising chirp. The image shows a red square in the center.", {"sound_kind": "chirp"})
    assert not score_sound("The red circle is making a steady tone.", {"sound_kind": "tone"})
    assert score_sound("A rising chirp lasting about three seconds.", {"sound_kind": "chirp"})
    assert not score_image_qa("The circle is red. A short clip contains a rising chirp.", qa_meta("colour", "red"))
    assert not score_image_qa("The circle is red and it makes a sound.", qa_meta("colour", "red"))


def test_modality_words_never_occur_in_the_corpus_answers_of_the_other_modality():
    # Every answer the corpus holds about a sound is free of image words and the reverse, so a
    # model that answers like the corpus is never counted as hallucinating.
    for text in vocab.audio_texts():
        assert not describes_image(text), text
    for text in vocab.scene_caption_texts() + vocab.image_qa_texts()[1::2]:
        assert not talks_about_sound(text), text
    for word in ("image", "picture", "circle", "red", "background", "left"):
        assert word in IMAGE_WORDS
    for word in ("sound", "audio", "recording", "pitch", "loud", "seconds"):
        assert word in SOUND_WORDS
    for word in ("it", "is", "the", "three", "about"):  # say nothing about a modality
        assert word not in IMAGE_WORDS | SOUND_WORDS
    assert talks_about_sound("I hear a hiss.") and talks_about_sound("A two-tone siren.")
    assert describes_image("The audio is a low buzz next to a yellow star.")


def test_modality_hallucination_rate_counts_single_modality_answers_that_describe_the_other():
    report = EvalReport()
    report.add_row("llava_instruct", qa_meta("colour", "red"), "The star is red.")
    report.add_row("llava_instruct", qa_meta("count", "two"), "There are two shapes. A low buzz can be heard.")
    report.add_row("cc_sbu_align", {"object_kinds": ["star"], "colours": ["red"]}, "A picture of a red star.")
    report.add_row("cc_sbu_align", {"object_kinds": ["star"], "colours": ["red"]}, "A picture of a red star and a hiss.")
    report.add_row("clotho", {"sound_kind": "buzz"}, "The audio is a low buzz.")
    report.add_row("clotho", {"sound_kind": "hiss"}, "It sounds like static or escaping air.")
    report.add_row("wavcaps", {"sound_kind": "buzz"}, "A low buzz. The image shows a blue circle.")
    report.add_row("vggss", {"related": True, "source_kind": "star", "colour": "red", "position": "top"},
                   "The red star at the top is making a rapid beeping.")  # both given: not counted  # fmt: skip
    metrics = report.metrics()
    assert metrics["modality_hallucination_rate"] == 3 / 7
    assert metrics["modality_hallucination_image_only"] == 2 / 4
    assert metrics["modality_hallucination_audio_only"] == 1 / 3
    assert metrics["caption_objects"] == 0.5 and metrics["image_qa_count"] == 0.0
    assert meets_target("modality_hallucination_rate", 0.04) and not meets_target("modality_hallucination_rate", 0.5)
    # eval.json carries the rates and, next to the scores, the chance of each question type.
    data = report_json(report, "model")
    assert data["metrics"]["modality_hallucination_audio_only"] == 1 / 3
    assert data["chance"] == {"image_qa_colour": 1 / len(vocab.COLOUR_NAMES), "image_qa_count": 1 / 3,
                              "sound_kind": 1 / len(vocab.SOUND_KINDS), "sound_kind_clotho": 1 / len(vocab.SOUND_KINDS),
                              "sound_kind_wavcaps": 1 / len(vocab.SOUND_KINDS), "localisation": CHANCE["localisation"],
                              "localisation_position": CHANCE["localisation_position"], "false_alarm_rate": 0.5}  # fmt: skip


def test_table_shows_chance_next_to_each_score():
    table = format_table({"model": {"image_qa_kind": 0.97, "sound_kind": 0.5, "modality_hallucination_rate": 0.0}})
    header, _, *rows = table.splitlines()
    assert header.split()[-2:] == ["chance", "target"]
    kind = next(r for r in rows if r.startswith("image_qa_kind"))
    assert "16.7%" in kind and ">= 95%" in kind
    assert CHANCE["image_qa_colour"] == 1 / len(vocab.COLOUR_NAMES)
    assert CHANCE["localisation"] == 1 / (len(vocab.OBJECT_KINDS) * len(vocab.COLOUR_NAMES))


def test_the_evaluator_and_stage_2_ask_as_serve_renders_a_request():
    # The demo's failure (issue 16): a model trained in one template and served in another (the chat
    # template's system sentence names an image and an audio) described media it was not given.
    from serve.protocol import ChatRequest, Message
    from workflows.evaluate import generate_answers

    rows = [({"dataset": "cc_sbu_align", "instruction": "", "pixel_values": object()}, ("vision",)),
            ({"dataset": "clotho", "instruction": "", "fbank": object()}, ("audio",)),
            ({"dataset": "vggss", "instruction": "", "pixel_values": object(), "fbank": object()}, ("vision", "audio"))]
    for row, modalities in rows:
        served = ChatRequest(messages=[Message("user", fixed_instruction(row), modalities)]).conversation().render()
        assert row_prompt(row, "chat", fixed_instruction(row)) == served
        assert row_prompt(row, stage_configs("tiny")["stage2"].prompt_style, fixed_instruction(row)) == served
        assert row_prompt(row, stage_configs("7b")["stage2"].prompt_style, fixed_instruction(row)) == served
    assert inspect.signature(generate_answers).parameters["prompt_style"].default == SERVED_PROMPT_STYLE == "chat"  # eval asks as users are served
