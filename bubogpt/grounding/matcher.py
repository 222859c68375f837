"""Entity matching: which words of the answer refer to which grounded entity.

Two matchers, one result type (`AnswerSpan`: character offsets into the answer, never overlapping):

- `RuleMatcher` (deterministic): finds each entity's noun in the answer by normalised lemma (plural
  and singular alike, a small synonym table), extends the mention left over adjectives ("the big red
  circle" -> "big red circle"), and when several entities share the noun prefers the one whose
  colour the mention names.
- `LLMMatcher` (the default when a language model is configured; the reference sent this to a hosted
  chat API): the project's own LLM gets a few-shot prompt listing the entity names and the answer,
  and replies lines `span - entity`. Every line is checked: the span must occur in the answer (all
  its whole-word occurrences are linked), the entity must exist; malformed lines, unknown entities,
  spans not in the text and overlaps are dropped, never raised. Mentions the LLM missed are then
  filled in by the rules (`fill_with_rules`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

from bubogpt.conversation import instruction_prompt
from bubogpt.grounding.result import AnswerSpan, Entity

logger = logging.getLogger(__name__)

WORD = re.compile(r"[A-Za-z0-9]+(?:'[A-Za-z]+)?")

COLOUR_WORDS = frozenset(
    "red orange yellow green blue purple violet pink brown black white grey gray gold silver "
    "beige cyan magenta turquoise navy maroon".split()
)
SIZE_WORDS = frozenset("big small large little tiny huge tall short long wide narrow round".split())
SHADE_WORDS = frozenset("dark light bright pale".split())
ADJECTIVES = COLOUR_WORDS | SIZE_WORDS | SHADE_WORDS

# Words in one group name the same kind of thing (first = canonical).
SYNONYM_GROUPS = (
    ("circle", "disc", "disk", "ring", "dot"),
    ("square", "box"),
    ("cross", "plus"),
    ("person", "man", "woman", "boy", "girl", "child", "kid", "guy", "lady", "human"),
    ("car", "automobile", "vehicle"),
    ("bicycle", "bike"),
    ("motorcycle", "motorbike"),
    ("airplane", "plane", "aeroplane", "aircraft", "jet"),
    ("dog", "puppy"),
    ("cat", "kitten", "kitty"),
    ("television", "tv"),
    ("sofa", "couch"),
    ("cup", "mug"),
    ("phone", "cellphone", "smartphone"),
)
CANONICAL = {word: group[0] for group in SYNONYM_GROUPS for word in group}

IRREGULAR_PLURALS = {
    "people": "person", "men": "man", "women": "woman", "children": "child", "mice": "mouse",
    "geese": "goose", "feet": "foot", "teeth": "tooth", "knives": "knife", "wives": "wife",
    "leaves": "leaf", "wolves": "wolf", "shelves": "shelf", "halves": "half", "buses": "bus",
    "oxen": "ox", "kids": "kid",
}  # fmt: skip
NOT_PLURAL = frozenset(
    "is was has this his its us yes glass grass cross bus gas lens series species news dress "
    "class boss chess bass mass moss canvas across always less bus plus".split()
)


def lemma(word: str) -> str:
    """Lower-case singular: 'Circles' -> 'circle', 'boxes' -> 'box', 'crosses' -> 'cross'."""
    word = word.lower()
    if word in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[word]
    if word in NOT_PLURAL or len(word) <= 3 or word.endswith(("ss", "us", "is")):
        return word
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("sses", "xes", "ches", "shes", "zes", "oes")):
        return word[:-2]
    if word.endswith("s"):
        return word[:-1]
    return word


def canonical(word: str) -> str:
    """The lemma, mapped to its synonym group's first word."""
    base = lemma(word)
    return CANONICAL.get(base, base)


@dataclass
class _Word:
    text: str
    start: int
    end: int

    @property
    def key(self) -> str:
        return canonical(self.text)


def _words(text: str) -> list[_Word]:
    return [_Word(m.group(), m.start(), m.end()) for m in WORD.finditer(text)]


@dataclass
class _Mention:
    start: int  # character offsets
    end: int
    colours: set[str]  # colour words in the mention
    candidates: list[Entity]


