"""The ingress deployment: the HTTP API (FastAPI), composing the LLM and grounding deployments.

    POST /v1/chat, /v1/chat/completions
        1. read the body (size limit), parse it into a ChatRequest (serve/schemas.py, protocol.py),
           check auth, the prompt budget and that the media decode (4xx JSON errors naming the problem)
        2. concurrently: LLM.generate(chat) and Grounding.ground(image)
        3. Grounding.match(answer, entities) -> answer spans
        4. the response (JSON, or server-sent events for `stream: true`)
    GET /v1/models, /v1/metrics, /healthz, / (the chat page)

The LLM and grounding deployments arrive as `DeploymentHandle`s. Its options (resources, queue
limits, autoscaling) are in serve/config.yaml, not here.
"""

# No `from __future__ import annotations`: FastAPI reads the route methods' `Request` annotations
# through Serve's ingress wrapper, which needs them evaluated.

import asyncio
import hmac
import time
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from ray import serve
from ray.serve.handle import DeploymentHandle

from bubogpt.modeling_bubogpt import PromptTooLongError
from bubogpt.preprocess import MediaError, decode_audio, decode_image

from serve import errors
from serve.cache import LRUCache
from serve.errors import RETRY_AFTER_S, APIError, api_error_for, original_exception
from serve.http_input import content_type, fetch_image, parse_json, parse_multipart, parse_urlencoded, read_body
from serve.metrics import IngressMetrics
from serve.prompt_budget import PromptBudget
from serve.protocol import (
    Answer,
    ChatRequest,
    Completion,
    chat_body,
    completion_body,
    completion_chunk,
    completion_id,
    parse_chat,
    parse_completion,
    sse_event,
    usage,
    usage_chunk,
)
from serve.replica import replica_identity
from serve.schemas import ChatBody, ChatCompletionRequest, add_schemas, openapi_body
from serve.settings import ServeSettings

api = FastAPI(title="BuboGPT", description="Text + image + audio chat with visual grounding.")
errors.install(api)
STATIC_DIR = Path(__file__).with_name("static")  # the chat page (index.html, app.js, style.css)
api.mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static")


def openapi() -> dict:
    """FastAPI's document plus the request bodies, which the routes parse themselves."""
    if api.openapi_schema is None:
        document = get_openapi(title=api.title, version=api.version, description=api.description, routes=api.routes)
        api.openapi_schema = add_schemas(document, (ChatBody, ChatCompletionRequest))
    return api.openapi_schema


api.openapi = openapi


@api.middleware("http")
async def count_requests(request: Request, call_next):
    """bubogpt_requests_total{route, status} and the ingress's queue depth (until the response, or a
    stream's first chunk, is ready). The route is its template, so unknown paths share one series.
    The metrics live on the app that serves (`request.app`: Serve runs a copy of `api`), created
    there on the first request."""
    state = request.app.state
    if not hasattr(state, "metrics"):
        state.metrics = IngressMetrics()
    status = 500
    with state.metrics.queue.held():
        try:
            response = await call_next(request)
            status = response.status_code
        finally:
            route = request.scope.get("route")
            state.metrics.answered(getattr(route, "path", "unmatched"), status)
    return response


async def timed(response, start: float) -> tuple[Any, float]:
    """Await a deployment response; also return milliseconds since `start` (when it was sent)."""
    result = await response
    return result, (time.perf_counter() - start) * 1000


