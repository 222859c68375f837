"""Entity matching: the deterministic rules, the checks on an LLM's reply, and the LLM matcher with the
project's own (tiny, untrained) LLM."""

from __future__ import annotations

import pytest
import torch

from bubogpt.grounding.matcher import LLMMatcher, RuleMatcher, lemma, llm_prompt, parse_llm_reply
from bubogpt.grounding.result import AnswerSpan, Entity


def entity(entity_id: int, label: str, colour_name: str | None = None, score: float = 0.9) -> Entity:
    return Entity(entity_id, label, "#000000", [[0, 0, 1, 1]], [], score, [colour_name] if colour_name else [])


def linked(answer: str, spans: list[AnswerSpan]) -> list[tuple[str, int]]:
    for span in spans:
        assert answer[span.start:span.end] == span.text  # offsets point at the text
    return [(s.text, s.entity_id) for s in spans]


def assert_disjoint_and_sorted(spans: list[AnswerSpan]) -> None:
    for a, b in zip(spans, spans[1:]):
        assert a.end <= b.start


@pytest.mark.parametrize(
    "word, expected",
    [("circles", "circle"), ("Squares", "square"), ("crosses", "cross"), ("cross", "cross"), ("boxes", "box"),
     ("stars", "star"), ("hexagons", "hexagon"), ("berries", "berry"), ("people", "person"), ("bus", "bus"),
     ("glass", "glass"), ("is", "is")],
)  # fmt: skip
def test_lemma(word, expected):
    assert lemma(word) == expected


def test_plural_and_singular_mentions_link_to_the_same_entity():
    answer = "Two circles and a star: the circle on the left is bigger than the stars."
    spans = RuleMatcher().match(answer, [entity(0, "circle"), entity(1, "star")])
    assert linked(answer, spans) == [("circles", 0), ("star", 1), ("circle", 0), ("stars", 1)]


def test_adjectives_join_the_span_and_colour_picks_the_entity():
    # Two circles: the colour named in the answer decides which one each mention means.
    answer = "The red circle is left of the blue circle, and a big green star is at the top."
    entities = [entity(0, "circle", "blue", score=0.95), entity(1, "circle", "red", score=0.6), entity(2, "star", "green")]
    spans = RuleMatcher().match(answer, entities)
    assert linked(answer, spans) == [("red circle", 1), ("blue circle", 0), ("big green star", 2)]
    # Without a colour the better-scoring circle is chosen.
    assert linked("A circle.", RuleMatcher().match("A circle.", entities)) == [("circle", 0)]


def test_a_colour_no_entity_has_still_links_by_the_noun():
    answer = "I see a purple square."
    assert linked(answer, RuleMatcher().match(answer, [entity(3, "square", "yellow")])) == [("purple square", 3)]


def test_repeated_mentions_entity_not_mentioned_and_mention_without_entity():
    answer = "A triangle, another triangle, and a hexagon."
    entities = [entity(0, "triangle"), entity(1, "cross")]  # the cross is never mentioned
    spans = RuleMatcher().match(answer, entities)
    # Both triangles link; "hexagon" has no entity and stays unlinked; the cross gets no span.
    assert linked(answer, spans) == [("triangle", 0), ("triangle", 0)]
    assert {s.entity_id for s in spans} == {0}


def test_synonyms_and_multi_word_labels_do_not_overlap():
    answer = "A man stands by the traffic light; the light is red and a disc lies nearby."
    entities = [entity(0, "person"), entity(1, "traffic light"), entity(2, "light"), entity(3, "circle")]
    spans = RuleMatcher().match(answer, entities)
    assert linked(answer, spans) == [("man", 0), ("traffic light", 1), ("light", 2), ("disc", 3)]
    assert_disjoint_and_sorted(spans)


def test_words_inside_other_words_are_not_mentions():
    answer = "Circles aside, the starfish is not a star... it is a starry sky."
    spans = RuleMatcher().match(answer, [entity(0, "star")])
    assert linked(answer, spans) == [("star", 0)]


