"""The Ray Serve application: an LLM deployment, a grounding deployment, and an HTTP ingress.

    client --HTTP--> Ingress (FastAPI)
                       1. read the body (size limit), parse it into a ChatRequest, check auth, limits
                          and that the media decode (4xx JSON errors that name the problem)
                       2. concurrently:  LLM.generate(chat)          encoders (cached by content hash)
                                                                      + batched generate (@serve.batch,
                                                                      merged by one GenerationWorker)
                                         Grounding.ground(image)     tags -> boxes -> masks, batched,
                                                                      cached by content hash
                       3. Grounding.match(answer, entities) -> answer spans
                       4. the response (JSON, or server-sent events for `stream: true`)

The deployments are plain classes; the ingress receives their `DeploymentHandle`s as constructor
arguments, and the app is a `.bind()` tree (`build_app`, the import path in serve/config.yaml). The
API is stateless: clients send the whole conversation; the caches make a multi-turn chat about one
image cost one image encoding and one grounding.
"""

# No `from __future__ import annotations`: FastAPI reads the route methods' `Request` annotations
# through Serve's ingress wrapper, which needs them evaluated.

import asyncio
import base64
import dataclasses
import hmac
import io
import json
import logging
import math
import os
import time
import urllib.parse
from collections import Counter
from pathlib import Path
from typing import Any, AsyncIterator

import torch
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from bubogpt.checkpoints.native import load_model, read_config
from bubogpt.config import BuboGPTConfig
from bubogpt.llm import load_tokenizer
from bubogpt.modeling_bubogpt import PromptTooLongError
from bubogpt.preprocess import AudioDecodeError, ImageDecodeError, MediaError, decode_audio, decode_image

from serve.cache import LRUCache
from serve.generation import (
    GenerationJob,
    GenerationWorker,
    Sampling,
    check_prompt_budget,
    count_prompt_tokens,
    encode_audio,
    encode_image,
    query_token_counts,
)
from serve.protocol import (
    Answer,
    APIError,
    ChatRequest,
    Completion,
    Media,
    chat_body,
    completion_body,
    completion_chunk,
    completion_id,
    parse_chat,
    parse_completion,
    sse_event,
    usage,
)
from serve.settings import ServeSettings

logger = logging.getLogger("ray.serve")

