"""Scoring generated answers against the synthetic corpus's ground truth (`meta`), no Ray.

Answers are parsed with the corpus vocabulary (`bubogpt.data.vocab`): an answer is right when the
attribute it names is the true one, whatever the wording -- not when it equals a reference string.
An answer that names two different values of the asked attribute ("red ... blue") is wrong.

Tasks and what counts as right:

    image_qa        llava_instruct eval rows; meta {"qtype", "answer_key"}: the one colour / kind /
                    position / count the answer names equals answer_key (accuracy per qtype).
    sound           clotho and wavcaps eval rows; meta {"sound_kind"}: the one sound kind named.
    localisation    vggss eval rows (matched image + sound); meta {"source_kind", "colour",
                    "position"}: the answer names the source object's kind and colour and does
                    not call the pair unrelated; `localisation_position`: also its position word.
    relatedness     image + audio rows; meta {"related"}: "unrelated_rate" on mismatched pairs
                    (negative_pairs) and "false_alarm_rate" (called unrelated) on matched pairs (vggss).
    captions        cc_sbu_align eval rows ("Describe this picture."); meta {"object_kinds",
                    "colours"}: `caption_objects`, the caption names exactly the picture's kinds and
                    colours.
    modality        `modality_hallucination_rate`: of the answers to prompts with only an image
    hallucination   (llava_instruct, cc_sbu_align), those that talk about a sound, plus of the
                    answers to prompts with only audio (clotho, wavcaps), those that describe an
                    image, over all those answers; `..._image_only` and `..._audio_only` apart. The
                    words come from the corpus vocabulary (`vocab.modality_words`, plus the named
                    kinds, colours and sounds). An answer that describes the modality it was not
                    given is never right for its task, whatever else it names. The evaluator asks
                    every row in the served chat template (`workflows/evaluate.py`), whose system
                    sentence names an image and an audio.

`CHANCE` gives, per metric, the score of guessing (uniformly over the vocabulary's values).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from bubogpt.data import vocab

# --------------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------------

_COLOUR_PATTERNS = {c: re.compile(rf"\b{c}\b", re.I) for c in vocab.COLOUR_NAMES}
_KIND_PATTERNS = {k: re.compile(rf"\b{k}(?:e?s)?\b", re.I) for k in vocab.OBJECT_KINDS}
_POSITION_PATTERNS = {
    "left": re.compile(r"\bleft\b", re.I),
    "right": re.compile(r"\bright\b", re.I),
    "top": re.compile(r"\btop\b", re.I),
    "bottom": re.compile(r"\bbottom\b", re.I),
    "center": re.compile(r"\bcent(?:er|re)\b|\bmiddle\b", re.I),
}
_COUNT_PATTERNS = {w: re.compile(rf"\b{w}\b", re.I) for w in vocab.NUMBER_WORDS}
# Sound kinds by their characteristic words; "two-tone siren" must not count as a "tone".
_SOUND_PATTERNS = {
    "tone": re.compile(r"(?<!two-)\btones?\b", re.I),
    "buzz": re.compile(r"\bbuzz(?:es|ing)?\b", re.I),
    "chirp": re.compile(r"\bchirp(?:s|ing)?\b", re.I),
    "pulses": re.compile(r"\bbeep(?:s|ing)?\b|\bpulses?\b", re.I),
    "hiss": re.compile(r"\bhiss(?:es|ing)?\b", re.I),
    "siren": re.compile(r"\bsirens?\b", re.I),
}
_UNRELATED = re.compile(
    r"\bunrelated\b|\bnot (?:seem to )?(?:be )?(?:related|match)|\bdoes not (?:seem to )?match\b|\bno relation\b",
    re.I,
)


def _named(text: str, patterns: Mapping[str, re.Pattern]) -> set[str]:
    return {name for name, pattern in patterns.items() if pattern.search(text)}


def named_colours(text: str) -> set[str]:
    return _named(text, _COLOUR_PATTERNS)


def named_kinds(text: str) -> set[str]:
    return _named(text, _KIND_PATTERNS)


def named_positions(text: str) -> set[str]:
    return _named(text, _POSITION_PATTERNS)


def named_counts(text: str) -> set[str]:
    return _named(text, _COUNT_PATTERNS)


def named_sounds(text: str) -> set[str]:
    return _named(text, _SOUND_PATTERNS)


def says_unrelated(text: str) -> bool:
    return bool(_UNRELATED.search(text))


IMAGE_WORDS, SOUND_WORDS = vocab.modality_words()


def _answer_words(text: str) -> set[str]:
    return {w.lower() for w in re.findall(r"[A-Za-z]+", text)}


def talks_about_sound(text: str) -> bool:
    """The answer names a sound kind or uses a word only the corpus's sound texts use."""
    return bool(named_sounds(text)) or not _answer_words(text).isdisjoint(SOUND_WORDS)


