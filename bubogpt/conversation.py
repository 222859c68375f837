"""Prompt format: modality slots, the stage-2 instruction template and the chat conversation.

A prompt is a list of segments: plain text (`str`) or a `ModalitySlot`. Only structure creates a
slot: text typed by a user is always a `str` segment, so marker strings inside it
(`<ModalityHere>`, `<Vision>` ...) stay text and can never open a modality slot. Only trusted
recipe templates go through `parse_template`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

SLOT_MARKER = "<ModalityHere>"
MARKUP = {"vision": ("<Vision>", "</Vision>"), "audio": ("<Audio>", "</Audio>")}
# Audio before the image where a prompt holds both, as in every combined prompt the released model
# was trained with (prompts/alignment_audio_image_neg.txt:1-5, alignment_audio_image_region.txt:1-3:
# "<Audio><ModalityHere></Audio> <Vision><ModalityHere></Vision> ...").
MODALITY_ORDER = ("audio", "vision")


@dataclass(frozen=True)
class ModalitySlot:
    """Where the projected query tokens of one modality go."""

    modality: str

    def __post_init__(self) -> None:
        if self.modality not in MARKUP:
            raise ValueError(f"unknown modality {self.modality!r}; expected one of {sorted(MARKUP)}")


Segment = str | ModalitySlot

_TEMPLATE_SLOT = re.compile(
    "|".join(re.escape(open_ + SLOT_MARKER + close) for open_, close in MARKUP.values())
)


def markup(modality: str) -> list[Segment]:
    """`<Vision><ModalityHere></Vision>` as segments."""
    open_, close = MARKUP[modality]
    return [open_, ModalitySlot(modality), close]


def parse_template(template: str) -> list[Segment]:
    """Turn a trusted template with `<Vision><ModalityHere></Vision>`-style markers into segments."""
    segments: list[Segment] = []
    position = 0
    for match in _TEMPLATE_SLOT.finditer(template):
        segments.append(template[position:match.start()])
        modality = next(m for m, (o, _) in MARKUP.items() if match.group().startswith(o))
        segments += markup(modality)
        position = match.end()
    segments.append(template[position:])
    return merge_text(segments)


def merge_text(segments: list[Segment]) -> list[Segment]:
    """Join adjacent text segments and drop empty ones."""
    merged: list[Segment] = []
    for segment in segments:
        if isinstance(segment, str):
            if not segment:
                continue
            if merged and isinstance(merged[-1], str):
                merged[-1] += segment
                continue
        merged.append(segment)
    return merged


def prompt_modalities(segments: list[Segment]) -> list[str]:
    return [s.modality for s in segments if isinstance(s, ModalitySlot)]


def _ordered(modalities: list[str] | tuple[str, ...], order: tuple[str, ...]) -> list[str]:
    unknown = set(modalities) - set(order)
    if unknown:
        raise ValueError(f"unknown modality {sorted(unknown)}; expected one of {list(order)}")
    return sorted(set(modalities), key=order.index)


def modality_prefix(modalities: list[str] | tuple[str, ...], order: tuple[str, ...] = MODALITY_ORDER) -> list[Segment]:
    """Markup for each given modality, in `order` (audio first by default), separated by spaces."""
    segments: list[Segment] = []
    for modality in _ordered(modalities, order):
        if segments:
            segments.append(" ")
        segments += markup(modality)
    return segments


def instruction_prompt(
    modalities: list[str] | tuple[str, ...], instruction: str, order: tuple[str, ...] = MODALITY_ORDER
) -> list[Segment]:
    """Stage-2 template: `###Human: {markup} {instruction} ###Assistant: `."""
    body = modality_prefix(modalities, order)
    if instruction:
        body += [" " if body else "", instruction]
    return merge_text(["###Human: ", *body, " ###Assistant: "])


def caption_prompt(modalities: list[str] | tuple[str, ...], order: tuple[str, ...] = MODALITY_ORDER) -> list[Segment]:
    """Stage 1 uses no instruction: BOS + the modality tokens, then the caption."""
    return [ModalitySlot(m) for m in _ordered(modalities, order)]


# The released demo's system sentence, word for word (eval_scripts/conversation.py:77-78).
SYSTEM = (
    "Give the following image: <Vision>ImageContent</Vision> or audio: <Audio>AudioContent</Audio>. "
    "You will be able to see the image/audio once I provide it to you. Please answer my questions."
)


@dataclass
class Conversation:
    """The reference chat template: `{system}###Human: ...###Assistant: ...###...Assistant:`."""

    system: str = SYSTEM
    roles: tuple[str, str] = ("Human", "Assistant")
    sep: str = "###"
    messages: list[tuple[str, list[Segment]]] = field(default_factory=list)
    modality_order: tuple[str, ...] = MODALITY_ORDER  # of the markup opening a turn with several media

    def add_user(self, text: str, modalities: list[str] | tuple[str, ...] = ()) -> None:
        """The user's text is stored as text: it never creates a modality slot."""
        body = modality_prefix(modalities, self.modality_order)
        if text:
            body += [" " if body else "", text]
        self.messages.append((self.roles[0], merge_text(body)))

    def add_assistant(self, text: str) -> None:
        self.messages.append((self.roles[1], [text]))

    def render(self) -> list[Segment]:
        """Segments ready for the model, ending with `Assistant:` for the model to continue."""
        segments: list[Segment] = [self.system + self.sep]
        for role, body in self.messages:
            segments += [f"{role}: ", *body, self.sep]
        segments.append(f"{self.roles[1]}:")
        return merge_text(segments)

    def modalities(self) -> list[str]:
        return prompt_modalities(self.render())
