"""Readers of the original on-disk corpus formats, all yielding one record schema.

Every reader is a plain generator (no Ray needed) that yields records:

    {"dataset": str, "split": str, "id": str,
     "image": bytes | None,       # the raw encoded file, as stored
     "image_path": str | None,
     "audio": bytes | None,       # the raw encoded file, as stored
     "audio_path": str | None,    # for audio inside a WavCaps tar: "<tar path>:<member name>"
     "instruction": str,          # "" when the set has none: the trainer then picks a phrasing
     "answer": str,
     "meta": str}                 # JSON object: any ground truth the source carries; "{}" if none

`RECORD_SCHEMA` is the matching `pyarrow.Schema`; `records_to_table(records)` builds a table.

Readers, one per original format (see BUBOGPT_REFERENCE.md, "Data formats of the original corpora"):

    read_wavcaps(path, split="train", dataset="wavcaps", skips=None)
        WavCaps webdataset shards: `path` is one .tar or a folder of .tar files (name order).
        A sample is the consecutive members sharing a key (the base name up to its first "."):
        `<id>.flac` (or .wav/.mp3/.ogg) + `<id>.json` holding {"caption": ...}; the other JSON
        fields go to meta.
    read_cc_sbu_align(root, split="train", dataset="cc_sbu_align", skips=None)
        `root/filter_cap.json` = {"annotations": [{"image_id", "caption"}]}, images
        `root/image/<image_id>.jpg`.
    read_llava_instruct(annotation_path, image_dir, split="train", dataset="llava_instruct",
                        skips=None)
        JSON list of {"id", "image", "conversations": [{"from": "human" | "gpt", "value"}, ...]};
        one record per human -> gpt turn pair. The `<image>` marker (and the newlines around it) is
        removed from questions; earlier turns go to meta["history"] as [{"from", "value"}, ...],
        with meta["turn"] (0-based) and meta["source_id"]. Record id: "<id>_<turn>".
    read_clotho(annotation_path, audio_dir=None, split="train", dataset="clotho", skips=None)
        `audio_cap.json` = {"annotations": [{"audio_id", "caption"}]}, audio `<audio_id>.wav` in
        `audio_dir` (default: the annotation file's folder).
    read_vggss(annotation_path, audio_dir, image_dir, split="train", dataset="vggss", skips=None)
        {"annotations": [{"audio_id", "image_id", "caption", ...}]}, audio `<audio_id>.wav` and
        images `<image_id>.jpg` in separate folders.
    read_negative_pairs(annotation_path, image_dir, audio_dir, split="train",
                        dataset="negative_pairs", skips=None)
        Unrelated image-audio pairs. The original builds them on the fly (each cc_sbu_align image
        with a random Clotho clip); we store them in the VGGSS spirit:
        {"annotations": [{"image_id", "audio_id", "caption", "instruction" (optional), ...}]}
        over an image folder (`<image_id>.jpg`) and an audio folder (`<audio_id>.wav`). `caption` is
        the whole target answer (e.g. "The image and the audio seem unrelated. The image shows ...
        The audio is ..."); `instruction` the question asked, or absent/"" to let the trainer pick.

Common rules:
    - Media file names: `<folder>/<name>` when that file exists or the name already ends in the
      default extension (LLaVA's "image" carries its own), else `<folder>/<name><default ext>`;
      a name that resolves outside its folder is refused.
    - In annotation entries, "instruction" (a string) becomes the record's instruction; every other
      extra field is ground truth and goes to meta (a "meta" object is merged into it).
    - Media are validated by decoding them (bubogpt.preprocess.decode_image / decode_audio), so a
      corrupt file is caught here, not in training. `validate=False` leaves that to the caller: the
      preparation pipeline decodes every file anyway to preprocess it, and a second decode here
      would cost about a sixth of its time (a file missing or unreadable is still skipped here).
    - Readers of an index file (all but WavCaps) take `entries=` and `first=`: a slice of the index
      loaded beforehand (`load_annotations` / `load_entry_list`), whose first entry is number
      `first` of the file. The pipeline loads a big index once and hands slices to its workers.
    - A reader never dies on bad data: a missing or corrupt media file, a malformed entry or a
      missing caption skips that record; an unreadable index file or a truncated tar skips the
      rest of that file. Each skip is logged and added to `skips` (a `SkipLog`: entries
      {"path", "reason"}). Pass your own SkipLog to inspect or count them afterwards.
"""

from __future__ import annotations