# --- the checks on an LLM reply -------------------------------------------------------------------


ENTITIES = [entity(0, "circle", "red"), entity(1, "circle", "blue"), entity(2, "star", "green")]
ANSWER = "The red circle touches the star. The star is green."


def test_a_well_formed_reply_links_every_occurrence():
    reply = "red circle - red circle\nstar - star"
    spans = parse_llm_reply(reply, ANSWER, ENTITIES)
    assert linked(ANSWER, spans) == [("red circle", 0), ("star", 2), ("star", 2)]


def test_malformed_lines_unknown_entities_and_spans_not_in_the_answer_are_dropped():
    reply = "\n".join([
        "Sure! Here are the links:",  # no separator: not a link
        "red circle -",  # no entity
        "- star",  # no span
        "blue circle - blue circle",  # not in the answer
        "touches - hexagon",  # no such entity
        "star - star",  # fine
        "the star - star",  # overlaps the accepted "star": dropped
        "~~~ garbage ### - - -",
    ])  # fmt: skip
    spans = parse_llm_reply(reply, ANSWER, ENTITIES)
    assert linked(ANSWER, spans) == [("star", 2), ("star", 2)]


def test_reply_entity_names_resolve_by_noun_and_colour():
    # The model may write the plain label ("circle") or a plural; the span's colour decides which circle.
    spans = parse_llm_reply("red circle - circles", ANSWER, ENTITIES)
    assert linked(ANSWER, spans) == [("red circle", 0)]
    assert parse_llm_reply("", ANSWER, ENTITIES) == []
    assert parse_llm_reply("\x00\x01 - \n\n-", ANSWER, ENTITIES) == []


def test_prompt_names_same_label_entities_by_colour():
    prompt = llm_prompt(ANSWER, ENTITIES)
    assert prompt.endswith(f"Objects: red circle, blue circle, star\nAnswer: {ANSWER}\nLinks:")


# --- the LLM matcher with the project's own LLM -------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llm():
    """The project's tiny BuboGPT, untrained, with a small tokenizer that knows the prompt's words."""
    from bubogpt.config import tiny
    from bubogpt.grounding.matcher import FEW_SHOT
    from bubogpt.modeling_bubogpt import BuboGPT
    from bubogpt.tokenizer import build_tiny_tokenizer

    torch.manual_seed(0)
    config = tiny()
    config.max_context_tokens = 2000
    config.llm.max_position_embeddings = 2048
    texts = [FEW_SHOT, ANSWER, "Objects: red circle, blue circle, star", "Nothing here."]
    return BuboGPT.build(config, build_tiny_tokenizer(texts, vocab_size=400)).eval()


def test_llm_matcher_with_an_untrained_llm_never_breaks_and_falls_back_to_rules(tiny_llm):
    matcher = LLMMatcher(tiny_llm, max_new_tokens=12)
    answers = [ANSWER, "Nothing here.", ""]
    results = matcher.match_batch(answers, [ENTITIES, ENTITIES, ENTITIES])
    assert len(results) == 3
    for answer, spans in zip(answers, results):
        assert_disjoint_and_sorted(spans)
        for span in spans:
            assert answer[span.start:span.end] == span.text and span.entity_id in {0, 1, 2}
    # Whatever the random model wrote, the rules fill in every mention it did not claim.
    assert {s.text for s in results[0]} >= {"red circle"} and results[1] == [] and results[2] == []


def test_llm_matcher_survives_a_prompt_longer_than_the_context(tiny_llm):
    matcher = LLMMatcher(tiny_llm, max_new_tokens=12)
    long_answer = "The red circle. " + "word " * 3000
    spans = matcher.match(long_answer, ENTITIES)  # PromptTooLongError inside: rules only
    assert linked(long_answer, spans) == [("red circle", 0)]
