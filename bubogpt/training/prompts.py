"""How a data row becomes a prompt -- the one place, used by training (`collate`), evaluation and
sample generations -- and the instructions it is asked with (our own phrasings; the reference's
prompt files are not copied).

    row_prompt(row, "caption", instruction)      the row's modality slots only (stage 1)
    row_prompt(row, "instruction", instruction)  `###Human: {markup} {instruction} ###Assistant: `
                                                 (the reference's stage-2 training template)
    row_prompt(row, "chat", instruction)         the same turn in the served chat template (Serve's
                                                 `Conversation`: the system sentence, then
                                                 `###Human: {markup} {instruction}###Assistant:`);
                                                 stage 2 trains in it, evaluation asks in it

Training picks the instruction per row at random (`pick_instruction`); evaluation and sample
generations ask every row of a dataset the same way (`fixed_instruction`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from bubogpt.conversation import Conversation, Segment, caption_prompt, instruction_prompt
from bubogpt.training.config import PROMPT_STYLES, TrainConfigError

IMAGE_CAPTION_INSTRUCTIONS = (
    "Describe this picture.",
    "What does the image show?",
    "Give a short description of the image.",
    "Tell me what is drawn here.",
    "What can you see in this picture?",
)
AUDIO_DESCRIPTION_INSTRUCTIONS = (
    "Describe the sound you hear.",
    "What can be heard in this recording?",
    "Give a detailed description of this audio clip.",
    "What kind of sound is this?",
    "Listen and tell me about this sound.",
)
# Shared by sound localisation and negative pairs: the instruction does not say whether the pair
# matches, so only the image and the sound can decide between locating and "unrelated".
SOUND_SOURCE_INSTRUCTIONS = (
    "What in this picture makes the sound?",
    "Where does the sound come from in this image?",
    "Find the object that makes this sound.",
    "Which part of the picture is the sound coming from?",
    "Look and listen: what is making this noise?",
)
IMAGE_QA_FALLBACK = IMAGE_CAPTION_INSTRUCTIONS  # a QA record always carries its question

INSTRUCTIONS: dict[str, tuple[str, ...]] = {
    "wavcaps": AUDIO_DESCRIPTION_INSTRUCTIONS,
    "cc_sbu_align": IMAGE_CAPTION_INSTRUCTIONS,
    "llava_instruct": IMAGE_QA_FALLBACK,
    "clotho": AUDIO_DESCRIPTION_INSTRUCTIONS,
    "vggss": SOUND_SOURCE_INSTRUCTIONS,
    "negative_pairs": SOUND_SOURCE_INSTRUCTIONS,
}
# Sets whose own instruction (from the corpus) is used only half of the time: it differs between
# matching and non-matching pairs and would let the model answer from the instruction alone.
SHARED_INSTRUCTION_SETS = ("vggss", "negative_pairs")

# The fixed instruction per evaluated task (evaluation always asks the same way).
EVAL_INSTRUCTIONS = {
    "sound": AUDIO_DESCRIPTION_INSTRUCTIONS[0],
    "source": SOUND_SOURCE_INSTRUCTIONS[0],
}



def pick_instruction(dataset: str, own: str, rng: np.random.Generator) -> str:
    """Training: the record's own instruction, or one of our phrasings for its dataset."""
    if dataset not in INSTRUCTIONS:
        raise TrainConfigError(f"no instruction phrasings for dataset {dataset!r}; expected one of {sorted(INSTRUCTIONS)}")
    pool = INSTRUCTIONS[dataset]
    if own and (dataset not in SHARED_INSTRUCTION_SETS or rng.random() < 0.5):
        return own
    return pool[int(rng.integers(len(pool)))]


def fixed_instruction(row: Mapping[str, Any]) -> str:
    """Evaluation and samples: image QA rows their own question; audio-only rows
    `EVAL_INSTRUCTIONS["sound"]`; image + audio rows one shared question, `EVAL_INSTRUCTIONS["source"]`,
    so only the image and the sound can tell a matched pair from a mismatched one; captioned images
    the first caption phrasing."""
    dataset, own = row["dataset"], row.get("instruction") or ""
    if dataset not in INSTRUCTIONS:
        raise TrainConfigError(f"no instruction phrasings for dataset {dataset!r}; expected one of {sorted(INSTRUCTIONS)}")
    if dataset == "llava_instruct" and own:
        return own
    if INSTRUCTIONS[dataset] is AUDIO_DESCRIPTION_INSTRUCTIONS:
        return EVAL_INSTRUCTIONS["sound"]
    if INSTRUCTIONS[dataset] is SOUND_SOURCE_INSTRUCTIONS:
        return EVAL_INSTRUCTIONS["source"]
    return INSTRUCTIONS[dataset][0]


def row_modalities(row: Mapping[str, Any]) -> list[str]:
    """The modalities a decoded row carries: raw media or precomputed encoder tokens."""
    modalities = []
    if row.get("pixel_values") is not None or row.get("vision_tokens") is not None:
        modalities.append("vision")
    if row.get("fbank") is not None or row.get("audio_tokens") is not None:
        modalities.append("audio")
    return modalities


class CollateError(ValueError):
    """Rows that cannot form prompts or a batch (no media for a media prompt, mixed shapes)."""


def row_prompt(row: Mapping[str, Any], prompt_style: str, instruction: str = "") -> list[Segment]:
    """The prompt of a decoded row in a stage's prompt style (see the module docstring)."""
    if prompt_style not in PROMPT_STYLES:
        raise CollateError(f"prompt_style must be one of {PROMPT_STYLES}, got {prompt_style!r}")
    modalities = row_modalities(row)
    if not modalities:
        raise CollateError(f"row {row.get('id')!r} of {row['dataset']} has neither image nor audio")
    if prompt_style == "caption":
        return caption_prompt(modalities)
    if prompt_style == "chat":
        return chat_prompt(modalities, instruction)
    return instruction_prompt(modalities, instruction)


def chat_prompt(modalities: list[str], instruction: str) -> list[Segment]:
    """One user turn as Serve renders it (`serve.protocol.ChatRequest.conversation`: the default
    `Conversation`), ending with `Assistant:` for the answer to follow."""
    conversation = Conversation()
    conversation.add_user(instruction, modalities)
    return conversation.render()
