"""The synthetic corpus's world: object kinds, colours, sounds, positions, and sentences about them.

Everything the generator (`synth.py`), the tokenizer builder and the evaluation need to agree on
lives here as plain constants. Each object kind is the source of exactly one sound kind
(`SOURCE_SOUND`), which is what lets a sound be localised in a picture.

Text is rendered by small functions that take a `variant` index choosing one of several templates,
so the generator can vary phrasing with its own random generator and `sample_texts()` can enumerate
every template without randomness.
"""

from __future__ import annotations

import re

# ---------------------------------------------------------------------------------------------
# Objects, colours, backgrounds, positions
# ---------------------------------------------------------------------------------------------

OBJECT_KINDS = ("circle", "square", "triangle", "star", "hexagon", "cross")

# Saturated colours, at least 150 apart in RGB from each other and far from every background
# (backgrounds are low-saturation greys), so a mask's mean colour names its object unambiguously.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 40),
    "purple": (150, 50, 190),
}
COLOUR_NAMES = tuple(COLOURS)

BACKGROUND_STYLES = ("plain", "shaded", "speckled")  # flat, linear gradient, light noise
BACKGROUND_SHADES = ("light", "medium", "dark")

# Where an object is, from its box centre (see `synth.position_word` for the rule).
POSITIONS = ("left", "right", "top", "bottom", "center")
POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}

NUMBER_WORDS = (
    "zero", "one", "two", "three", "four", "five", "six",
    "seven", "eight", "nine", "ten", "eleven", "twelve",
)  # fmt: skip

# ---------------------------------------------------------------------------------------------
# Sounds
# ---------------------------------------------------------------------------------------------

SOUND_KINDS = ("tone", "buzz", "chirp", "pulses", "hiss", "siren")

# Each object kind makes exactly one sound kind, and each sound kind has exactly one source.
SOURCE_SOUND = {
    "circle": "tone",  # a steady sine
    "square": "buzz",  # a low square wave, rich in harmonics
    "triangle": "chirp",  # repeated upward pitch sweeps
    "star": "pulses",  # short high beeps a few times a second
    "hexagon": "hiss",  # broadband noise, no pitch
    "cross": "siren",  # two pitches taking turns
}
SOUND_SOURCE = {sound: kind for kind, sound in SOURCE_SOUND.items()}

SOUND_PHRASES = {
    "tone": "a steady tone",
    "buzz": "a low buzz",
    "chirp": "a rising chirp",
    "pulses": "a rapid beeping",
    "hiss": "a hissing noise",
    "siren": "a two-tone siren",
}

# ---------------------------------------------------------------------------------------------
# Templates
# ---------------------------------------------------------------------------------------------

# Image captions (cc_sbu_align). {objects}: "a red circle on the left and a blue star at the top".
SCENE_CAPTIONS = (
    "The image shows {objects} on a {background} background.",
    "A picture of {objects}.",
    "There {be} {count} in this image: {objects}.",
    "This simple drawing contains {objects}.",
    "{Objects}, drawn on a {background} background.",
)

# Visual questions and answers (LLaVA-Instruct), one tuple per question type.
QUESTION_TYPES = ("colour", "kind", "position", "count")
QUESTIONS = {
    "colour": (
        "What colour is the {kind}?",
        "Which colour does the {kind} have?",
        "Tell me the colour of the {kind}.",
    ),
    "kind": (
        "What shape is the {colour} object?",
        "Which shape is drawn in {colour}?",
        "What kind of shape is the {colour} one?",
    ),
    "position": (
        "Where is the {colour} {kind}?",
        "In which part of the image is the {colour} {kind}?",
        "Where can I find the {colour} {kind}?",
    ),
    "count": (
        "How many shapes are in the image?",
        "How many objects can you see?",
        "Count the shapes in this picture.",
    ),
}
ANSWERS = {
    "colour": (
        "The {kind} is {colour}.",
        "It is {colour}.",
        "The {kind} in the image is {colour}.",
    ),
    "kind": (
        "The {colour} object is a {kind}.",
        "It is a {kind}.",
        "The {colour} shape is a {kind}.",
    ),
    "position": (
        "The {colour} {kind} is {position}.",
        "It is {position} of the image.",
        "You can find the {colour} {kind} {position}.",
    ),
    "count": (
        "There {be} {count} in the image.",
        "I can see {count}.",
        "The image contains {count}.",
    ),
}

# Short audio captions (WavCaps).
AUDIO_CAPTIONS = (
    "{Sound}.",
    "A recording of {sound}.",
    "{Sound} lasting about {seconds}.",
    "A {length} clip of {sound}, {loudness}.",
    "{Sound} can be heard.",
)

