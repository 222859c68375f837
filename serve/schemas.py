"""The request bodies as pydantic models: FastAPI's `/docs` shows them, and parsing a body is
validating it against them.

    ChatCompletionRequest   POST /v1/chat/completions (OpenAI chat completions, strict JSON types)
    ChatBody                POST /v1/chat (JSON, or the same fields as a form: numbers as text)

`validate(model, data)` turns a pydantic error into the API's 400 whose message names the field as a
path (`messages[0].content[1].image_url.url`) and the problem. OpenAI parameters this server does not
honour are refused by name (`REFUSED`), unless they carry their no-op value (`n: 1`,
`presence_penalty: 0`, ...); unknown fields are refused too. What depends on the server's settings
(limits, the media allow-list) is checked where a model becomes a `ChatRequest` (protocol.py).
"""

from __future__ import annotations

import json
from typing import Any, Callable, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from serve.errors import APIError

MAX_STOP_STRINGS = 4  # OpenAI's limit


def refuse(message: str) -> PydanticCustomError:
    """A validation error with our own message (`describe` puts the field's path before it)."""
    return PydanticCustomError("bubogpt", message)


def stop_strings(value: Any) -> Any:
    """`stop`: one string or up to 4; None and [] mean none."""
    if value is None:
        return []
    strings = [value] if isinstance(value, str) else value
    if isinstance(strings, list):
        if len(strings) > MAX_STOP_STRINGS:
            raise refuse(f"{len(strings)} strings; at most {MAX_STOP_STRINGS} are allowed")
        if any(isinstance(s, str) and not s for s in strings):
            raise refuse("an empty string cannot be a stop string")
    return strings


class NoExtraFields(BaseModel):
    """Unknown fields are refused (`unknown field '...'`), never ignored."""

    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------------------------------
# POST /v1/chat/completions
# --------------------------------------------------------------------------------------------------


class ImageURL(NoExtraFields):
    url: str = Field(description="a data URL (data:image/png;base64,...) or an allow-listed http(s) URL")
    detail: Literal["auto"] | None = Field(None, description="only 'auto': the server picks the resolution")


class InputAudio(NoExtraFields):
    data: str = Field(description="base64-encoded audio")
    format: Literal["wav", "mp3", "flac", "ogg"] = "wav"


class ContentPart(NoExtraFields):
    """One part of a message: text, an image or an audio clip (the field named by `type`)."""

    type: Literal["text", "image_url", "input_audio"]
    text: str | None = None
    image_url: ImageURL | None = None
    input_audio: InputAudio | None = None

    @field_validator("image_url", mode="before")
    @classmethod
    def _url_as_string(cls, value: Any) -> Any:
        return {"url": value} if isinstance(value, str) else value  # a bare URL string, as some clients send

    @model_validator(mode="after")
    def _has_its_field(self) -> "ContentPart":
        if getattr(self, self.type) is None:
            raise refuse(f"a part of type {self.type!r} needs the field {self.type!r}")
        return self


class ChatMessage(NoExtraFields):
    role: Literal["system", "developer", "user", "assistant"]
    content: list[ContentPart] = Field(default_factory=list, description="a string, or a list of content parts")

    @field_validator("content", mode="before")
    @classmethod
    def _string_as_text_part(cls, value: Any) -> Any:
        if value is None:
            return []
        return [{"type": "text", "text": value}] if isinstance(value, str) else value


class StreamOptions(NoExtraFields):
    include_usage: bool = Field(False, description="a last chunk with `choices: []` and the usage")


def _no_op(*values: Any) -> Callable[[Any], bool]:
    return lambda value: value is None or any(value == v and type(value) is type(v) for v in values)


# OpenAI parameters this server does not honour: refused (400, named) unless at their no-op value
# (some clients send `n: 1` or `presence_penalty: 0` always). serve/README.md lists them.
REFUSED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "n": (_no_op(1), "n must be 1: this server returns one choice"),
    "response_format": (_no_op({"type": "text"}), "response_format: only type 'text' is supported "
                        "(no JSON mode, no JSON schema)"),
    "logprobs": (_no_op(False), "logprobs are not supported"),
    "top_logprobs": (_no_op(0), "top_logprobs are not supported"),
    "presence_penalty": (_no_op(0, 0.0), "presence_penalty must be 0: penalties are not supported"),
    "frequency_penalty": (_no_op(0, 0.0), "frequency_penalty must be 0: penalties are not supported"),
    "logit_bias": (_no_op({}), "logit_bias is not supported"),
    "tools": (_no_op([]), "tools are not supported (no function calling)"),
    "tool_choice": (_no_op("none"), "tool_choice is not supported (no function calling)"),
    "functions": (_no_op([]), "functions are not supported (no function calling)"),
    "function_call": (_no_op("none"), "function_call is not supported (no function calling)"),
    "parallel_tool_calls": (_no_op(), "parallel_tool_calls is not supported (no function calling)"),
    "audio": (_no_op(), "audio output is not supported"),
    "modalities": (_no_op(["text"]), "modalities: only ['text'] output is supported"),
    "prediction": (_no_op(), "prediction (predicted outputs) is not supported"),
    "reasoning_effort": (_no_op(), "reasoning_effort is not supported"),
    "web_search_options": (_no_op(), "web_search_options is not supported"),
    "store": (_no_op(False), "store is not supported (nothing is stored)"),
    "metadata": (_no_op({}), "metadata is not supported (nothing is stored)"),
    "service_tier": (_no_op("auto", "default"), "service_tier is not supported"),
}  # fmt: skip