def describes_image(text: str) -> bool:
    """The answer names an object kind or colour or uses a word only the corpus's picture texts use."""
    return bool(named_kinds(text) or named_colours(text)) or not _answer_words(text).isdisjoint(IMAGE_WORDS)


IMAGE_ONLY_DATASETS, AUDIO_ONLY_DATASETS = ("llava_instruct", "cc_sbu_align"), ("clotho", "wavcaps")


def modality_hallucination(dataset: str, answer: str) -> dict[str, bool]:
    """For a row of one modality, whether its answer talks about the other one: the overall metric
    and its image-only or audio-only part; {} for rows with both media."""
    if dataset in IMAGE_ONLY_DATASETS:
        wrong = talks_about_sound(answer)
        return {"modality_hallucination_rate": wrong, "modality_hallucination_image_only": wrong}
    if dataset in AUDIO_ONLY_DATASETS:
        wrong = describes_image(answer)
        return {"modality_hallucination_rate": wrong, "modality_hallucination_audio_only": wrong}
    return {}


def _only(named: set[str], expected: str) -> bool:
    return named == {expected}


# --------------------------------------------------------------------------------------------------
# Scoring one answer
# --------------------------------------------------------------------------------------------------


class ScoringError(ValueError):
    """A row whose ground truth does not allow scoring (missing meta fields)."""


def _require(meta: Mapping[str, Any], keys: Iterable[str], task: str) -> None:
    missing = [k for k in keys if k not in meta]
    if missing:
        raise ScoringError(f"{task}: meta lacks {missing} (has {sorted(meta)})")


def score_image_qa(answer: str, meta: Mapping[str, Any]) -> bool:
    """The attribute asked (meta["qtype"]) named in the answer is exactly meta["answer_key"].

    For "kind", the question names the object's colour, which answers may repeat; for "position"
    answers may repeat colour and kind: only the asked attribute is parsed.
    """
    _require(meta, ("qtype", "answer_key"), "image_qa")
    parse = {"colour": named_colours, "kind": named_kinds, "position": named_positions, "count": named_counts}
    if meta["qtype"] not in parse:
        raise ScoringError(f"image_qa: unknown question type {meta['qtype']!r}")
    return _only(parse[meta["qtype"]](answer), meta["answer_key"]) and not talks_about_sound(answer)


def score_sound(answer: str, meta: Mapping[str, Any]) -> bool:
    """The one sound kind named is the true one, and the answer describes no image."""
    _require(meta, ("sound_kind",), "sound")
    return _only(named_sounds(answer), meta["sound_kind"]) and not describes_image(answer)


def score_caption(answer: str, meta: Mapping[str, Any]) -> bool:
    """The caption names exactly the picture's object kinds and colours, and no sound."""
    _require(meta, ("object_kinds", "colours"), "caption")
    return (named_kinds(answer) == set(meta["object_kinds"]) and named_colours(answer) == set(meta["colours"])
            and not talks_about_sound(answer))  # fmt: skip


def score_localisation(answer: str, meta: Mapping[str, Any]) -> tuple[bool, bool]:
    """(object right: its kind and colour named and nothing else, object and position right)."""
    _require(meta, ("source_kind", "colour", "position"), "localisation")
    if says_unrelated(answer):
        return False, False
    right_object = _only(named_kinds(answer), meta["source_kind"]) and _only(named_colours(answer), meta["colour"])
    return right_object, right_object and _only(named_positions(answer), meta["position"])


# --------------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------------


@dataclass
class Tally:
    right: int = 0
    total: int = 0

    def add(self, ok: bool) -> None:
        self.right += int(ok)
        self.total += 1

    @property
    def rate(self) -> float | None:
        return self.right / self.total if self.total else None


