"""The one error policy of both APIs: what a client is told, in which shape, with which status.

- `ApiError` is every refusal a route decides on (a bad body, an unknown model, a full queue);
  it renders as `{"error": "..."}` on Edison's own routes and in OpenAI's nested shape on /v1.
- A pool `Failure` maps to an `ApiError` by its kind, never by its text.
- `answering` wraps a route: a client gone while sending its body gets nothing (499 in the
  access log, no traceback), and anything unexpected is a logged 500, never a raw traceback.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from edison.pool import Failure, Unavailable, UnknownModel
from edison.pool.models import Busy
from edison.protocol import FailureKind

logger = logging.getLogger("edison")

CLIENT_GONE = 499  # nginx's code for "the client closed the connection": never actually sent


class ApiError(Exception):
    def __init__(
        self,
        message: str,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.kind = message, status, param, code, kind
        self.extra: dict[str, Any] = {}  # more fields on Edison's own routes: the models available, for a 404

    def body(self, openai: bool) -> dict[str, Any]:
        if not openai:
            return {"error": self.message, **self.extra}
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self, openai: bool, request_id: str | None = None) -> JSONResponse:
        headers = {"X-Request-ID": request_id} if request_id else None
        return JSONResponse(self.body(openai), status_code=self.status, headers=headers)


class BadRequest(ApiError):
    """A body that cannot be read or does not say what it must (400, 413, 415)."""

    def __init__(self, message: str, status: int = 400, param: str | None = None) -> None:
        code = "request_too_large" if status == 413 else None
        super().__init__(message, status, param=param, code=code)


_FAILURES: dict[FailureKind, tuple[int, str, str]] = {
    FailureKind.PROMPT_TOO_LONG: (400, "context_length_exceeded", "invalid_request_error"),
    FailureKind.BAD_PROMPT: (400, "invalid_prompt", "invalid_request_error"),
    FailureKind.BAD_FORMAT: (400, "invalid_format", "invalid_request_error"),
    FailureKind.QUEUE_FULL: (503, "queue_full", "server_error"),
    FailureKind.MODELS_BUSY: (503, "models_busy", "server_error"),
    FailureKind.SHUTTING_DOWN: (503, "shutting_down", "server_error"),
    FailureKind.NO_WORKERS: (503, "unavailable", "server_error"),
    FailureKind.WORKER_DIED: (500, "worker_died", "server_error"),
    FailureKind.GENERATION_FAILED: (500, "generation_failed", "server_error"),
}


def failure_error(kind: FailureKind, message: str, param: str | None = None) -> ApiError:
    status, code, error_type = _FAILURES[kind]
    return ApiError(message, status, param if status == 400 else None, code, error_type)


def from_failure(failure: Failure, param: str | None = None) -> ApiError:
    return failure_error(failure.kind, failure.error, param)


def from_unavailable(exc: Unavailable) -> ApiError:
    return failure_error(exc.kind, str(exc))


def unknown_model(exc: UnknownModel) -> ApiError:
    error = ApiError(str(exc), 404, param="model", code="model_not_found")
    error.extra = {"available": exc.available}
    return error


Handler = Callable[[Request, str], Awaitable[Response]]


def answering(handler: Handler, openai: bool) -> Callable[[Request], Awaitable[Response]]:
    """Gives each request its uuid4 id and answers every error in the API's own shape."""

    async def endpoint(request: Request) -> Response:
        request_id = str(uuid.uuid4())
        try:
            return await handler(request, request_id)
        except ApiError as exc:
            error = exc
        except Unavailable as exc:
            error = from_unavailable(exc)
        except UnknownModel as exc:
            error = unknown_model(exc)
        except Busy as exc:
            error = ApiError(str(exc), 409, code="model_busy", kind="server_error")
        except ClientDisconnect:  # gone while sending its body: nobody to answer
            return Response(status_code=CLIENT_GONE)
        except Exception:
            logger.exception("Unhandled error on %s %s (request %s)", request.method, request.url.path, request_id)
            error = ApiError("internal server error; see the server log", 500, kind="server_error")
        return error.response(openai, request_id if openai else None)  # OpenAI answers carry their id

    return endpoint