import json
import logging
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from bubogpt.preprocess import MediaError, decode_audio, decode_image

logger = logging.getLogger(__name__)

RECORD_SCHEMA = pa.schema(
    [
        ("dataset", pa.string()),
        ("split", pa.string()),
        ("id", pa.string()),
        ("image", pa.large_binary()),  # large: a block of many images may pass 2 GiB
        ("image_path", pa.string()),
        ("audio", pa.large_binary()),
        ("audio_path", pa.string()),
        ("instruction", pa.string()),
        ("answer", pa.string()),
        ("meta", pa.string()),
    ]
)

CC_SBU_ALIGN_INDEX = "filter_cap.json"
IMAGE_EXT = ".jpg"
AUDIO_EXT = ".wav"
TAR_AUDIO_EXTS = ("flac", "wav", "mp3", "ogg")  # webdataset field names holding the audio
IMAGE_MARKER = "<image>"


@dataclass
class SkipLog:
    """What a reader left out and why: entries of {"path": str, "reason": str}."""

    entries: list[dict[str, str]] = field(default_factory=list)

    def add(self, path: str | Path, reason: str) -> None:
        logger.warning("skipped %s: %s", path, reason)
        self.entries.append({"path": str(path), "reason": reason})

    def __len__(self) -> int:
        return len(self.entries)

    def paths(self) -> list[str]:
        return [entry["path"] for entry in self.entries]


class _Skip(Exception):
    """Raised inside a reader to skip one record: (path, reason)."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(reason)
        self.path, self.reason = str(path), reason


def records_to_table(records: Iterable[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(list(records), schema=RECORD_SCHEMA)


# --------------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------------


def _record(
    dataset: str,
    split: str,
    record_id: str,
    answer: str,
    *,
    image: bytes | None = None,
    image_path: Path | None = None,
    audio: bytes | None = None,
    audio_path: Path | None = None,
    instruction: str = "",
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "dataset": dataset,
        "split": split,
        "id": record_id,
        "image": image,
        "image_path": None if image_path is None else str(image_path),
        "audio": audio,
        "audio_path": None if audio_path is None else str(audio_path),
        "instruction": instruction,
        "answer": answer,
        "meta": json.dumps(meta or {}, sort_keys=True, ensure_ascii=False),
    }


def _load_json(path: Path, skips: SkipLog) -> Any | None:
    """The parsed file, or None (skip logged) when it is missing or not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        skips.add(path, "index file not found")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        skips.add(path, f"index file unreadable or not JSON: {err}")
    return None


def load_annotations(path: str | Path, skips: SkipLog) -> list[Any]:
    """The "annotations" list of a {"annotations": [...]} index ([] with a skip when unusable)."""
    path = Path(path)
    index = _load_json(path, skips)
    if index is None:
        return []
    if not isinstance(index, dict) or not isinstance(index.get("annotations"), list):
        skips.add(path, 'index file has no "annotations" list')
        return []
    return index["annotations"]


def _text_field(entry: dict[str, Any], key: str, where: str) -> str:
    value = entry.get(key)
    if not isinstance(value, str) or not value.strip():
        raise _Skip(where, f'missing or empty "{key}"')
    return value.strip()


def _name_field(entry: dict[str, Any], key: str, where: str) -> str:
    """A file id: a non-empty string or an integer (cc_sbu_align ids are sometimes numbers)."""
    value = entry.get(key)
    if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value).strip() == "":
        raise _Skip(where, f'missing or invalid "{key}"')
    return str(value).strip()


def _instruction_field(entry: dict[str, Any], where: str) -> str:
    value = entry.get("instruction", "")
    if not isinstance(value, str):
        raise _Skip(where, '"instruction" is not a string')
    return value.strip()


def _extra_meta(entry: dict[str, Any], known: set[str]) -> dict[str, Any]:
    """Fields a reader does not map itself are ground truth: kept, a "meta" object flattened."""
    meta: dict[str, Any] = {}
    for key, value in entry.items():
        if key in known:
            continue
        if key == "meta" and isinstance(value, dict):
            meta.update(value)
        else:
            meta[key] = value
    return meta


def _media_path(folder: Path, name: str, default_ext: str) -> Path:
    """folder/name if it exists or already ends in default_ext, else folder/name + default_ext.

    Refuses names that resolve outside `folder`.
    """
    path = folder / name
    if not path.is_file() and not name.lower().endswith(default_ext):
        path = folder / f"{name}{default_ext}"
    if not path.resolve().is_relative_to(folder.resolve()):
        raise _Skip(path, "file name points outside its folder")
    return path