# Detailed audio descriptions (Clotho-Detail): intro + one detail sentence + ending.
AUDIO_INTROS = (
    "This clip contains {sound}.",
    "The audio is {sound}.",
    "What you hear is {sound}.",
)
SOUND_DETAILS = {
    "tone": (
        "It holds one clear pitch that never changes.",
        "The pitch stays the same from start to end.",
    ),
    "buzz": (
        "It is a harsh, low-pitched sound with many overtones.",
        "The buzz is rough and deep, like an electric hum.",
    ),
    "chirp": (
        "The pitch sweeps upward about once a second, again and again.",
        "It slides from low to high, then starts over.",
    ),
    "pulses": (
        "Short high beeps repeat about {rate} times per second.",
        "It is a quick series of short beeps, about {rate} each second.",
    ),
    "hiss": (
        "It is a broad, rushing noise with no clear pitch.",
        "It sounds like static or escaping air.",
    ),
    "siren": (
        "It alternates between a lower and a higher pitch, like an alarm.",
        "Two pitches take turns, switching several times a second.",
    ),
}
AUDIO_ENDINGS = (
    "It is {loudness} and lasts about {seconds}.",
    "The clip is about {seconds} long and {loudness}.",
)

# Sound localisation (VGGSS): which object in the picture makes the sound.
LOCALISATION_CAPTIONS = (
    "The sound is {sound}, coming from the {colour} {kind} {position}.",
    "{Sound} is heard, and its source is the {colour} {kind} {position}.",
    "The {colour} {kind} {position} is making {sound}.",
    "This is {sound}; it comes from the {colour} {kind} {position}.",
)
# The original's prompts (prompts/alignment_audio_image_region.txt) without the modality markers.
LOCALISATION_INSTRUCTIONS = (
    "Please find the source that emits the given sound in this image.",
    "Pay attention to the given audio and image, "
    "and tell me where is the sound coming from in this picture.",
    "Which part of this scene is the source of the given sound?",
)

# Negative pairs: the sound comes from nothing in the picture.
NEGATIVE_PREFIXES = (
    "They seem unrelated.",
    "The sound and the image seem unrelated.",
    "The audio does not seem to match the picture.",
)
# The original's prompts (prompts/alignment_audio_image_neg.txt) without the modality markers.
NEGATIVE_INSTRUCTIONS = (
    "Please describe the image and audio respectively.",
    "What is the audio and the image?",
    "Please provide a detailed description of the sound and the image.",
    "Could you tell the contents of this audio and photo for me?",
    "Are the audio and image related to each other? What are they?",
)

LOUDNESS_WORDS = ("quite soft", "fairly loud")
LENGTH_WORDS = ("short", "long")

# ---------------------------------------------------------------------------------------------
# Rendering: `variant` picks a template (taken modulo the number of templates)
# ---------------------------------------------------------------------------------------------


def capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def object_phrase(colour: str, kind: str, position: str) -> str:
    """'a red circle on the left'."""
    return f"a {colour} {kind} {POSITION_PHRASES[position]}"


def join_phrases(phrases: list[str]) -> str:
    """['a', 'b', 'c'] -> 'a, b and c'."""
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def count_phrase(n: int, noun: str = "shape") -> str:
    """'one shape', 'three shapes'."""
    return f"{NUMBER_WORDS[n]} {noun}" + ("s" if n != 1 else "")


def seconds_phrase(seconds: float) -> str:
    """Duration rounded to whole seconds (at least one): 'one second', 'seven seconds'."""
    n = min(max(int(round(seconds)), 1), len(NUMBER_WORDS) - 1)
    return count_phrase(n, "second")


def background_phrase(style: str, shade: str) -> str:
    """'plain light grey'."""
    return f"{style} {shade} grey"


def scene_caption(objects: list[tuple[str, str, str]], background: str, variant: int) -> str:
    """Caption of a scene. objects: (colour, kind, position) per object; background: its phrase."""
    listed = join_phrases([object_phrase(*obj) for obj in objects])
    template = SCENE_CAPTIONS[variant % len(SCENE_CAPTIONS)]
    return template.format(
        objects=listed,
        Objects=capitalise(listed),
        background=background,
        be="is" if len(objects) == 1 else "are",
        count=count_phrase(len(objects)),
    )