def _label_parts(entity: Entity) -> tuple[list[str], set[str]]:
    """An entity label's noun words (canonical, all must appear) and the colour words it carries."""
    words = [w.lower() for w in WORD.findall(entity.label)]
    if not words:
        return [], set()
    # The last word is the head noun ("light" in "traffic light"); adjectives before it are attributes.
    nouns = [canonical(w) for w in words[:-1] if w not in ADJECTIVES] + [canonical(words[-1])]
    colours = {w for w in words[:-1] if w in COLOUR_WORDS} | {a.lower() for a in entity.attributes if a.lower() in COLOUR_WORDS}
    return nouns, colours


def _prefer(candidates: list[Entity], colours: set[str]) -> Entity:
    """The candidate whose colours the mention names, else the best scoring (ties: lowest id)."""
    named = [e for e in candidates if colours & _label_parts(e)[1]] if colours else []
    pool = named or candidates
    return sorted(pool, key=lambda e: (-e.score, e.id))[0]


def _drop_overlaps(spans: list[AnswerSpan], taken: list[AnswerSpan] | None = None) -> list[AnswerSpan]:
    """Keep spans in the given order unless they overlap one already kept; result sorted by start."""
    kept = list(taken or [])
    for span in spans:
        if all(span.end <= k.start or span.start >= k.end for k in kept):
            kept.append(span)
    new = kept[len(taken or []):]
    return sorted(new, key=lambda s: s.start)


class RuleMatcher:
    """Deterministic matching by lemma, synonyms and colour adjectives."""

    def _mentions(self, answer: str, entities: Sequence[Entity]) -> list[_Mention]:
        words = _words(answer)
        keys = [w.key for w in words]
        found: dict[tuple[int, int], list[Entity]] = {}
        for entity in entities:
            nouns, _ = _label_parts(entity)
            n = len(nouns)
            if n == 0:
                continue
            for i in range(n - 1, len(words)):
                if keys[i - n + 1 : i + 1] == nouns:
                    found.setdefault((i - n + 1, i), []).append(entity)
        # Longer mentions first (a "traffic light" beats a "light"), then left to right.
        mentions: list[_Mention] = []
        used: set[int] = set()
        for (first, last), candidates in sorted(found.items(), key=lambda kv: (kv[0][0] - kv[0][1], kv[0][0])):
            if used & set(range(first, last + 1)):
                continue
            start = first
            while start > 0 and words[start - 1].text.lower() in ADJECTIVES and start - 1 not in used:
                start -= 1
            colours = {w.text.lower() for w in words[start:last + 1] if w.text.lower() in COLOUR_WORDS}
            used |= set(range(start, last + 1))
            mentions.append(_Mention(words[start].start, words[last].end, colours, candidates))
        return mentions

    def match(self, answer: str, entities: Sequence[Entity]) -> list[AnswerSpan]:
        """Spans of `answer` that mention one of `entities`, sorted, non-overlapping."""
        spans = []
        for mention in self._mentions(answer, entities):
            entity = _prefer(mention.candidates, mention.colours)
            spans.append(AnswerSpan(mention.start, mention.end, answer[mention.start:mention.end], entity.id))
        return sorted(spans, key=lambda s: s.start)

    def resolve_entity(self, name: str, span_text: str, entities: Sequence[Entity]) -> Entity | None:
        """The entity an LLM's entity name means: an exact (case-insensitive) display name, else the
        entities whose nouns the name holds, preferring the colours named in the name or the span."""
        wanted = name.strip().lower()
        for entity in entities:
            if wanted == entity_display_name(entity, entities).lower():
                return entity
        name_keys = [canonical(w) for w in WORD.findall(wanted)]
        candidates = [e for e in entities if _label_parts(e)[0] and all(n in name_keys for n in _label_parts(e)[0])]
        if not candidates:
            return None
        colours = {w.lower() for w in WORD.findall(f"{name} {span_text}") if w.lower() in COLOUR_WORDS}
        return _prefer(candidates, colours)


def entity_display_name(entity: Entity, entities: Sequence[Entity]) -> str:
    """The label, prefixed by its colour when another entity has the same label ("red circle")."""
    if sum(e.label == entity.label for e in entities) > 1 and entity.attributes:
        return f"{entity.attributes[0]} {entity.label}"
    return entity.label


# ---------------------------------------------------------------------------------------------------
# LLM matcher
# ---------------------------------------------------------------------------------------------------