def _read_image(path: Path, validate: bool) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise _Skip(path, "image file not found") from None
    except OSError as err:
        raise _Skip(path, f"image file unreadable: {err}") from err
    if validate:
        try:
            decode_image(data)
        except MediaError as err:
            raise _Skip(path, f"bad image: {err}") from err
    return data


def _read_audio(path: Path, validate: bool) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise _Skip(path, "audio file not found") from None
    except OSError as err:
        raise _Skip(path, f"audio file unreadable: {err}") from err
    if validate:
        _check_audio(data, path)
    return data


def _check_audio(data: bytes, where: str | Path) -> None:
    try:
        decode_audio(data)
    except MediaError as err:
        raise _Skip(where, f"bad audio: {err}") from err


# --------------------------------------------------------------------------------------------------
# WavCaps (webdataset tars)
# --------------------------------------------------------------------------------------------------


def _wds_key(member_name: str) -> tuple[str, str]:
    """webdataset naming: "dir/abc.x.json" -> key "dir/abc", field "x.json"."""
    folder, _, base = member_name.rpartition("/")
    stem, _, field_name = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), field_name.lower()


def _wavcaps_record(
    key: str, fields: dict[str, bytes], tar_path: Path, dataset: str, split: str, validate: bool
) -> dict[str, Any]:
    where = f"{tar_path}:{key}"
    if "json" not in fields:
        raise _Skip(where, "sample has no .json")
    audio_field = next((ext for ext in TAR_AUDIO_EXTS if ext in fields), None)
    if audio_field is None:
        raise _Skip(where, f"sample has no audio ({', '.join(TAR_AUDIO_EXTS)})")
    try:
        info = json.loads(fields["json"].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _Skip(f"{where}.json", f"malformed JSON: {err}") from err
    if not isinstance(info, dict):
        raise _Skip(f"{where}.json", "JSON is not an object")
    caption = _text_field(info, "caption", f"{where}.json")
    if validate:
        _check_audio(fields[audio_field], f"{where}.{audio_field}")
    return _record(
        dataset,
        split,
        key,
        caption,
        audio=fields[audio_field],
        audio_path=f"{where}.{audio_field}",  # not a file of its own: the tar and the member
        meta=_extra_meta(info, {"caption"}),
    )


def _read_wavcaps_tar(
    tar_path: Path, dataset: str, split: str, skips: SkipLog, validate: bool
) -> Iterator[dict]:
    def emit(key: str, fields: dict[str, bytes]) -> Iterator[dict]:
        try:
            yield _wavcaps_record(key, fields, tar_path, dataset, split, validate)
        except _Skip as skip:
            skips.add(skip.path, skip.reason)

    samples = 0
    try:
        # Streaming mode ("r|"): reads members in order, so a truncated tar yields what precedes
        # the damage before failing.
        with tarfile.open(tar_path, mode="r|*") as tar:
            key, fields = None, {}
            for member in tar:
                if not member.isfile():
                    continue
                member_key, field_name = _wds_key(member.name)
                if member_key != key:
                    if key is not None:
                        samples += 1
                        yield from emit(key, fields)
                    key, fields = member_key, {}
                fields[field_name] = tar.extractfile(member).read()
            if key is not None:
                samples += 1
                yield from emit(key, fields)
    except (tarfile.TarError, OSError, EOFError) as err:
        skips.add(tar_path, f"unreadable or truncated tar after {samples} samples: {err}")


def read_wavcaps(
    path: str | Path,
    split: str = "train",
    dataset: str = "wavcaps",
    skips: SkipLog | None = None,
    *,
    validate: bool = True,
) -> Iterator[dict[str, Any]]:
    """Audio-caption records from one webdataset .tar or a folder of them (see module docstring)."""
    skips = SkipLog() if skips is None else skips
    path = Path(path)
    if path.is_dir():
        tars = sorted(path.glob("*.tar"))
        if not tars:
            skips.add(path, "no .tar files in folder")
    elif path.is_file():
        tars = [path]
    else:
        skips.add(path, "not found")
        tars = []
    for tar_path in tars:
        yield from _read_wavcaps_tar(tar_path, dataset, split, skips, validate)


# --------------------------------------------------------------------------------------------------
# cc_sbu_align (image-caption)
# --------------------------------------------------------------------------------------------------


def read_cc_sbu_align(
    root: str | Path,
    split: str = "train",
    dataset: str = "cc_sbu_align",
    skips: SkipLog | None = None,
    *,
    entries: list[Any] | None = None,
    first: int = 0,
    validate: bool = True,
) -> Iterator[dict[str, Any]]:
    """Image-caption records from `root/filter_cap.json` and `root/image/<image_id>.jpg`."""
    skips = SkipLog() if skips is None else skips
    root = Path(root)
    index = root / CC_SBU_ALIGN_INDEX
    entries = load_annotations(index, skips) if entries is None else entries
    for i, entry in enumerate(entries, start=first):
        where = f"{index}#annotations[{i}]"
        try:
            if not isinstance(entry, dict):
                raise _Skip(where, "entry is not an object")
            image_id = _name_field(entry, "image_id", where)
            caption = _text_field(entry, "caption", where)
            image_path = _media_path(root / "image", image_id, IMAGE_EXT)
            yield _record(
                dataset,
                split,
                image_id,
                caption,
                image=_read_image(image_path, validate),
                image_path=image_path,
                instruction=_instruction_field(entry, where),
                meta=_extra_meta(entry, {"image_id", "caption", "instruction"}),
            )
        except _Skip as skip:
            skips.add(skip.path, skip.reason)


# --------------------------------------------------------------------------------------------------
# LLaVA-Instruct (multi-turn image instructions)
# --------------------------------------------------------------------------------------------------


def _strip_image_marker(text: str) -> str:
    return text.replace(IMAGE_MARKER, "").strip()


def _turn_pairs(conversations: Any, where: str) -> list[tuple[str, str]]:
    """[{"from": "human", ...}, {"from": "gpt", ...}, ...] -> [(question, answer), ...]."""
    if not isinstance(conversations, list) or not conversations:
        raise _Skip(where, 'missing or empty "conversations"')
    if len(conversations) % 2:
        raise _Skip(where, "conversation has an unanswered turn (odd number of turns)")
    pairs = []
    for k in range(0, len(conversations), 2):
        human, gpt = conversations[k], conversations[k + 1]
        for turn, role in ((human, "human"), (gpt, "gpt")):
            if not isinstance(turn, dict) or turn.get("from") != role:
                raise _Skip(where, f'turn {k} is not a "human" then "gpt" pair')
            if not isinstance(turn.get("value"), str):
                raise _Skip(where, f'turn {k} has no text "value"')
        answer = gpt["value"].strip()
        if not answer:
            raise _Skip(where, f"turn {k + 1} has an empty answer")
        pairs.append((_strip_image_marker(human["value"]), answer))
    return pairs


def load_entry_list(path: str | Path, skips: SkipLog) -> list[Any]:
    """A JSON-list index such as LLaVA-Instruct's ([] with a skip when unusable)."""
    path = Path(path)
    entries = _load_json(path, skips)
    if entries is None:
        return []
    if not isinstance(entries, list):
        skips.add(path, "index file is not a JSON list")
        return []
    return entries


def read_llava_instruct(
    annotation_path: str | Path,
    image_dir: str | Path,
    split: str = "train",
    dataset: str = "llava_instruct",
    skips: SkipLog | None = None,
    *,
    entries: list[Any] | None = None,
    first: int = 0,
    validate: bool = True,
) -> Iterator[dict[str, Any]]:
    """One record per human -> gpt turn pair of a LLaVA-Instruct JSON list (see module doc)."""
    skips = SkipLog() if skips is None else skips
    annotation_path, image_dir = Path(annotation_path), Path(image_dir)
    entries = load_entry_list(annotation_path, skips) if entries is None else entries
    for i, entry in enumerate(entries, start=first):
        where = f"{annotation_path}[{i}]"
        try:
            if not isinstance(entry, dict):
                raise _Skip(where, "entry is not an object")
            source_id = _name_field(entry, "id", where)
            image_name = _name_field(entry, "image", where)
            pairs = _turn_pairs(entry.get("conversations"), where)
            image_path = _media_path(image_dir, image_name, IMAGE_EXT)
            image = _read_image(image_path, validate)  # read once, shared by all turns of the entry
        except _Skip as skip:
            skips.add(skip.path, skip.reason)
            continue
        extra = _extra_meta(entry, {"id", "image", "conversations"})
        history: list[dict[str, str]] = []
        for turn, (question, answer) in enumerate(pairs):
            meta = {**extra, "history": list(history), "turn": turn, "source_id": source_id}
            yield _record(
                dataset,
                split,
                f"{source_id}_{turn}",
                answer,
                image=image,
                image_path=image_path,
                instruction=question,
                meta=meta,
            )
            history += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


# --------------------------------------------------------------------------------------------------
# Clotho detailed captions (audio-caption)
# --------------------------------------------------------------------------------------------------


def read_clotho(
    annotation_path: str | Path,
    audio_dir: str | Path | None = None,
    split: str = "train",
    dataset: str = "clotho",
    skips: SkipLog | None = None,
    *,
    entries: list[Any] | None = None,
    first: int = 0,
    validate: bool = True,
) -> Iterator[dict[str, Any]]:
    """Audio-caption records from `audio_cap.json` and `<audio_dir>/<audio_id>.wav`."""
    skips = SkipLog() if skips is None else skips
    annotation_path = Path(annotation_path)
    audio_dir = annotation_path.parent if audio_dir is None else Path(audio_dir)
    entries = load_annotations(annotation_path, skips) if entries is None else entries
    for i, entry in enumerate(entries, start=first):
        where = f"{annotation_path}#annotations[{i}]"
        try:
            if not isinstance(entry, dict):
                raise _Skip(where, "entry is not an object")
            audio_id = _name_field(entry, "audio_id", where)
            caption = _text_field(entry, "caption", where)
            audio_path = _media_path(audio_dir, audio_id, AUDIO_EXT)
            yield _record(
                dataset,
                split,
                audio_id,
                caption,
                audio=_read_audio(audio_path, validate),
                audio_path=audio_path,
                instruction=_instruction_field(entry, where),
                meta=_extra_meta(entry, {"audio_id", "caption", "instruction"}),
            )
        except _Skip as skip:
            skips.add(skip.path, skip.reason)


# --------------------------------------------------------------------------------------------------
# Image + audio pairs: VGGSS sound localisation, negative pairs
# --------------------------------------------------------------------------------------------------


def _read_image_audio_pairs(
    annotation_path: Path,
    image_dir: Path,
    audio_dir: Path,
    split: str,
    dataset: str,
    skips: SkipLog,
    entries: list[Any] | None,
    first: int,
    validate: bool,
) -> Iterator[dict[str, Any]]:
    known = {"audio_id", "image_id", "caption", "instruction"}
    entries = load_annotations(annotation_path, skips) if entries is None else entries
    for i, entry in enumerate(entries, start=first):
        where = f"{annotation_path}#annotations[{i}]"
        try:
            if not isinstance(entry, dict):
                raise _Skip(where, "entry is not an object")
            audio_id = _name_field(entry, "audio_id", where)
            image_id = _name_field(entry, "image_id", where)
            caption = _text_field(entry, "caption", where)
            instruction = _instruction_field(entry, where)
            image_path = _media_path(image_dir, image_id, IMAGE_EXT)
            audio_path = _media_path(audio_dir, audio_id, AUDIO_EXT)
            yield _record(
                dataset,
                split,
                f"{image_id}+{audio_id}",
                caption,
                image=_read_image(image_path, validate),
                image_path=image_path,
                audio=_read_audio(audio_path, validate),
                audio_path=audio_path,
                instruction=instruction,
                meta=_extra_meta(entry, known),
            )
        except _Skip as skip:
            skips.add(skip.path, skip.reason)


def read_vggss(
    annotation_path: str | Path,
    audio_dir: str | Path,
    image_dir: str | Path,
    split: str = "train",
    dataset: str = "vggss",
    skips: SkipLog | None = None,
    *,
    entries: list[Any] | None = None,
    first: int = 0,
    validate: bool = True,
) -> Iterator[dict[str, Any]]:
    """Sound-localisation records (image + audio + caption); extra fields such as "bbox" -> meta."""
    skips = SkipLog() if skips is None else skips
    yield from _read_image_audio_pairs(
        Path(annotation_path), Path(image_dir), Path(audio_dir), split, dataset, skips, entries, first, validate
    )


def read_negative_pairs(
    annotation_path: str | Path,
    image_dir: str | Path,
    audio_dir: str | Path,
    split: str = "train",
    dataset: str = "negative_pairs",
    skips: SkipLog | None = None,
    *,
    entries: list[Any] | None = None,
    first: int = 0,
    validate: bool = True,
) -> Iterator[dict[str, Any]]:
    """Unrelated image-audio pairs in the layout described in the module docstring."""
    skips = SkipLog() if skips is None else skips
    yield from _read_image_audio_pairs(
        Path(annotation_path), Path(image_dir), Path(audio_dir), split, dataset, skips, entries, first, validate
    )