@dataclass
class EvalReport:
    """Counts per metric; `metrics()` gives the rates, `table()` a printable summary."""

    tallies: dict[str, Tally] = field(default_factory=lambda: defaultdict(Tally))
    examples: list[dict[str, Any]] = field(default_factory=list)

    def add_row(self, dataset: str, meta: Mapping[str, Any], answer: str, keep_example: bool = False) -> None:
        """Score one generated answer for an eval row of `dataset`."""
        scored: dict[str, bool] = {}
        if dataset == "llava_instruct":
            scored[f"image_qa_{meta['qtype']}"] = score_image_qa(answer, meta)
            scored["image_qa"] = scored[f"image_qa_{meta['qtype']}"]
        elif dataset == "cc_sbu_align":
            if "object_kinds" in meta:  # corpora synthesised before the captions carried their objects
                scored["caption_objects"] = score_caption(answer, meta)
        elif dataset in ("clotho", "wavcaps"):
            scored["sound_kind"] = score_sound(answer, meta)
            scored[f"sound_kind_{dataset}"] = scored["sound_kind"]
        elif dataset in ("vggss", "negative_pairs"):
            related = meta.get("related", dataset == "vggss")
            if related:
                scored["localisation"], scored["localisation_position"] = score_localisation(answer, meta)
                scored["false_alarm_rate"] = says_unrelated(answer)
            else:
                scored["unrelated_rate"] = says_unrelated(answer)
        else:
            raise ScoringError(f"no evaluation defined for dataset {dataset!r}")
        self._add(dataset, meta, answer, scored | modality_hallucination(dataset, answer), keep_example)

    def _add(self, dataset: str, meta: Mapping[str, Any], answer: str, scored: dict[str, bool], keep_example: bool) -> None:
        for name, ok in scored.items():
            self.tallies[name].add(ok)
        if keep_example:
            self.examples.append({"dataset": dataset, "answer": answer, "meta": dict(meta), "scores": scored})

    def metrics(self) -> dict[str, float]:
        return {name: tally.rate for name, tally in sorted(self.tallies.items()) if tally.rate is not None}

    def counts(self) -> dict[str, dict[str, int]]:
        return {name: {"right": t.right, "total": t.total} for name, t in sorted(self.tallies.items())}


# Targets of issue #16 (4.): metric -> (comparison, threshold).
TARGETS = {
    "image_qa_colour": (">=", 0.95),
    "image_qa_kind": (">=", 0.95),
    "image_qa_count": (">=", 0.95),
    "image_qa_position": (">=", 0.90),
    "sound_kind": (">=", 0.95),
    "localisation": (">=", 0.85),
    "unrelated_rate": (">=", 0.90),
    "false_alarm_rate": ("<=", 0.10),
    "modality_hallucination_rate": ("<=", 0.05),
}

# Score of a uniform guess over the vocabulary's values, per metric (None: no meaningful guess).
# Counts are 1-3 objects; localisation needs the source's kind and colour (and its position); a
# related / unrelated call is a coin toss.
_N_KINDS, _N_COLOURS, _N_POSITIONS = len(vocab.OBJECT_KINDS), len(vocab.COLOUR_NAMES), len(vocab.POSITIONS)
CHANCE = {
    "image_qa_colour": 1 / _N_COLOURS,
    "image_qa_kind": 1 / _N_KINDS,
    "image_qa_position": 1 / _N_POSITIONS,
    "image_qa_count": 1 / 3,
    "sound_kind": 1 / len(vocab.SOUND_KINDS),
    "sound_kind_clotho": 1 / len(vocab.SOUND_KINDS),
    "sound_kind_wavcaps": 1 / len(vocab.SOUND_KINDS),
    "localisation": 1 / (_N_KINDS * _N_COLOURS),
    "localisation_position": 1 / (_N_KINDS * _N_COLOURS * _N_POSITIONS),
    "unrelated_rate": 0.5,
    "false_alarm_rate": 0.5,
}


def meets_target(metric: str, value: float) -> bool | None:
    if metric not in TARGETS:
        return None
    op, threshold = TARGETS[metric]
    return value >= threshold if op == ">=" else value <= threshold


def format_table(columns: Mapping[str, Mapping[str, float]], counts: Mapping[str, Mapping[str, int]] | None = None) -> str:
    """Metrics of one or more models side by side: columns {model name: {metric: rate}}."""
    names = sorted({m for metrics in columns.values() for m in metrics})
    header = ["metric", *columns, "chance", "target"]
    lines = []
    for metric in names:
        target = TARGETS.get(metric)
        cells = [metric]
        for metrics in columns.values():
            value = metrics.get(metric)
            cells.append("-" if value is None else f"{100 * value:6.1f}%")
        if counts is not None and metric in counts:
            cells[-1] += f" ({counts[metric]['right']}/{counts[metric]['total']})"
        cells.append(f"{100 * CHANCE[metric]:.1f}%" if metric in CHANCE else "")
        cells.append(f"{target[0]} {100 * target[1]:.0f}%" if target else "")
        lines.append(cells)
    widths = [max(len(str(row[i])) for row in [header, *lines]) for i in range(len(header))]
    render = lambda row: "  ".join(str(c).ljust(w) for c, w in zip(row, widths))  # noqa: E731
    return "\n".join([render(header), render(["-" * w for w in widths]), *map(render, lines)])
