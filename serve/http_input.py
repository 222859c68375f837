"""Reading what a client sends over HTTP: the body (within a size limit), JSON, forms, and
allow-listed image URLs. Every failure is an `APIError` naming the problem (400 / 413)."""

from __future__ import annotations

import json
import urllib.parse
from typing import Any

from fastapi import Request
from starlette.formparsers import MultiPartException, MultiPartParser

from serve.errors import APIError
from serve.protocol import Media


def content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than `limit` bytes (declared or actually sent)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise APIError(400, f"invalid Content-Length header {declared!r}")
        if int(declared) > limit:
            raise APIError(413, f"request body is {int(declared)} bytes, more than the {limit} allowed")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body is more than the {limit} bytes allowed")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(body: bytes) -> Any:
    if not body:
        raise APIError(400, "the request body is empty; expected JSON")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise APIError(400, f"the request body is not valid JSON: {err}") from err
    except RecursionError:
        raise APIError(400, "the request body is JSON nested too deeply") from None


async def parse_multipart(request: Request, body: bytes, limit: int) -> tuple[dict[str, str], dict[str, bytes]]:
    """multipart/form-data -> (text fields, files)."""

    async def stream():
        yield body

    try:
        form = await MultiPartParser(request.headers, stream(), max_files=2, max_fields=16, max_part_size=limit).parse()
    except MultiPartException as err:
        raise APIError(400, f"malformed multipart body: {err.message}") from err
    fields: dict[str, str] = {}
    files: dict[str, bytes] = {}
    for name, value in form.multi_items():
        if name in fields or name in files:
            raise APIError(400, f"field {name!r} appears more than once", name)
        if isinstance(value, str):
            fields[name] = value
        else:
            files[name] = await value.read()
    await form.close()
    return fields, files


def parse_urlencoded(body: bytes) -> dict[str, str]:
    try:
        pairs = urllib.parse.parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(body))
    except (UnicodeDecodeError, ValueError) as err:
        raise APIError(400, f"malformed form body: {err}") from err
    fields: dict[str, str] = {}
    for name, value in pairs:
        if name in fields:
            raise APIError(400, f"field {name!r} appears more than once", name)
        fields[name] = value
    return fields


async def fetch_image(url: str, limit: int, timeout_s: float) -> Media:
    """GET an allow-listed image URL (the caller checked the list): no redirects, size and time limits."""
    import httpx

    try:
        async with httpx.AsyncClient(follow_redirects=False, timeout=timeout_s) as client:
            async with client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise APIError(400, f"fetching image_url {url} failed: HTTP {response.status_code}", "image_url")
                data = bytearray()
                async for chunk in response.aiter_bytes():
                    data += chunk
                    if len(data) > limit:
                        raise APIError(413, f"image_url {url} is more than {limit} bytes", "image_url")
    except httpx.HTTPError as err:
        raise APIError(400, f"fetching image_url {url} failed: {err}", "image_url") from err
    if not data:
        raise APIError(400, f"image_url {url} returned no data", "image_url")
    return Media.of(bytes(data))
