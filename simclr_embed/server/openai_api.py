"""OpenAI-style embeddings over HTTP: ``POST /v1/embeddings`` and ``GET /v1/models``.

Request (CONTRACT §4b)::

    {"model": NAME, "input": STR | [STR], "encoding_format": "float" | "base64",
     "dimensions"?: INT, "kind"?: "features" | "projection", "normalize"?: bool}

Each input is a ``data:image/*;base64,...`` URI, bare base64 of an image file, or (with
``--fetch-hosts``) an ``https://`` URL. ``base64`` answers carry little-endian float32 bytes —
what the official ``openai`` SDK asks for by default and decodes. ``dimensions`` must be the
size of one of the model's outputs (features F or projection P) and, without ``kind``, picks
that output: SimCLR vectors are not Matryoshka embeddings, a prefix of one is no smaller
embedding. Vectors are as ``simclr.v1`` answers them: not normalized unless ``normalize``.
"""

from __future__ import annotations

import asyncio
import base64
import time

import numpy as np
from aiohttp import web

from simclr_embed.server.core import OUTPUTS, EmbedOptions, ImageInput, RequestError
from simclr_embed.server.http_app import (
    CONTEXT,
    HttpContext,
    HttpFailure,
    counted,
    deadline_of,
    embed,
    failure_of,
    read_json,
)
from simclr_embed.server.v2_tensors import decode_base64_image

PROTOCOL = "http-openai"
CREATED = int(time.time())


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/embeddings", counted(PROTOCOL, embeddings))
    app.router.add_get("/v1/models", models)


def _model_entry(ctx: HttpContext) -> dict[str, object]:
    return {"id": ctx.cfg.model_name, "object": "model", "created": CREATED, "owned_by": "simclr"}


async def models(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    return web.json_response({"object": "list", "data": [_model_entry(ctx)]})


def _output(body: dict[str, object], ctx: HttpContext) -> str:
    kind, dimensions = body.get("kind"), body.get("dimensions")
    if kind is not None and kind not in OUTPUTS:
        raise HttpFailure(400, f"'kind' must be one of {', '.join(OUTPUTS)}, got {kind!r}")
    if dimensions is None:
        return str(kind or "features")
    backend = ctx.path.backend
    if backend is None:
        raise HttpFailure(503, ctx.path.refusal, "server_error")
    sizes = {"features": backend.info.feature_dim, "projection": backend.info.projection_dim}
    fits = [name for name in ([kind] if kind else OUTPUTS) if sizes[name] == dimensions]
    if not isinstance(dimensions, int) or isinstance(dimensions, bool) or not fits:
        raise HttpFailure(
            400,
            f"'dimensions' {dimensions!r} is not an output size of this model (features "
            f"{sizes['features']}, projection {sizes['projection']}); a prefix of a SimCLR "
            "vector is not a smaller embedding",
        )
    return fits[0]


async def _images(ctx: HttpContext, inputs: list[object]) -> list[ImageInput]:
    """Every input's file bytes; URLs fetched concurrently (``server.fetch``)."""
    out: list[ImageInput] = [None] * len(inputs)
    fetches: dict[int, asyncio.Task[bytes]] = {}
    try:
        for i, item in enumerate(inputs):
            if isinstance(item, str) and item.startswith(("https://", "http://")):
                ctx.fetcher.check(item, i)  # refuse before fetching anything
                fetches[i] = asyncio.ensure_future(ctx.fetcher.fetch(item, i))
            else:
                out[i] = decode_base64_image(item, i)
        for i, task in fetches.items():
            out[i] = await task
    finally:
        for task in fetches.values():
            task.cancel()
    return out


async def embeddings(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    body = await read_json(request)
    if body.get("model") != ctx.cfg.model_name:
        raise HttpFailure(
            404,
            f"model {body.get('model')!r} not found: this server serves {ctx.cfg.model_name!r}",
        )
    inputs = body.get("input")
    if isinstance(inputs, str):
        inputs = [inputs]
    if not isinstance(inputs, list) or not inputs:
        raise HttpFailure(400, "'input' must be an image string or a non-empty list of them")
    fmt = body.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise HttpFailure(400, f"'encoding_format' must be 'float' or 'base64', got {fmt!r}")
    normalize = body.get("normalize", False)
    if not isinstance(normalize, bool):
        raise HttpFailure(400, "'normalize' must be true or false")
    output = _output(body, ctx)
    seconds = body.get("timeout")  # an extension, like the Request-Timeout header
    if seconds is not None and not isinstance(seconds, (int, float)):
        raise HttpFailure(400, "'timeout' must be seconds")
    deadline = deadline_of(request, seconds)
    limit = ctx.cfg.max_request_images
    if len(inputs) > limit:
        raise HttpFailure(400, f"{len(inputs)} inputs, at most {limit} per request")
    try:
        images = await _images(ctx, inputs)
    except RequestError as exc:
        raise failure_of(exc) from None
    answer = await embed(
        ctx, images, EmbedOptions(output=output, normalize=normalize, deadline=deadline)
    )
    vectors = np.ascontiguousarray(answer.vectors, dtype="<f4")  # [n, D]
    if fmt == "base64":
        data = [base64.b64encode(row.tobytes()).decode("ascii") for row in vectors]
    else:
        data = vectors.tolist()
    return web.json_response(
        {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": vector}
                for i, vector in enumerate(data)
            ],
            "model": ctx.cfg.model_name,
            "usage": {"prompt_tokens": 0, "total_tokens": 0},
        },
        headers={"simclr-model-version": answer.model_version},
    )