class ChatCompletionRequest(NoExtraFields):
    """OpenAI chat completions. Parameters outside this model are refused by name (serve/README.md)."""

    model: str | None = Field(None, description="the id /v1/models lists; optional")
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, description="0 = greedy; default 1")
    top_p: float | None = Field(None, gt=0, le=1, description="default 0.9")
    stop: list[str] = Field(default_factory=list, description="up to 4 strings; the text ends before the first")
    seed: int | None = Field(None, description="same seed and request -> the same sample")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="an end-user id; accepted, not used")

    refused: ClassVar[dict] = REFUSED

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_strings(cls, value: Any) -> Any:
        return stop_strings(value)


# --------------------------------------------------------------------------------------------------
# POST /v1/chat
# --------------------------------------------------------------------------------------------------


class HistoryMessage(NoExtraFields):
    role: Literal["user", "assistant"]
    content: str


class ChatBody(NoExtraFields):
    """One user message with the conversation so far; the image and audio open its first user turn."""

    message: str
    history: list[HistoryMessage] = Field(default_factory=list, description="a list, or the same as JSON text")
    image: str | None = Field(None, description="base64 or a data URL in JSON; a file in a form")
    audio: str | None = Field(None, description="base64 or a data URL in JSON; a file in a form")
    max_new_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, description="0 = greedy; default 1")
    top_p: float | None = Field(None, gt=0, le=1, description="default 0.9")
    stop: list[str] = Field(default_factory=list, description="up to 4 strings (a form sends one)")
    seed: int | None = Field(None, description="same seed and request -> the same sample")

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_strings(cls, value: Any) -> Any:
        return stop_strings(value)

    @field_validator("history", mode="before")
    @classmethod
    def _history_from_json(cls, value: Any) -> Any:
        if value is None:
            return []
        if isinstance(value, str):
            try:
                return json.loads(value) if value.strip() else []
            except json.JSONDecodeError as err:
                raise refuse(f"not valid JSON: {err}") from None
        return value


# --------------------------------------------------------------------------------------------------
# Validation errors -> APIError
# --------------------------------------------------------------------------------------------------


def short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def field_path(loc: tuple) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def describe(error: dict) -> str:
    """One pydantic error as a sentence that names the field, the rule and what was sent."""
    param, kind, ctx = field_path(error["loc"]), error["type"], error.get("ctx", {})
    got = short_repr(error["input"])
    if kind == "bubogpt":
        return f"{param}: {error['msg']}" if param else error["msg"]
    if kind == "extra_forbidden":
        return f"unknown field {param!r}"
    if kind == "missing":
        return f"{param} is required"
    if kind == "literal_error":
        return f"{param} must be {ctx['expected']}, got {got}"
    bounds = {"greater_than": "greater than {gt}", "greater_than_equal": "at least {ge}",
              "less_than": "less than {lt}", "less_than_equal": "at most {le}"}  # fmt: skip
    if kind in bounds:
        numbers = {key: f"{value:g}" if isinstance(value, float) else value for key, value in ctx.items()}
        return f"{param} must be {bounds[kind].format(**numbers)}, got {got}"
    if kind == "too_short" and ctx.get("min_length") == 1:
        return f"{param} must not be empty"
    return f"{param}: {error['msg'][0].lower()}{error['msg'][1:]}, got {got}"


def validate(model: type[BaseModel], data: Any, strict: bool) -> BaseModel:
    """`model` from JSON-like `data`, or the API's 400 naming the first problem. Parameters in the
    model's `refused` table are checked first, and dropped when they carry their no-op value."""
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    refused = getattr(model, "refused", {})
    for name, (accepted, message) in refused.items():
        if name in data and not accepted(data[name]):
            raise APIError(400, f"{message}; got {short_repr(data[name])}", name)
    try:
        return model.model_validate({k: v for k, v in data.items() if k not in refused}, strict=strict)
    except ValidationError as err:
        first = err.errors(include_url=False)[0]
        raise APIError(400, describe(first), field_path(first["loc"]) or None) from None


# --------------------------------------------------------------------------------------------------
# OpenAPI: the bodies are read by the routes themselves (size limit, several content types), so
# FastAPI does not see them as parameters; `openapi_body` declares them for /docs.
# --------------------------------------------------------------------------------------------------


def openapi_body(model: type[BaseModel], *content_types: str) -> dict:
    """A route's `openapi_extra`: `model` as its request body (in components/schemas)."""
    schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {kind: {"schema": schema} for kind in content_types}}}


def add_schemas(openapi: dict, models: tuple[type[BaseModel], ...]) -> dict:
    """Put `models` (and the models they use) into an OpenAPI document's components/schemas."""
    schemas = openapi.setdefault("components", {}).setdefault("schemas", {})
    for model in models:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    return openapi