FEW_SHOT = """Link the phrases of the answer to the objects found in the image. Reply with one line per phrase: phrase - object. Use only objects from the list and phrases copied from the answer.

Objects: dog, frisbee, person
Answer: A man throws a red frisbee and his dogs run after it.
Links:
man - person
red frisbee - frisbee
dogs - dog

Objects: red circle, blue circle, star
Answer: The blue circle is left of the star.
Links:
blue circle - blue circle
star - star

"""


def llm_prompt(answer: str, entities: Sequence[Entity]) -> str:
    names = ", ".join(dict.fromkeys(entity_display_name(e, entities) for e in entities))
    return f"{FEW_SHOT}Objects: {names}\nAnswer: {answer}\nLinks:"


LINK_LINE = re.compile(r"^\s*(?:[-*\d.)]+\s+)?(?P<span>.+?)\s+[-\u2013\u2014>:]+\s+(?P<entity>.+?)\s*$")


def parse_llm_reply(reply: str, answer: str, entities: Sequence[Entity],
                    rules: RuleMatcher | None = None) -> list[AnswerSpan]:
    """Turn the LLM's `span - entity` lines into checked spans; anything unusable is dropped.

    A line is kept when the span (quotes trimmed) occurs in the answer as whole words (every
    occurrence is linked, case-insensitively) and the entity resolves to one of `entities`.
    Spans overlapping an earlier line's spans are dropped.
    """
    rules = rules or RuleMatcher()
    accepted: list[AnswerSpan] = []
    for line in reply.splitlines():
        match = LINK_LINE.match(line)
        if not match:
            continue
        span_text = match.group("span").strip().strip("\"'`")
        entity_name = match.group("entity").strip().strip("\"'`.")
        if not span_text or not entity_name:
            continue
        entity = rules.resolve_entity(entity_name, span_text, entities)
        if entity is None:
            logger.debug("LLM named an entity that does not exist: %r", entity_name)
            continue
        pattern = re.compile(r"(?<![A-Za-z0-9])" + re.escape(span_text) + r"(?![A-Za-z0-9])", re.IGNORECASE)
        occurrences = [AnswerSpan(m.start(), m.end(), answer[m.start():m.end()], entity.id)
                       for m in pattern.finditer(answer)]  # fmt: skip
        if not occurrences:
            logger.debug("LLM named a span that is not in the answer: %r", span_text)
            continue
        accepted += _drop_overlaps(occurrences, accepted)
    return sorted(accepted, key=lambda s: s.start)


class LLMMatcher:
    """The project's LLM (`BuboGPT`, or anything with its `generate(prompts, ...)`) links the spans."""

    def __init__(self, model, max_new_tokens: int = 96, fill_with_rules: bool = True):
        self.model = model
        self.max_new_tokens = max_new_tokens
        self.fill_with_rules = fill_with_rules
        self.rules = RuleMatcher()

    def replies(self, answers: Sequence[str], entity_lists: Sequence[Sequence[Entity]]) -> list[str]:
        """One greedy generation per answer, batched. A prompt the model cannot take gives ''."""
        prompts = [instruction_prompt([], llm_prompt(a, e)) for a, e in zip(answers, entity_lists)]
        try:
            return self.model.generate(prompts, max_new_tokens=self.max_new_tokens, do_sample=False)
        except ValueError as error:  # e.g. PromptTooLongError: the rules still match
            logger.warning("entity matching LLM not usable for this batch (%s); using rules only", error)
            return [""] * len(prompts)

    def match_batch(self, answers: Sequence[str], entity_lists: Sequence[Sequence[Entity]]) -> list[list[AnswerSpan]]:
        results = []
        todo = [i for i, entities in enumerate(entity_lists) if entities and answers[i].strip()]
        replies = dict(zip(todo, self.replies([answers[i] for i in todo], [entity_lists[i] for i in todo])))
        for i, (answer, entities) in enumerate(zip(answers, entity_lists)):
            if i not in replies:
                results.append([])
                continue
            spans = parse_llm_reply(replies[i], answer, entities, self.rules)
            if self.fill_with_rules:
                spans = sorted(spans + _drop_overlaps(self.rules.match(answer, entities), spans), key=lambda s: s.start)
            results.append(spans)
        return results

    def match(self, answer: str, entities: Sequence[Entity]) -> list[AnswerSpan]:
        return self.match_batch([answer], [entities])[0]
