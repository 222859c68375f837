"""The HTTP API's shapes: parsing request bodies into a `ChatRequest`, and building responses.

Pure Python (no Ray, no FastAPI): every function here is testable on its own. Two request formats:

    POST /v1/chat               {"message", "history": [{"role", "content"}], "image": base64,
                                 "audio": base64, "max_new_tokens", "temperature", "top_p"}
                                (or the same fields as multipart/form-data, media as files)
    POST /v1/chat/completions   OpenAI chat completions: messages with content parts `text`,
                                `image_url` (data URL) and `input_audio` (base64 + format)

Both end in the same `ChatRequest`: text turns, at most one image and one audio (the model has one
slot per modality), and sampling settings. Anything unusable raises `APIError`, a `ValueError` whose
status is a 4xx and whose message names the field and the problem.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from bubogpt.conversation import MARKUP, SLOT_MARKER, Conversation

from serve.settings import ServeSettings

# Strings that carry structure in the prompt format. User text keeps them as text anyway (only
# structure creates a modality slot), but a client sending them is either confused or probing, so
# they are refused with a message that names them. "###" ends a turn: it would let text forge one.
RESERVED_MARKERS = (SLOT_MARKER, *(tag for pair in MARKUP.values() for tag in pair), Conversation.sep)
AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg")


class APIError(ValueError):
    """A request the server refuses; `status` is the HTTP status, `param` the offending field."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.kind = kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """OpenAI's error shape, which the official client turns into an exception with this message."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)


@dataclass(frozen=True)
class Media:
    """Encoded media bytes and their content hash (the cache key for encoder and grounding outputs)."""

    data: bytes
    sha256: str

    @classmethod
    def of(cls, data: bytes) -> "Media":
        return cls(bytes(data), hashlib.sha256(data).hexdigest())


@dataclass
class Message:
    role: str  # "user" or "assistant"
    text: str
    modalities: tuple[str, ...] = ()  # slots opened before this user turn's text ("vision", "audio")


@dataclass
class ChatRequest:
    messages: list[Message]  # ends with a user message
    system: str | None = None  # None = the reference's system sentence
    image: Media | None = None
    audio: Media | None = None
    image_url: str | None = None  # an allow-listed remote image, fetched by the ingress into `image`
    max_new_tokens: int = 300
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 0.9
    stream: bool = False

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0

    def conversation(self) -> Conversation:
        """The conversation the model continues; user text never creates a modality slot."""
        conversation = Conversation() if self.system is None else Conversation(system=self.system)
        for message in self.messages:
            if message.role == "user":
                conversation.add_user(message.text, message.modalities)
            else:
                conversation.add_assistant(message.text)
        return conversation


# --------------------------------------------------------------------------------------------------
# Field checks shared by both formats
# --------------------------------------------------------------------------------------------------


def check_text(text: Any, param: str, allow_empty: bool = True) -> str:
    if not isinstance(text, str):
        raise bad_request(f"{param} must be a string, got {type(text).__name__}", param)
    for marker in RESERVED_MARKERS:
        if marker in text:
            raise bad_request(
                f"{param} contains the reserved marker {marker!r}; media go in their own fields, "
                "and turns in separate messages",
                param,
            )
    if not allow_empty and not text.strip():
        raise bad_request(f"{param} is empty", param)
    return text


def decode_base64(value: Any, param: str) -> bytes:
    if not isinstance(value, str):
        raise bad_request(f"{param} must be a base64 string, got {type(value).__name__}", param)
    try:
        data = base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError) as err:
        raise bad_request(f"{param} is not valid base64: {err}", param) from err
    if not data:
        raise bad_request(f"{param} is empty (0 bytes)", param)
    return data


def parse_int(value: Any, param: str, low: int, high: int) -> int:
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise bad_request(f"{param} must be an integer, got {value!r}", param) from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"{param} must be an integer, got {value!r}", param)
    if not low <= value <= high:
        raise bad_request(f"{param} must be between {low} and {high}, got {value}", param)
    return value


def parse_float(value: Any, param: str, low: float, high: float, low_open: bool = False) -> float:
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise bad_request(f"{param} must be a number, got {value!r}", param) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise bad_request(f"{param} must be a number, got {value!r}", param)
    if value > high or value < low or (low_open and value == low):
        interval = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise bad_request(f"{param} must be in {interval}, got {value}", param)
    return float(value)