def question_answer(
    qtype: str, colour: str, kind: str, position: str, n_objects: int, variant: int
) -> tuple[str, str]:
    """(question, answer) of one type about one object of a scene (count: about the whole scene)."""
    fields = {
        "colour": colour,
        "kind": kind,
        "position": POSITION_PHRASES[position],
        "be": "is" if n_objects == 1 else "are",
        "count": count_phrase(n_objects),
    }
    questions, answers = QUESTIONS[qtype], ANSWERS[qtype]
    question = questions[variant % len(questions)].format(**fields)
    answer = answers[(variant // len(questions)) % len(answers)].format(**fields)
    return question, answer


def _sound_fields(sound_kind: str, seconds: float, loud: bool) -> dict[str, str]:
    phrase = SOUND_PHRASES[sound_kind]
    return {
        "sound": phrase,
        "Sound": capitalise(phrase),
        "seconds": seconds_phrase(seconds),
        "loudness": LOUDNESS_WORDS[int(loud)],
        "length": LENGTH_WORDS[int(seconds >= 6.0)],
    }


def audio_caption(sound_kind: str, seconds: float, loud: bool, variant: int) -> str:
    """Short caption of a sound, WavCaps style."""
    template = AUDIO_CAPTIONS[variant % len(AUDIO_CAPTIONS)]
    return template.format(**_sound_fields(sound_kind, seconds, loud))


def detailed_audio_caption(
    sound_kind: str, seconds: float, loud: bool, pulse_rate: int, variant: int
) -> str:
    """Three-sentence description of a sound, Clotho-Detail style. pulse_rate: beeps per second."""
    fields = _sound_fields(sound_kind, seconds, loud) | {"rate": NUMBER_WORDS[pulse_rate]}
    details = SOUND_DETAILS[sound_kind]
    intro = AUDIO_INTROS[variant % len(AUDIO_INTROS)]
    detail = details[(variant // len(AUDIO_INTROS)) % len(details)]
    ending = AUDIO_ENDINGS[(variant // (len(AUDIO_INTROS) * len(details))) % len(AUDIO_ENDINGS)]
    return " ".join(t.format(**fields) for t in (intro, detail, ending))


def localisation_caption(
    sound_kind: str, colour: str, kind: str, position: str, variant: int
) -> str:
    """Names the sound and locates its source object, VGGSS-instruction style."""
    phrase = SOUND_PHRASES[sound_kind]
    template = LOCALISATION_CAPTIONS[variant % len(LOCALISATION_CAPTIONS)]
    return template.format(
        sound=phrase,
        Sound=capitalise(phrase),
        colour=colour,
        kind=kind,
        position=POSITION_PHRASES[position],
    )


def scene_description(objects: list[tuple[str, str, str]], background: str) -> str:
    """Everything a picture shows, in one fixed form: 'A red circle on the left and a blue star at
    the top on a plain light grey background.' The tiny LLM's pretraining reads it where a picture's
    tokens go (bubogpt/pretraining), as a real LLM has read descriptions of pictures."""
    listed = join_phrases([object_phrase(*obj) for obj in objects])
    return f"{capitalise(listed)} on a {background} background."


def sound_description(sound_kind: str, seconds: float, loud: bool, pulse_rate: int) -> str:
    """Everything a sound's captions can say, in one fixed form: 'A rapid beeping, four beeps per
    second, quite soft, about two seconds long.' (the sound's counterpart of `scene_description`)."""
    fields = _sound_fields(sound_kind, seconds, loud)
    parts = [fields["sound"]]
    if sound_kind == "pulses":
        parts.append(f"{NUMBER_WORDS[pulse_rate]} beeps per second")
    parts += [fields["loudness"], f"about {fields['seconds']} long"]
    return capitalise(", ".join(parts)) + "."


def negative_caption(image_caption: str, sound_caption: str, variant: int) -> str:
    """'They seem unrelated.' + the image's caption + the sound's caption."""
    prefix = NEGATIVE_PREFIXES[variant % len(NEGATIVE_PREFIXES)]
    return f"{prefix} {image_caption} {sound_caption}"


# ---------------------------------------------------------------------------------------------
# Texts covering the vocabulary (for building the tiny LLM's tokenizer)
# ---------------------------------------------------------------------------------------------


def scene_caption_texts() -> list[str]:
    """Every picture caption template with every kind, colour, position and background word."""
    texts: list[str] = []
    n_kinds, n_colours = len(OBJECT_KINDS), len(COLOUR_NAMES)
    backgrounds = [background_phrase(s, t) for s in BACKGROUND_STYLES for t in BACKGROUND_SHADES]

    for i in range(len(SCENE_CAPTIONS) * len(backgrounds)):  # 5 x 9 coprime: every pairing
        n = 1 + i % 3
        objects = [
            (COLOUR_NAMES[(i + j) % n_colours], OBJECT_KINDS[(i + 2 * j) % n_kinds],
             POSITIONS[(i + j) % len(POSITIONS)])
            for j in range(n)
        ]  # fmt: skip
        texts.append(scene_caption(objects, backgrounds[i % len(backgrounds)], variant=i))
    return texts


def image_qa_texts() -> list[str]:
    """Every image question and answer template (question, answer, question, ...), every value."""
    texts: list[str] = []
    n_kinds, n_colours = len(OBJECT_KINDS), len(COLOUR_NAMES)
    for qtype in QUESTION_TYPES:
        n_variants = len(QUESTIONS[qtype]) * len(ANSWERS[qtype])
        for i in range(max(n_variants, n_kinds * len(POSITIONS))):
            texts.extend(
                question_answer(
                    qtype,
                    COLOUR_NAMES[i % n_colours],
                    OBJECT_KINDS[i % n_kinds],
                    POSITIONS[i % len(POSITIONS)],
                    1 + i % 3,
                    i,
                )
            )
    return texts


def audio_texts() -> list[str]:
    """Every short and detailed sound caption template, with every sound, loudness, length,
    duration and beep-rate word (deterministic)."""
    texts: list[str] = []
    for i, sound in enumerate(SOUND_KINDS * 2 * len(AUDIO_CAPTIONS)):
        seconds = 1 + i % 12
        texts.append(audio_caption(sound, seconds, loud=bool(i % 2), variant=i // len(SOUND_KINDS)))
    n_detail_variants = len(AUDIO_INTROS) * 2 * len(AUDIO_ENDINGS)
    for i in range(len(SOUND_KINDS) * n_detail_variants):
        sound = SOUND_KINDS[i % len(SOUND_KINDS)]
        texts.append(
            detailed_audio_caption(
                sound, 1 + i % 12, bool(i % 2), pulse_rate=3 + i % 4, variant=i // len(SOUND_KINDS)
            )
        )
    return texts


def sample_texts() -> list[str]:
    """Every template rendered at least once, and every kind, colour, position, sound, number and
    background word used at least once. Deterministic, a few hundred short texts."""
    texts = scene_caption_texts() + image_qa_texts() + audio_texts()
    n_kinds, n_colours = len(OBJECT_KINDS), len(COLOUR_NAMES)
    for i in range(len(OBJECT_KINDS) * len(LOCALISATION_CAPTIONS)):
        kind = OBJECT_KINDS[i % n_kinds]
        texts.append(
            localisation_caption(
                SOURCE_SOUND[kind],
                COLOUR_NAMES[i % n_colours],
                kind,
                POSITIONS[i % 5],
                i // n_kinds,
            )
        )
    for i in range(len(NEGATIVE_PREFIXES)):
        texts.append(negative_caption(texts[i], texts[-1 - i], i))
    texts.extend(LOCALISATION_INSTRUCTIONS)
    texts.extend(NEGATIVE_INSTRUCTIONS)
    return texts


def _words(texts: list[str]) -> set[str]:
    return {w.lower() for text in texts for w in re.findall(r"[A-Za-z]+", text)}


# Words that say nothing about a modality, whichever texts they occur in (numbers: counts of shapes
# as well as seconds and beeps).
FUNCTION_WORDS = frozenset(
    "a about again an and are as at be between can does each end from have how i in is it its like "
    "many me never no not of on once or over per quite same several start starts take than that the then "
    "there this times to turns what where which with you".split()
) | frozenset(NUMBER_WORDS)


def modality_words() -> tuple[frozenset[str], frozenset[str]]:
    """(image words, sound words): the words that the corpus's answers about pictures (captions,
    image answers) use and its answers about sounds (captions, descriptions) never use, and the
    reverse, less `FUNCTION_WORDS`. An answer about only a picture that uses a sound word talks
    about a sound, and the reverse."""
    image = _words(scene_caption_texts() + image_qa_texts()[1::2])
    sound = _words(audio_texts() + list(SOUND_PHRASES.values()))
    return frozenset(image - sound - FUNCTION_WORDS), frozenset(sound - image - FUNCTION_WORDS)


def all_corpus_words() -> list[str]:
    """Sorted, lower-cased words (letters only) that occur in the corpus's texts."""
    words = set()
    for text in sample_texts():
        words.update(w.lower() for w in re.findall(r"[A-Za-z]+", text))
    return sorted(words)
