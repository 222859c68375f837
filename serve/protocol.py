"""The HTTP API's shapes: request bodies into a `ChatRequest`, and the responses.

    POST /v1/chat               `ChatBody` (serve/schemas.py): message, history, image, audio,
                                max_new_tokens, temperature, top_p, stop, seed (JSON, or a form with
                                the media as files)
    POST /v1/chat/completions   `ChatCompletionRequest`: OpenAI chat completions, messages with
                                content parts `text`, `image_url` (data URL) and `input_audio`

The schemas check types and ranges; this module checks what depends on the server's settings (the
token limit, the message count, the media URL allow-list) and the prompt format's reserved markers,
decodes base64, and builds the same `ChatRequest` from both: text turns, at most one image and one
audio (the model has one slot per modality), sampling settings. Anything unusable raises `APIError`
(a 4xx whose message names the field and the problem).
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

from serve.errors import APIError, bad_request
from serve.schemas import ChatBody, ChatCompletionRequest, ContentPart, validate
from serve.settings import ServeSettings

# Strings that carry structure in the prompt format. User text keeps them as text anyway (only
# structure creates a modality slot), but a client sending them is either confused or probing, so
# they are refused with a message that names them. "###" ends a turn: it would let text forge one.
RESERVED_MARKERS = (SLOT_MARKER, *(tag for pair in MARKUP.values() for tag in pair), Conversation.sep)


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
    stop: tuple[str, ...] = ()  # the answer ends before the first of these (finish_reason "stop")
    seed: int | None = None  # same seed and request -> the same sample
    stream: bool = False
    include_usage: bool = False  # streaming: a last chunk with `choices: []` and the usage

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
# Checks shared by both formats
# --------------------------------------------------------------------------------------------------


def check_text(text: str, param: str) -> str:
    for marker in RESERVED_MARKERS:
        if marker in text:
            raise bad_request(
                f"{param} contains the reserved marker {marker!r}; media go in their own fields, "
                "and turns in separate messages",
                param,
            )
    return text


def decode_base64(value: str, param: str) -> bytes:
    try:
        data = base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError) as err:
        raise bad_request(f"{param} is not valid base64: {err}", param) from err
    if not data:
        raise bad_request(f"{param} is empty (0 bytes)", param)
    return data


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


def sampling(request: ChatBody | ChatCompletionRequest, max_new_tokens: int | None, max_tokens_name: str,
             settings: ServeSettings) -> dict[str, Any]:  # fmt: skip
    """Generation settings with the server's limit and the reference's defaults."""
    if max_new_tokens is not None and max_new_tokens > settings.max_new_tokens:
        raise bad_request(f"{max_tokens_name} must be between 1 and {settings.max_new_tokens}, got {max_new_tokens}",
                          max_tokens_name)  # fmt: skip
    fields: dict[str, Any] = {"max_new_tokens": max_new_tokens or settings.default_max_new_tokens,
                              "stop": tuple(request.stop), "seed": request.seed}  # fmt: skip
    if request.temperature is not None:
        fields["temperature"] = request.temperature
    if request.top_p is not None:
        fields["top_p"] = request.top_p
    return fields


def attach_media_to_first_user_turn(messages: list[Message], image: Media | None, audio: Media | None) -> None:
    """A chat is about one image and/or one audio: their slots open the first user turn."""
    modalities = tuple(m for m, media in (("vision", image), ("audio", audio)) if media is not None)
    first_user = next(m for m in messages if m.role == "user")
    first_user.modalities = modalities


# --------------------------------------------------------------------------------------------------
# POST /v1/chat
# --------------------------------------------------------------------------------------------------


def parse_chat(fields: dict[str, Any], files: dict[str, bytes], settings: ServeSettings) -> ChatRequest:
    """`fields`: the JSON object or the form's text fields; `files`: the form's files (image, audio)."""
    unknown_files = sorted(set(files) - {"image", "audio"})
    if unknown_files:
        raise bad_request(f"unknown field {unknown_files[0]!r}", unknown_files[0])
    overlap = sorted(set(fields) & set(files))
    if overlap:
        raise bad_request(f"{overlap[0]} was sent both as a file and as a field", overlap[0])
    body = validate(ChatBody, fields, strict=False)  # a form's numbers arrive as text
    if len(body.history) + 1 > settings.max_messages:
        limit = settings.max_messages - 1
        raise bad_request(f"history has {len(body.history)} messages; at most {limit} are allowed", "history")
    messages = [Message(m.role, check_text(m.content, f"history[{i}].content")) for i, m in enumerate(body.history)]
    messages.append(Message("user", check_text(body.message, "message")))
    media: dict[str, Media | None] = {}
    for name in ("image", "audio"):
        value = getattr(body, name)
        if name in files:
            if not files[name]:
                raise bad_request(f"{name} is empty (0 bytes)", name)
            media[name] = Media.of(files[name])
        elif value and value.startswith("data:"):
            media[name] = Media.of(parse_data_url(value, name, "image" if name == "image" else "audio"))
        elif value:
            media[name] = Media.of(decode_base64(value, name))
        else:
            media[name] = None
    if not messages[-1].text.strip() and media["image"] is None and media["audio"] is None:
        raise bad_request("message is empty and no image or audio was sent", "message")
    attach_media_to_first_user_turn(messages, media["image"], media["audio"])
    return ChatRequest(messages=messages, image=media["image"], audio=media["audio"],
                       **sampling(body, body.max_new_tokens, "max_new_tokens", settings))  # fmt: skip


# --------------------------------------------------------------------------------------------------
# POST /v1/chat/completions (OpenAI)
# --------------------------------------------------------------------------------------------------


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


def parse_image_part(part: ContentPart, param: str, settings: ServeSettings) -> tuple[Media | None, str | None]:
    """An image part -> (the image, None), or (None, an allow-listed URL for the ingress to fetch)."""
    url, param = part.image_url.url, f"{param}.image_url"
    if not url:
        raise bad_request(f"{param}.url must not be empty", param)
    if url.startswith("data:"):
        return Media.of(parse_data_url(url, param, "image")), None
    scheme = urlsplit(url).scheme.lower() if "://" in url else ""
    if scheme in ("http", "https") and url_is_allowed(url, settings.allowed_media_url_prefixes):
        return None, url
    if scheme in ("http", "https"):
        raise bad_request(
            f"{param} is a remote URL, which this server does not fetch (not on its allow-list); "
            "send the image inline as a data URL (data:image/png;base64,...)",
            param,
        )
    raise bad_request(f"{param} must be a data URL (or an allow-listed http(s) URL)", param)


def parse_completion(body: Any, settings: ServeSettings, model_name: str) -> ChatRequest:
    request = validate(ChatCompletionRequest, body, strict=True)  # JSON: no numbers as text
    if request.model is not None and request.model != model_name:
        raise APIError(404, f"model {request.model!r} does not exist; this server serves {model_name!r}", "model",
                       kind="not_found_error")  # fmt: skip
    if len(request.messages) > settings.max_messages:
        raise bad_request(f"{len(request.messages)} messages; at most {settings.max_messages} are allowed", "messages")
    if request.max_tokens is not None and request.max_completion_tokens is not None:
        raise bad_request("send max_tokens or max_completion_tokens, not both", "max_tokens")
    max_tokens_name = "max_tokens" if request.max_tokens is not None else "max_completion_tokens"

    system_texts: list[str] = []
    messages: list[Message] = []
    image = audio = image_url = None
    for i, message in enumerate(request.messages):
        texts: list[str] = []
        modalities: list[str] = []
        for j, part in enumerate(message.content):
            param = f"messages[{i}].content[{j}]"
            if part.type == "text":
                texts.append(check_text(part.text, f"{param}.text"))
                continue
            if message.role != "user":
                raise bad_request(f"{param}: only user messages may carry {part.type}", param)
            if part.type == "image_url":
                if image is not None or image_url is not None:
                    raise bad_request(f"{param}: at most one image per conversation (one image slot)", param)
                image, image_url = parse_image_part(part, param, settings)
                modalities.append("vision")
            else:
                if audio is not None:
                    raise bad_request(f"{param}: at most one audio per conversation (one audio slot)", param)
                audio = Media.of(decode_base64(part.input_audio.data, f"{param}.input_audio.data"))
                modalities.append("audio")
        text = " ".join(t for t in texts if t)
        if message.role in ("system", "developer"):
            system_texts.append(text)
        else:
            messages.append(Message(message.role, text, tuple(modalities)))
    if not messages or messages[-1].role != "user":
        raise bad_request("the last message must come from the user", "messages")
    if not messages[-1].text.strip() and not messages[-1].modalities:
        raise bad_request(f"messages[{len(request.messages) - 1}] has no text and no media", "messages")
    max_new_tokens = request.max_tokens if request.max_tokens is not None else request.max_completion_tokens
    return ChatRequest(
        messages=messages,
        system=" ".join(system_texts) if system_texts else None,
        image=image,
        audio=audio,
        image_url=image_url,
        stream=request.stream,
        include_usage=bool(request.stream_options and request.stream_options.include_usage),
        **sampling(request, max_new_tokens, max_tokens_name, settings),
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


def usage_chunk(chunk_id: str, created: int, model: str, completion: Completion) -> dict:
    """The last chunk of a stream asked for with `stream_options.include_usage` (OpenAI's shape)."""
    return {"id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [],
            "usage": usage(completion)}  # fmt: skip


def sse_event(payload: dict | str) -> bytes:
    """One server-sent event: `data: <json>` and a blank line."""
    text = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {text}\n\n".encode()