DTYPES = {"auto": None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
RETRY_AFTER_S = 1


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def replica_identity() -> dict[str, Any]:
    """Which replica answered: tests compare these before and after to detect restarts."""
    context = serve.get_replica_context()
    return {"deployment": context.deployment, "replica_id": context.replica_id.unique_id, "pid": os.getpid()}


# ==================================================================================================
# LLM: encoders + joiner + language model
# ==================================================================================================


@serve.deployment(
    name="LLM",
    max_ongoing_requests=32,  # >= batch size x concurrent batches: arrivals wait here for the next batch
    max_queued_requests=64,
    backpressure_config={"status_code": 503, "retry_after_s": RETRY_AFTER_S},
    health_check_period_s=5,
    ray_actor_options={"num_cpus": 1},
)
class LLMDeployment:
    def __init__(self, settings: dict):
        self.settings = ServeSettings.from_dict(settings)
        torch.set_num_threads(self.settings.torch_threads)
        device = resolve_device(self.settings.device)
        # dtype "auto": the model's frozen_dtype on this device (bf16 LLM and encoders for 7b/13b on a GPU).
        model = load_model(self.settings.model_dir, dtype=DTYPES[self.settings.dtype], device=device)
        self.model = model.to(device=device, dtype=DTYPES[self.settings.dtype]).eval()
        self.query_tokens = query_token_counts(self.model.config)
        self.encoder_cache = LRUCache(self.settings.encoder_cache_entries)
        self._generate_batch.set_max_batch_size(self.settings.llm_max_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(self.settings.llm_batch_wait_s)
        self.worker = GenerationWorker(self.model, self.settings.llm_max_batch_size, self.settings.torch_threads)
        self.requests = 0

    async def ping(self) -> dict[str, Any]:
        return replica_identity()

    async def stats(self) -> dict[str, Any]:
        generate_calls = Counter(self.worker.calls)
        calls = sum(generate_calls.values())
        rows = sum(size * n for size, n in generate_calls.items())
        return {
            **replica_identity(),
            "requests": self.requests,
            "generate_calls": calls,
            "mean_batch_size": rows / calls if calls else 0.0,
            "batch_size_histogram": dict(sorted(generate_calls.items())),
            "encoder_cache": self.encoder_cache.stats(),
        }

    async def generate(self, chat: ChatRequest) -> Completion:
        """The whole answer at once (the same batches as streaming requests)."""
        completion = None
        async for item in self.generate_stream(chat):
            if isinstance(item, Completion):
                completion = item
        return completion

    async def generate_stream(self, chat: ChatRequest) -> AsyncIterator[str | Completion]:
        """Text deltas as they are generated, then the `Completion`."""
        job, cache_report, encode_ms = await self._prepare(chat)
        self.requests += 1
        queued = time.perf_counter()
        first_token_ms = None
        async for event in self._generate_batch(job):
            if event is None:
                continue
            first_token_ms = first_token_ms or (time.perf_counter() - queued) * 1000
            if event.delta:
                yield event.delta
            if event.done:
                yield Completion(
                    text=event.text,
                    finish_reason=event.finish_reason,
                    prompt_tokens=job.prompt_tokens,
                    completion_tokens=event.completion_tokens,
                    batch_size=event.batch_size,
                    encoder_cache=cache_report,
                    encode_ms=encode_ms,
                    first_token_ms=first_token_ms,
                    generate_ms=(time.perf_counter() - queued) * 1000,
                )

    async def _prepare(self, chat: ChatRequest) -> tuple[GenerationJob, dict[str, str], float]:
        """Everything that can fail for one request alone happens here, before it joins a batch."""
        prompt = chat.conversation().render()
        prompt_tokens = count_prompt_tokens(self.model.tokenizer, self.query_tokens, prompt)
        check_prompt_budget(
            prompt_tokens, chat.max_new_tokens, self.settings.max_prompt_tokens, self.model.config.max_context_tokens
        )
        start = time.perf_counter()
        vision, audio, report = await asyncio.to_thread(self._encoder_tokens, chat)
        job = GenerationJob(
            prompt=prompt,
            prompt_tokens=prompt_tokens,
            max_new_tokens=chat.max_new_tokens,
            sampling=Sampling.of(chat),
            vision_tokens=vision,
            audio_tokens=audio,
        )
        return job, report, (time.perf_counter() - start) * 1000

    def _encoder_tokens(self, chat: ChatRequest):
        """Frozen-encoder outputs for the request's media, from the cache when seen before."""
        tokens, report = {}, {}
        for modality, media, encode, limit in (
            ("vision", chat.image, encode_image, self.settings.max_image_pixels),
            ("audio", chat.audio, encode_audio, self.settings.max_audio_seconds),
        ):
            if media is None:
                continue
            cached = self.encoder_cache.get((modality, media.sha256))
            report[modality] = "hit" if cached is not None else "miss"
            if cached is None:
                cached = encode(self.model, media.data, limit)  # (1, T, width)
                self.encoder_cache.put((modality, media.sha256), cached)
            tokens[modality] = cached
        return tokens.get("vision"), tokens.get("audio"), report

    # Up to 4 batches at once: while the model generates, the batches Serve forms wait in the
    # GenerationWorker, which merges them into its next call (see its docstring).
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05, max_concurrent_batches=4)
    async def _generate_batch(self, jobs: list[GenerationJob]) -> AsyncIterator[list]:
        """One list per generation step: a `RowEvent` (or None) per request; StopIteration ends one."""
        loop = asyncio.get_running_loop()
        steps: asyncio.Queue = asyncio.Queue()
        self.worker.submit(jobs, lambda item: loop.call_soon_threadsafe(steps.put_nowait, item))
        finished = [False] * len(jobs)
        while (item := await steps.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            results = []
            for i, event in enumerate(item):
                results.append(StopIteration if finished[i] else event)
                finished[i] = finished[i] or (event is not None and event.done)
            yield results


# ==================================================================================================
# Grounding: tagger + detector + segmenter, and the entity matcher
# ==================================================================================================


class Grounder:
    """The one place that calls into `bubogpt.grounding`: load the pipeline, ground images, match
    answers, draw the annotated image. Entities and spans leave it as JSON-ready dicts."""

    def __init__(self, grounding_dir: str | None, device: torch.device):
        from bubogpt.grounding.pipeline import load_grounding

        # The deterministic matcher (RuleMatcher): no second LLM in the grounding replica. The tiny
        # assets (None), a tiny-layout folder, a `bubogpt convert-grounding` folder or the released files.
        self.pipeline = load_grounding(grounding_dir)
        for module in (self.pipeline.tagger.model, self.pipeline.detector.model, self.pipeline.segmenter.sam):
            module.to(device)  # each component runs where its parameters are

    def ground(self, images: list) -> list[tuple[list[dict], bytes]]:
        """RGB PIL images -> per image: (entities as dicts, annotated PNG bytes)."""
        from bubogpt.grounding.result import annotate_image

        results = []
        for image, entities in zip(images, self.pipeline.ground_images(images)):
            png = io.BytesIO()
            annotate_image(image, entities).save(png, format="PNG")
            results.append(([dataclasses.asdict(entity) for entity in entities], png.getvalue()))
        return results

    def match(self, answer: str, entities: list[dict]) -> list[dict]:
        from bubogpt.grounding.result import Entity

        spans = self.pipeline.match(answer, [Entity(**entity) for entity in entities])
        return [dataclasses.asdict(span) for span in spans]


@serve.deployment(
    name="Grounding",
    max_ongoing_requests=16,
    max_queued_requests=64,
    backpressure_config={"status_code": 503, "retry_after_s": RETRY_AFTER_S},
    health_check_period_s=5,
    ray_actor_options={"num_cpus": 1},
)
class GroundingDeployment:
    def __init__(self, settings: dict):
        self.settings = ServeSettings.from_dict(settings)
        torch.set_num_threads(self.settings.torch_threads)
        self.grounder = Grounder(self.settings.grounding_dir, resolve_device(self.settings.device))
        self.cache = LRUCache(self.settings.grounding_cache_entries)
        self._ground_batch.set_max_batch_size(self.settings.grounding_max_batch_size)
        self._ground_batch.set_batch_wait_timeout_s(self.settings.grounding_batch_wait_s)
        self.batch_sizes: Counter[int] = Counter()

    async def ping(self) -> dict[str, Any]:
        return replica_identity()

    async def stats(self) -> dict[str, Any]:
        return {**replica_identity(), "batch_size_histogram": dict(sorted(self.batch_sizes.items())),
                "cache": self.cache.stats()}  # fmt: skip

    async def ground(self, image: Media) -> dict[str, Any]:
        """{"entities": [...], "annotated_image": base64 PNG, "cache": "hit"|"miss", "batch_size": n}."""
        cached = self.cache.get(image.sha256)
        if cached is not None:
            return {**cached, "cache": "hit"}
        pixels = await asyncio.to_thread(decode_image, image.data, self.settings.max_image_pixels)
        result = await self._ground_batch(pixels)
        if isinstance(result, ValueError):  # an image the grounding models cannot use: the client's 400
            raise ImageDecodeError(f"grounding cannot use this image: {result}")
        if isinstance(result, Exception):
            raise result
        self.cache.put(image.sha256, result)
        return {**result, "cache": "miss"}

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.02)
    async def _ground_batch(self, images: list) -> list[dict[str, Any] | Exception]:
        self.batch_sizes[len(images)] += 1
        return await asyncio.to_thread(self._ground_each, images)

    def _ground_each(self, images: list) -> list[dict[str, Any] | Exception]:
        """The batch at once; if that fails, image by image, so one bad image fails only its request."""
        try:
            grounded = self.grounder.ground(images)
        except Exception as err:
            if len(images) == 1:
                return [err]
            grounded = []
            for image in images:
                try:
                    grounded += self.grounder.ground([image])
                except Exception as one_err:
                    grounded.append(one_err)
        return [
            result if isinstance(result, Exception) else
            {"entities": result[0], "annotated_image": base64.b64encode(result[1]).decode(), "batch_size": len(images)}
            for result in grounded
        ]  # fmt: skip

    async def match(self, answer: str, entities: list[dict]) -> list[dict]:
        if not entities or not answer:
            return []
        return await asyncio.to_thread(self.grounder.match, answer, entities)


# ==================================================================================================
# Ingress: the HTTP API
# ==================================================================================================

api = FastAPI(title="BuboGPT", description="Text + image + audio chat with visual grounding.")
STATIC_DIR = Path(__file__).with_name("static")  # the chat page (index.html, app.js, style.css)
api.mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static")


@api.exception_handler(APIError)
async def _api_error(request: Request, err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
    error = APIError(err.status_code, f"{request.method} {request.url.path}: {err.detail}", kind=kind)
    return JSONResponse(error.body(), status_code=err.status_code)


@api.exception_handler(Exception)
async def _internal_error(request: Request, err: Exception) -> JSONResponse:
    logger.exception("unexpected error handling %s %s", request.method, request.url.path)
    return JSONResponse(APIError(500, "internal server error", kind="server_error").body(), status_code=500)


def original_exception(err: BaseException) -> BaseException:
    """The exception a deployment raised, without Ray's wrapper."""
    return err.cause if isinstance(err, RayTaskError) and err.cause is not None else err


def api_error_for(err: BaseException, component: str) -> APIError:
    """Known failures of a deployment call -> the HTTP error a client sees."""
    cause = original_exception(err)
    if isinstance(cause, APIError):
        return cause
    if isinstance(cause, ImageDecodeError):
        return APIError(400, str(cause), "image")
    if isinstance(cause, AudioDecodeError):
        return APIError(400, str(cause), "audio")
    if isinstance(cause, MediaError):
        return APIError(400, str(cause))
    if isinstance(cause, PromptTooLongError):
        return APIError(400, str(cause), "messages")
    if isinstance(cause, BackPressureError):  # the deployment's max_queued_requests is reached
        retry = {"Retry-After": str(max(1, math.ceil(cause.retry_after_s or RETRY_AFTER_S)))}
        message = f"the {component} deployment is at capacity; retry later"
        return APIError(503, message, kind="overloaded", headers=retry)
    if isinstance(cause, (RayActorError, DeploymentUnavailableError)):  # e.g. its process died mid-request
        return APIError(503, f"the {component} replica failed while handling the request; retry",
                        kind="service_unavailable", headers={"Retry-After": str(RETRY_AFTER_S)})  # fmt: skip
    if isinstance(cause, (asyncio.TimeoutError, TimeoutError)):
        return APIError(504, f"the request took longer than the server's timeout ({component})", kind="timeout")
    logger.error("unexpected %s failure: %r", component, err)
    return APIError(500, f"internal error in the {component} deployment", kind="server_error")


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
    async def stream():
        yield body

    try:
        form = await MultiPartParser(request.headers, stream(), max_files=2, max_fields=8, max_part_size=limit).parse()
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


def content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def timed(response, start: float) -> tuple[Any, float]:
    """Await a deployment response; also return milliseconds since `start` (when it was sent)."""
    result = await response
    return result, (time.perf_counter() - start) * 1000


class PromptBudget:
    """Counts prompt tokens in the ingress, so an over-long prompt is refused before any work."""

    def __init__(self, model_dir: str):
        self.config = BuboGPTConfig.from_dict(read_config(model_dir))
        self.tokenizer = load_tokenizer(self.config.llm.path or str(Path(model_dir) / "llm"))
        self.query_tokens = query_token_counts(self.config)

    def check(self, chat: ChatRequest, max_prompt_tokens: int) -> int:
        tokens = count_prompt_tokens(self.tokenizer, self.query_tokens, chat.conversation().render())
        check_prompt_budget(tokens, chat.max_new_tokens, max_prompt_tokens, self.config.max_context_tokens)
        return tokens


@serve.deployment(
    name="Ingress",
    max_ongoing_requests=64,
    max_queued_requests=128,
    backpressure_config={"status_code": 503, "retry_after_s": RETRY_AFTER_S},
    health_check_period_s=5,
    ray_actor_options={"num_cpus": 0.25},
)
@serve.ingress(api)
class ChatIngress:
    def __init__(self, llm: DeploymentHandle, grounding: DeploymentHandle, settings: dict):
        self.llm = llm
        self.grounding = grounding
        self.settings = ServeSettings.from_dict(settings)
        self.token = self.settings.bearer_token()
        self.budget = PromptBudget(self.settings.model_dir)
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
        model = {"id": self.model_name, "object": "model", "created": 0, "owned_by": "bubogpt"}
        return JSONResponse({"object": "list", "data": [model]})

    @api.get("/v1/metrics")
    async def metrics(self, request: Request) -> JSONResponse:
        """Counters of the replicas that answer (one of each deployment per call)."""
        self._authorize(request)
        llm, grounding = await asyncio.gather(self.llm.stats.remote(), self.grounding.stats.remote())
        return JSONResponse({"llm": llm, "grounding": grounding})

    @api.post("/v1/chat")
    async def chat(self, request: Request) -> JSONResponse:
        self._authorize(request)
        body = await read_body(request, self.settings.max_body_bytes)
        kind = content_type(request)
        if kind == "application/json":
            fields = parse_json(body)
            if not isinstance(fields, dict):
                raise APIError(400, "the request body must be a JSON object")
            chat = parse_chat(fields, {}, self.settings)
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

    @api.post("/v1/chat/completions")
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
        events = self._events(first, deltas, ground_task, deadline)
        return StreamingResponse(events, media_type="text/event-stream")

    async def _events(self, first, deltas, ground_task, deadline: float) -> AsyncIterator[bytes]:
        """OpenAI chunks: the role, one chunk per text delta, then finish_reason + usage + grounding."""
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
            chat.image = await self._fetch(chat.image_url)
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

    async def _fetch(self, url: str) -> Media:
        """GET an allow-listed URL: no redirects, size and time limits."""
        import httpx

        limit = self.settings.max_body_bytes
        try:
            async with httpx.AsyncClient(follow_redirects=False, timeout=self.settings.media_fetch_timeout_s) as client:
                async with client.stream("GET", url) as response:
                    if response.status_code != 200:
                        message = f"fetching image_url {url} failed: HTTP {response.status_code}"
                        raise APIError(400, message, "image_url")
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


# ==================================================================================================
# The application
# ==================================================================================================


def compose(settings: ServeSettings, deployment_options: dict[str, dict] | None = None):
    """The `.bind()` tree; `deployment_options` overrides per deployment name (LLM, Grounding, Ingress)."""
    options = deployment_options or {}
    args = settings.to_dict()
    llm = LLMDeployment.options(**options.get("LLM", {})).bind(args)
    grounding = GroundingDeployment.options(**options.get("Grounding", {})).bind(args)
    return ChatIngress.options(**options.get("Ingress", {})).bind(llm, grounding, args)


def build_app(args: dict[str, Any]):
    """Import path for `serve run` / `serve deploy` (serve/config.yaml): `args` are ServeSettings."""
    return compose(ServeSettings.from_dict(dict(args)))