@serve.deployment(name="Ingress")
@serve.ingress(api)
class ChatIngress:
    def __init__(self, llm: DeploymentHandle, grounding: DeploymentHandle, settings: dict):
        self.llm = llm
        self.grounding = grounding
        self.settings = ServeSettings.from_dict(settings)
        self.token = self.settings.bearer_token()
        self.budget = PromptBudget.of_model_dir(self.settings.model_dir)
        self.model_name = self.settings.model_name or f"bubogpt-{self.budget.config.preset}"
        self.valid_media = LRUCache(1024)  # sha256 of media that decoded within the limits

    async def ping(self) -> dict[str, Any]:
        return replica_identity()

    # -- routes ------------------------------------------------------------------------------------

    @api.get("/", include_in_schema=False)
    async def page(self) -> FileResponse:
        if not (STATIC_DIR / "index.html").is_file():
            raise APIError(404, "this installation has no chat page (serve/static/index.html)", kind="not_found_error")
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        try:
            await asyncio.wait_for(asyncio.gather(self.llm.ping.remote(), self.grounding.ping.remote()), 5.0)
        except Exception as err:  # any failure means "not ready"
            return JSONResponse({"status": "unavailable", "reason": type(original_exception(err)).__name__},
                                status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})  # fmt: skip
        return JSONResponse({"status": "ok", "model": self.model_name})

    @api.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        self._authorize(request)
        return JSONResponse({"object": "list", "data": [self._model()]})

    @api.get("/v1/models/{model_id}")
    async def model_info(self, model_id: str, request: Request) -> JSONResponse:
        self._authorize(request)
        if model_id != self.model_name:
            raise APIError(404, f"model {model_id!r} does not exist; this server serves {self.model_name!r}",
                           "model", kind="not_found_error")  # fmt: skip
        return JSONResponse(self._model())

    @api.get("/v1/metrics")
    async def metrics(self, request: Request) -> JSONResponse:
        """Counters of the replicas that answer (one of each deployment per call)."""
        self._authorize(request)
        llm, grounding = await asyncio.gather(self.llm.stats.remote(), self.grounding.stats.remote())
        return JSONResponse({"llm": llm, "grounding": grounding})

    @api.post("/v1/chat", openapi_extra=openapi_body(ChatBody, "application/json", "multipart/form-data"))
    async def chat(self, request: Request) -> JSONResponse:
        self._authorize(request)
        body = await read_body(request, self.settings.max_body_bytes)
        kind = content_type(request)
        if kind == "application/json":
            chat = parse_chat(parse_json(body), {}, self.settings)
        elif kind == "multipart/form-data":
            chat = parse_chat(*await parse_multipart(request, body, self.settings.max_body_bytes), self.settings)
        elif kind == "application/x-www-form-urlencoded":  # a plain form: text fields, base64 media
            chat = parse_chat(parse_urlencoded(body), {}, self.settings)
        else:
            raise APIError(
                415, f"unsupported content type {kind or 'none'!r}; send application/json or multipart/form-data"
            )
        answer = await self._with_timeout(self._answer(chat))
        return JSONResponse(chat_body(answer))

    @api.post("/v1/chat/completions", openapi_extra=openapi_body(ChatCompletionRequest, "application/json"))
    async def chat_completions(self, request: Request):
        self._authorize(request)
        body = await read_body(request, self.settings.max_body_bytes)
        if content_type(request) != "application/json":
            raise APIError(415, f"unsupported content type {content_type(request) or 'none'!r}; send application/json")
        chat = parse_completion(parse_json(body), self.settings, self.model_name)
        if chat.stream:
            return await self._with_timeout(self._start_stream(chat))
        answer = await self._with_timeout(self._answer(chat))
        return JSONResponse(completion_body(self.model_name, answer))

    def _model(self) -> dict[str, Any]:
        return {"id": self.model_name, "object": "model", "created": 0, "owned_by": "bubogpt"}

    # -- composition -------------------------------------------------------------------------------

    async def _answer(self, chat: ChatRequest) -> Answer:
        """The LLM answer and the image's grounding concurrently, then matching."""
        start = time.perf_counter()
        await self._check_inputs(chat)
        sent = time.perf_counter()
        calls = {"LLM": self.llm.generate.remote(chat)}
        if chat.image is not None:
            calls["Grounding"] = self.grounding.ground.remote(chat.image)
        try:
            results = await asyncio.gather(*(timed(call, sent) for call in calls.values()), return_exceptions=True)
        except asyncio.CancelledError:  # the request timed out or the client left
            for call in calls.values():
                call.cancel()
            raise
        for component, result in zip(calls, results):
            if isinstance(result, BaseException):
                raise api_error_for(result, component) from result
        (completion, llm_ms), (grounding, grounding_ms) = results[0], results[1] if len(results) > 1 else (None, 0.0)
        matching = time.perf_counter()
        spans = await self._match(completion.text, grounding)
        done = time.perf_counter()
        timings = {"llm_ms": llm_ms, "grounding_ms": grounding_ms, "matching_ms": (done - matching) * 1000,
                   "total_ms": (done - start) * 1000}  # fmt: skip
        return Answer(completion, grounding, spans, timings)

    async def _match(self, answer: str, grounding: dict | None) -> list[dict]:
        if not grounding or not grounding["entities"]:
            return []
        try:
            return await self.grounding.match.remote(answer, grounding["entities"])
        except Exception as err:
            raise api_error_for(err, "Grounding") from err

    async def _start_stream(self, chat: ChatRequest) -> StreamingResponse:
        """Checks and the first token happen before the response starts, so their errors are 4xx;
        later failures arrive as an `error` event (the OpenAI client raises it)."""
        deadline = time.monotonic() + self.settings.request_timeout_s
        await self._check_inputs(chat)
        deltas = self.llm.options(stream=True).generate_stream.remote(chat)
        ground_task = None
        if chat.image is not None:
            ground_task = asyncio.ensure_future(self._await(self.grounding.ground.remote(chat.image)))
        try:
            first = await deltas.__anext__()
        except StopAsyncIteration:
            first = None
        except BaseException as err:  # includes the timeout's cancellation
            deltas.cancel()
            if ground_task is not None:
                ground_task.cancel()
            if isinstance(err, Exception):
                raise api_error_for(err, "LLM") from err
            raise
        events = self._events(first, deltas, ground_task, deadline, chat.include_usage)
        return StreamingResponse(events, media_type="text/event-stream")

    async def _events(self, first, deltas, ground_task, deadline: float, include_usage: bool) -> AsyncIterator[bytes]:
        """OpenAI chunks: the role, one chunk per text delta, then finish_reason + usage + grounding,
        and with `include_usage` a last chunk with `choices: []` and the usage."""
        chunk_id, created = completion_id(), int(time.time())

        def chunk(delta: dict, finish_reason: str | None = None, **extra: Any) -> bytes:
            return sse_event(completion_chunk(chunk_id, created, self.model_name, delta, finish_reason, **extra))

        def remaining() -> float:
            return max(0.0, deadline - time.monotonic())

        component = "LLM"
        yield chunk({"role": "assistant", "content": ""})
        try:
            item = first
            while not isinstance(item, Completion):
                yield chunk({"content": item})
                item = await asyncio.wait_for(deltas.__anext__(), remaining())
            component = "Grounding"
            grounding = None if ground_task is None else await asyncio.wait_for(ground_task, remaining())
            answer = Answer(item, grounding, await self._match(item.text, grounding), {})
            yield chunk({}, item.finish_reason, usage=usage(item), grounding=answer.grounding_body(),
                        generation_batch_size=item.batch_size)  # fmt: skip
            if include_usage:
                yield sse_event(usage_chunk(chunk_id, created, self.model_name, item))
            yield sse_event("[DONE]")
        except Exception as err:
            error = err if isinstance(err, APIError) else api_error_for(err, component)
            yield sse_event(error.body())
        finally:  # also when the client goes away: stop the work nobody will read
            deltas.cancel()
            if ground_task is not None and not ground_task.done():
                ground_task.cancel()

    @staticmethod
    async def _await(response):
        return await response

    async def _with_timeout(self, work):
        try:
            return await asyncio.wait_for(work, self.settings.request_timeout_s)
        except asyncio.TimeoutError:
            message = f"the request took longer than {self.settings.request_timeout_s} s"
            raise APIError(504, message, kind="timeout") from None

    # -- checks ------------------------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        if self.token is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.token.encode()):
            raise APIError(401, "missing or invalid bearer token (Authorization: Bearer <key>)",
                           kind="authentication_error", headers={"WWW-Authenticate": "Bearer"})  # fmt: skip

    async def _check_inputs(self, chat: ChatRequest) -> None:
        """Fetch an allow-listed image, decode media within the limits, count prompt tokens."""
        if chat.image_url is not None:
            chat.image = await fetch_image(chat.image_url, self.settings.max_body_bytes,
                                           self.settings.media_fetch_timeout_s)  # fmt: skip
        try:
            self.budget.check(chat, self.settings.max_prompt_tokens)
        except PromptTooLongError as err:
            raise APIError(400, str(err), "messages") from err
        for name, media in (("image", chat.image), ("audio", chat.audio)):
            if media is None or (name, media.sha256) in self.valid_media:
                continue
            try:
                if name == "image":
                    await asyncio.to_thread(decode_image, media.data, self.settings.max_image_pixels)
                else:
                    await asyncio.to_thread(decode_audio, media.data, self.settings.max_audio_seconds)
            except MediaError as err:
                raise APIError(400, f"{name}: {err}", name) from err
            self.valid_media.put((name, media.sha256), True)
