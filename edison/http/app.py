"""The composition root: the routes of both APIs, the page, auth, and the pool's lifespan.

The pool reaches the routes through lifespan state (`request.state.pool`), never a module global.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from edison.http.auth import ApiKeyMiddleware
from edison.http.chat import chat_routes
from edison.http.metrics import metrics_endpoint
from edison.http.models import model_routes
from edison.http.openai import openai_routes
from edison.pool import Models
from edison.settings import REPO_ROOT, Settings

logger = logging.getLogger("edison")

PACKAGE_ROOT = Path(__file__).resolve().parent.parent


def web_dir() -> Path:
    """The chat page: inside the package when installed from a wheel, else the checkout's web/."""
    packaged = PACKAGE_ROOT / "web"
    return packaged if (packaged / "index.html").is_file() else REPO_ROOT / "web"


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return JSONResponse({"error": exc.detail}, status_code=exc.status_code)


async def server_error(request: Request, exc: Exception) -> Response:
    logger.exception("Unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse({"error": "internal server error; see the server log"}, status_code=500)


def create_app(settings: Settings, pool: Models) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        await pool.start()
        try:
            yield {"pool": pool, "settings": settings}
        finally:
            await pool.stop()

    page = web_dir()
    if not (page / "index.html").is_file():
        raise RuntimeError(f"the chat page is missing: no index.html in {page}")
    routes: list[Route | Mount] = [
        *chat_routes(),
        *model_routes(),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        *openai_routes(),
        Mount("/", StaticFiles(directory=page, html=True), name="web"),
    ]
    key = settings.server.api_key
    return Starlette(
        routes=routes,
        middleware=[Middleware(ApiKeyMiddleware, key=key, web_dir=page)] if key else [],
        lifespan=lifespan,
        exception_handlers={HTTPException: http_error, Exception: server_error},
    )
