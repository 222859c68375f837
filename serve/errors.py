"""Errors the HTTP API returns, and how failures map to them.

Every error a client sees has OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`,
which the official client turns into an exception carrying the message. `APIError` is raised
anywhere a request is refused; `api_error_for` maps what a deployment call raised; `install`
registers the FastAPI handlers that write them out.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from starlette.exceptions import HTTPException as StarletteHTTPException

from bubogpt.modeling_bubogpt import PromptTooLongError
from bubogpt.preprocess import AudioDecodeError, ImageDecodeError, MediaError

logger = logging.getLogger("ray.serve")

RETRY_AFTER_S = 1  # what 503 responses tell clients


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

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class ReplicaUnhealthyError(RuntimeError):
    """A replica that fails its health check (Serve is replacing it) was asked to work."""


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)


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
    if isinstance(cause, (RayActorError, DeploymentUnavailableError, ReplicaUnhealthyError)):  # e.g. it died
        return APIError(503, f"the {component} replica failed while handling the request; retry",
                        kind="service_unavailable", headers={"Retry-After": str(RETRY_AFTER_S)})  # fmt: skip
    if isinstance(cause, (asyncio.TimeoutError, TimeoutError)):
        return APIError(504, f"the request took longer than the server's timeout ({component})", kind="timeout")
    logger.error("unexpected %s failure: %r", component, err)
    return APIError(500, f"internal error in the {component} deployment", kind="server_error")


def install(api: FastAPI) -> None:
    """Every error the app can raise leaves as the JSON shape above (never HTML, never a traceback)."""

    @api.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError) -> JSONResponse:
        return err.response()

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return APIError(err.status_code, f"{request.method} {request.url.path}: {err.detail}", kind=kind).response()

    @api.exception_handler(Exception)
    async def _internal_error(request: Request, err: Exception) -> JSONResponse:
        logger.exception("unexpected error handling %s %s", request.method, request.url.path)
        return APIError(500, "internal server error", kind="server_error").response()
