"""The models' routes: `GET /models`, `POST /models/load`, `POST /models/unload` (README "Models").

What the page's model picker and `edison models` read and ask; `/v1/models` lists the same
models in OpenAI's shape (openai.py).
"""

from __future__ import annotations

import logging

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from edison.http.errors import BadRequest, answering
from edison.http.validation import read_json_object, reject_unknown
from edison.pool import Models

logger = logging.getLogger("edison")


def model_routes() -> list[Route]:
    return [
        Route("/models", answering(list_models, openai=False), methods=["GET"]),
        Route("/models/load", answering(load_model, openai=False), methods=["POST"]),
        Route("/models/unload", answering(unload_model, openai=False), methods=["POST"]),
    ]


async def list_models(request: Request, request_id: str) -> Response:
    pool: Models = request.state.pool
    return JSONResponse(pool.listing())


async def _named(request: Request) -> str:
    data = await read_json_object(request, request.state.settings.server.max_body_bytes)
    reject_unknown(data, ("model",))
    name = data.get("model")
    if not isinstance(name, str) or not name:
        raise BadRequest("'model' is required and must be a non-empty string", param="model")
    return name


async def load_model(request: Request, request_id: str) -> Response:
    """Answers once the model is ready (a client that leaves first does not stop the load:
    it asked for a loaded model, not for a reply)."""
    pool: Models = request.state.pool
    name = await _named(request)
    pool.entry(name)  # an unknown model is a 404 before anything starts
    logger.info("Load of model %s asked for (request %s)", name, request_id)
    return JSONResponse(await pool.load(name))


async def unload_model(request: Request, request_id: str) -> Response:
    pool: Models = request.state.pool
    name = await _named(request)
    logger.info("Unload of model %s asked for (request %s)", name, request_id)
    return JSONResponse(await pool.unload(name))
