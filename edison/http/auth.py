"""The optional API key: a pure ASGI middleware in front of every route.

With `[server] api_key` (or EDISON_API_KEY, which wins) set, every request needs
`Authorization: Bearer <key>`, except `GET /health` (for probes) and the chat page's own
static files (`/`, `/index.html`, anything that is a file under web/), which hold no data and
must load before the page can ask for the key. The key is compared with
`hmac.compare_digest`, so the time taken says nothing about how much of a guess was right.
A refusal is 401 JSON: `{"error": "..."}`, or the OpenAI error shape under /v1/.

Pure ASGI rather than `BaseHTTPMiddleware`, which would sit between the app and the
client's `http.disconnect` message that cancels a stream (see sse.py).
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
from pathlib import Path

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

logger = logging.getLogger("edison")

PUBLIC_PATHS = ("/health",)


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, key: str, web_dir: Path) -> None:
        self.app = app
        self.key = key.encode()
        self.web_dir = os.path.realpath(web_dir)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):  # lifespan
            await self.app(scope, receive, send)
            return
        token = presented_key(scope)
        if (token is not None and hmac.compare_digest(token, self.key)) or self.is_public(scope):
            await self.app(scope, receive, send)
            return
        reason = "missing API key: send the header 'Authorization: Bearer <key>'" if token is None else "invalid API key"
        client = scope.get("client") or ("?", 0)
        logger.warning("Refused %s %s from %s: %s", scope.get("method", "WEBSOCKET"), scope["path"], client[0], reason)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await refusal(scope["path"], reason)(scope, receive, send)

    def is_public(self, scope: Scope) -> bool:
        path: str = scope["path"]
        if path in PUBLIC_PATHS:
            return True
        if scope.get("method") not in ("GET", "HEAD"):
            return False
        relative = path.lstrip("/") + ("index.html" if path.endswith("/") else "")
        target = os.path.realpath(os.path.join(self.web_dir, relative))
        return target.startswith(self.web_dir + os.sep) and os.path.isfile(target)


def presented_key(scope: Scope) -> bytes | None:
    """The bearer token of the request, or None if it sent no `Authorization: Bearer` header."""
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" else None
    return None


def refusal(path: str, reason: str) -> JSONResponse:
    if path.startswith("/v1/"):  # OpenAI clients read this shape
        body: dict = {"error": {"message": reason, "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}
    else:
        body = {"error": reason}
    return JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})


def exposure_warning(host: str, api_key: str) -> str | None:
    """A warning when the service listens beyond loopback with no key, else None."""
    if api_key or _is_loopback(host):
        return None
    return (
        f"Listening on {host or 'every interface'} without an API key: anyone who can reach this port can "
        "use the model. Set [server] api_key or EDISON_API_KEY, or bind 127.0.0.1 (see docs/operations.md)"
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost: it may resolve to anything
        return False