def sampling_fields(data: dict[str, Any], settings: ServeSettings, max_tokens_names: tuple[str, ...]) -> dict:
    """max_new_tokens / temperature / top_p with their limits and the reference's defaults."""
    fields: dict[str, Any] = {}
    for name in max_tokens_names:
        if data.get(name) is not None:
            fields["max_new_tokens"] = parse_int(data[name], name, 1, settings.max_new_tokens)
    fields.setdefault("max_new_tokens", settings.default_max_new_tokens)
    if data.get("temperature") is not None:
        fields["temperature"] = parse_float(data["temperature"], "temperature", 0.0, 2.0)
    if data.get("top_p") is not None:
        fields["top_p"] = parse_float(data["top_p"], "top_p", 0.0, 1.0, low_open=True)
    return fields


def parse_history(history: Any, settings: ServeSettings) -> list[Message]:
    if isinstance(history, str):
        try:
            history = json.loads(history) if history.strip() else []
        except json.JSONDecodeError as err:
            raise bad_request(f"history is not valid JSON: {err}", "history") from err
    if history is None:
        return []
    if not isinstance(history, list):
        raise bad_request("history must be a list of {role, content} objects", "history")
    if len(history) + 1 > settings.max_messages:
        limit = settings.max_messages - 1
        raise bad_request(f"history has {len(history)} messages; at most {limit} are allowed", "history")
    messages = []
    for i, item in enumerate(history):
        param = f"history[{i}]"
        if not isinstance(item, dict) or set(item) - {"role", "content"} or "content" not in item:
            raise bad_request(f"{param} must be an object with 'role' and 'content' only", param)
        role = item.get("role")
        if role not in ("user", "assistant"):
            raise bad_request(f"{param}.role must be 'user' or 'assistant', got {role!r}", f"{param}.role")
        messages.append(Message(role, check_text(item["content"], f"{param}.content")))
    return messages


def attach_media_to_first_user_turn(messages: list[Message], image: Media | None, audio: Media | None) -> None:
    """A chat is about one image and/or one audio: their slots open the first user turn."""
    modalities = tuple(m for m, media in (("vision", image), ("audio", audio)) if media is not None)
    first_user = next(m for m in messages if m.role == "user")
    first_user.modalities = modalities


# --------------------------------------------------------------------------------------------------
# POST /v1/chat
# --------------------------------------------------------------------------------------------------

CHAT_FIELDS = ("message", "history", "image", "audio", "max_new_tokens", "temperature", "top_p")


def parse_chat(fields: dict[str, Any], files: dict[str, bytes], settings: ServeSettings) -> ChatRequest:
    """`fields`: JSON object or the form's text fields; `files`: the form's files (image, audio).

    In JSON the media are base64 strings (or data URLs) in `image` / `audio`; in a form they are files.
    """
    unknown = sorted(set(fields) - set(CHAT_FIELDS)) + sorted(set(files) - {"image", "audio"})
    if unknown:
        raise bad_request(f"unknown field(s) {unknown}; expected some of {list(CHAT_FIELDS)}", unknown[0])
    overlap = sorted(set(fields) & set(files))
    if overlap:
        raise bad_request(f"{overlap[0]} was sent both as a file and as a field", overlap[0])
    if "message" not in fields:
        raise bad_request("message is required", "message")
    messages = parse_history(fields.get("history"), settings)
    messages.append(Message("user", check_text(fields["message"], "message")))
    media: dict[str, Media | None] = {}
    for name in ("image", "audio"):
        if name in files:
            if not files[name]:
                raise bad_request(f"{name} is empty (0 bytes)", name)
            media[name] = Media.of(files[name])
        elif isinstance(fields.get(name), str) and fields[name].startswith("data:"):
            media[name] = Media.of(parse_data_url(fields[name], name, "image" if name == "image" else "audio"))
        elif fields.get(name) not in (None, ""):
            media[name] = Media.of(decode_base64(fields[name], name))
        else:
            media[name] = None
    if not messages[-1].text.strip() and media["image"] is None and media["audio"] is None:
        raise bad_request("message is empty and no image or audio was sent", "message")
    attach_media_to_first_user_turn(messages, media["image"], media["audio"])
    return ChatRequest(
        messages=messages,
        image=media["image"],
        audio=media["audio"],
        **sampling_fields(fields, settings, ("max_new_tokens",)),
    )


# --------------------------------------------------------------------------------------------------
# POST /v1/chat/completions (OpenAI)
# --------------------------------------------------------------------------------------------------

UNSUPPORTED_COMPLETION_FIELDS = (
    "tools", "functions", "tool_choice", "function_call", "logprobs", "audio", "modalities",
)  # fmt: skip


def parse_data_url(url: str, param: str, wanted_type: str) -> bytes:
    """`data:image/png;base64,...` -> bytes."""
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:"):
        raise bad_request(f"{param} is not a data URL", param)
    media_type, *options = header[len("data:"):].split(";")
    if not media_type.startswith(wanted_type + "/"):
        raise bad_request(f"{param} has media type {media_type or 'none'!r}; expected {wanted_type}/*", param)
    if "base64" not in options:
        raise bad_request(f"{param} must be base64-encoded (data:{media_type};base64,...)", param)
    return decode_base64(payload, param)


def url_is_allowed(url: str, allowed_prefixes: list[str]) -> bool:
    """Scheme, host and port equal, and the path starts with the allowed path: no prefix tricks
    such as `https://allowed.example.evil.com/` or `https://allowed.example@evil.com/`."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    if parts.username or parts.password:
        return False
    for prefix in allowed_prefixes:
        allowed = urlsplit(prefix)
        if (parts.scheme, parts.netloc.lower()) != (allowed.scheme, allowed.netloc.lower()):
            continue
        if parts.path.startswith(allowed.path or "/") and ".." not in parts.path.split("/"):
            return True
    return False


def parse_image_part(part: dict, param: str, settings: ServeSettings) -> tuple[Media | None, str | None]:
    image_url = part.get("image_url")
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    if not isinstance(url, str) or not url:
        raise bad_request(f"{param}.image_url.url must be a non-empty string", f"{param}.image_url")
    if url.startswith("data:"):
        return Media.of(parse_data_url(url, f"{param}.image_url", "image")), None
    scheme = urlsplit(url).scheme.lower() if "://" in url else ""
    if scheme in ("http", "https") and url_is_allowed(url, settings.allowed_media_url_prefixes):
        return None, url
    if scheme in ("http", "https"):
        raise APIError(
            400,
            f"{param}.image_url is a remote URL, which this server does not fetch (not on its allow-list); "
            "send the image inline as a data URL (data:image/png;base64,...)",
            f"{param}.image_url",
            kind="invalid_request_error",
        )
    raise bad_request(f"{param}.image_url must be a data URL (or an allow-listed http(s) URL)", f"{param}.image_url")


def parse_audio_part(part: dict, param: str) -> Media:
    audio = part.get("input_audio")
    if not isinstance(audio, dict) or "data" not in audio:
        raise bad_request(f"{param}.input_audio must be an object with 'data' (base64) and 'format'", param)
    audio_format = audio.get("format", "wav")
    if audio_format not in AUDIO_FORMATS:
        raise bad_request(f"{param}.input_audio.format {audio_format!r} is not one of {list(AUDIO_FORMATS)}", param)
    return Media.of(decode_base64(audio["data"], f"{param}.input_audio.data"))


def parse_completion(body: Any, settings: ServeSettings, model_name: str) -> ChatRequest:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != model_name:
        raise APIError(404, f"model {model!r} does not exist; this server serves {model_name!r}", "model",
                       kind="not_found_error")  # fmt: skip
    for name in UNSUPPORTED_COMPLETION_FIELDS:
        if body.get(name) not in (None, False, [], "none"):
            raise bad_request(f"{name} is not supported by this server", name)
    if body.get("n") not in (None, 1):
        raise bad_request(f"n must be 1, got {body.get('n')!r}", "n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_request(f"stream must be true or false, got {stream!r}", "stream")
    raw_messages = body.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise bad_request("messages must be a non-empty list", "messages")
    if len(raw_messages) > settings.max_messages:
        raise bad_request(f"{len(raw_messages)} messages; at most {settings.max_messages} are allowed", "messages")

    system_texts: list[str] = []
    messages: list[Message] = []
    image = audio = None
    image_url = None
    for i, raw in enumerate(raw_messages):
        param = f"messages[{i}]"
        if not isinstance(raw, dict):
            raise bad_request(f"{param} must be an object", param)
        role = raw.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise bad_request(f"{param}.role must be system, user or assistant, got {role!r}", f"{param}.role")
        content = raw.get("content")
        if content is None:
            content = ""
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise bad_request(f"{param}.content must be a string or a list of content parts", f"{param}.content")
        texts: list[str] = []
        modalities: list[str] = []
        for j, part in enumerate(parts):
            part_param = f"{param}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                texts.append(check_text(part.get("text"), f"{part_param}.text"))
                continue
            if kind not in ("image_url", "input_audio"):
                raise bad_request(
                    f"{part_param} has unknown content part type {kind!r}; supported: text, image_url, input_audio",
                    f"{part_param}.type",
                )
            if role != "user":
                raise bad_request(f"{part_param}: only user messages may carry {kind}", part_param)
            if kind == "image_url":
                if image is not None or image_url is not None:
                    raise bad_request(f"{part_param}: at most one image per conversation (one image slot)", part_param)
                image, image_url = parse_image_part(part, part_param, settings)
                modalities.append("vision")
            else:
                if audio is not None:
                    raise bad_request(f"{part_param}: at most one audio per conversation (one audio slot)", part_param)
                audio = parse_audio_part(part, part_param)
                modalities.append("audio")
        text = " ".join(t for t in texts if t)
        if role in ("system", "developer"):
            system_texts.append(text)
        else:
            messages.append(Message(role, text, tuple(modalities)))
    if not messages or messages[-1].role != "user":
        raise bad_request("the last message must come from the user", "messages")
    if not messages[-1].text.strip() and not messages[-1].modalities:
        raise bad_request(f"messages[{len(raw_messages) - 1}] has no text and no media", "messages")
    return ChatRequest(
        messages=messages,
        system=" ".join(system_texts) if system_texts else None,
        image=image,
        audio=audio,
        image_url=image_url,
        stream=stream,
        **sampling_fields(body, settings, ("max_tokens", "max_completion_tokens")),
    )


# --------------------------------------------------------------------------------------------------
# Responses
# --------------------------------------------------------------------------------------------------


@dataclass
class Completion:
    """What the LLM deployment returns for one request."""

    text: str
    finish_reason: str  # "stop" (end_sym or EOS) or "length"
    prompt_tokens: int
    completion_tokens: int
    batch_size: int  # rows in the generate() call that produced it
    encoder_cache: dict[str, str] = field(default_factory=dict)  # {"vision": "hit" | "miss", ...}
    encode_ms: float = 0.0  # media -> encoder tokens (~0 on a cache hit)
    first_token_ms: float = 0.0  # from joining the batch queue to the first token
    generate_ms: float = 0.0  # from joining the batch queue to the last token


@dataclass
class Answer:
    """One composed reply: the LLM's completion, the image's grounding and the matched spans."""

    completion: Completion
    grounding: dict[str, Any] | None  # {"entities", "annotated_image", "cache"}; None without an image
    spans: list[dict[str, Any]]
    timings: dict[str, float]  # llm_ms, grounding_ms, matching_ms, total_ms (ingress clock)

    def all_timings(self) -> dict[str, float]:
        """The ingress's timings plus the LLM replica's own breakdown."""
        c = self.completion
        return {**self.timings, "llm_encode_ms": c.encode_ms, "llm_first_token_ms": c.first_token_ms,
                "llm_generate_ms": c.generate_ms}  # fmt: skip

    def cache_report(self) -> dict[str, str]:
        report = {f"{m}_encoder": state for m, state in self.completion.encoder_cache.items()}
        if self.grounding is not None:
            report["grounding"] = self.grounding["cache"]
        return report

    def grounding_body(self) -> dict[str, Any] | None:
        if self.grounding is None:
            return None
        return {"entities": self.grounding["entities"], "spans": self.spans,
                "annotated_image": self.grounding["annotated_image"]}  # fmt: skip


def usage(completion: Completion) -> dict[str, int]:
    return {
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
        "total_tokens": completion.prompt_tokens + completion.completion_tokens,
    }


def chat_body(answer: Answer) -> dict[str, Any]:
    """The /v1/chat response."""
    grounding = answer.grounding_body() or {"entities": [], "spans": [], "annotated_image": None}
    return {
        "answer": answer.completion.text,
        "finish_reason": answer.completion.finish_reason,
        **grounding,  # entities (label, colour, boxes, RLE masks), spans, annotated PNG (base64)
        "usage": usage(answer.completion),
        "generation_batch_size": answer.completion.batch_size,
        "cache": answer.cache_report(),
        "timings": answer.all_timings(),
    }


def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def completion_body(model: str, answer: Answer) -> dict[str, Any]:
    """The OpenAI chat.completion object, plus `grounding` (and timings) as extra fields."""
    completion = answer.completion
    return {
        "id": completion_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": completion.text},
                "finish_reason": completion.finish_reason,
            }
        ],
        "usage": usage(completion),
        "grounding": answer.grounding_body(),
        "generation_batch_size": completion.batch_size,
        "cache": answer.cache_report(),
        "timings": answer.all_timings(),
    }


def completion_chunk(chunk_id: str, created: int, model: str, delta: dict, finish_reason: str | None = None,
                     **extra: Any) -> dict:  # fmt: skip
    return {
        "id": chunk_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        **extra,
    }


def sse_event(payload: dict | str) -> bytes:
    """One server-sent event: `data: <json>` and a blank line."""
    text = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {text}\n\n".encode()
