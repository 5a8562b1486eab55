"""The Open Inference Protocol (KServe V2) over HTTP, JSON and the binary-data extension.

Routes: ``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``, ``GET /v2/models/{name}
[/versions/{v}]``, ``.../ready``, ``POST .../infer``. Tensors: ``server.v2_tensors``.

Binary-data extension: the body is a JSON header of ``Inference-Header-Content-Length`` bytes,
then each input whose ``parameters.binary_data_size`` is set, in order. Outputs asked with
``parameters.binary_data: true`` (or the request's ``binary_data_output: true``) come back the
same way (``binary_data_size`` in the JSON header, bytes after it). Request parameters:
``timeout`` (µs, as Triton's) and ``normalize`` (bool, ours).
"""

from __future__ import annotations

import json

import numpy as np
from aiohttp import web

from simclr_embed.server.core import EmbedOptions, RequestError
from simclr_embed.server.http_app import (
    CONTEXT,
    HttpContext,
    HttpFailure,
    counted,
    deadline_of,
    embed,
    failure_of,
)
from simclr_embed.server.v2_tensors import (
    EXTENSIONS,
    INPUT,
    SERVER_NAME,
    UnknownModel,
    check_model,
    images_from_tensor,
    model_metadata,
    requested_outputs,
    server_version,
)

PROTOCOL = "v2-http"
HEADER_LENGTH = "Inference-Header-Content-Length"


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/v2", server_metadata)
    r.add_get("/v2/health/live", live)
    r.add_get("/v2/health/ready", ready)
    for base in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        r.add_get(base, model)
        r.add_get(base + "/ready", model_ready)
        r.add_post(base + "/infer", counted(PROTOCOL, infer))


async def server_metadata(request: web.Request) -> web.Response:
    return web.json_response(
        {"name": SERVER_NAME, "version": server_version(), "extensions": list(EXTENSIONS)}
    )


async def live(request: web.Request) -> web.Response:
    return web.json_response({"live": True})


async def ready(request: web.Request) -> web.Response:
    path = request.app[CONTEXT].path
    if not path.accepting:  # loading or draining: 503 takes the pod out of the Service
        raise HttpFailure(503, path.refusal)
    return web.json_response({"ready": True})


def _checked(request: web.Request) -> HttpContext:
    ctx = request.app[CONTEXT]
    backend = ctx.path.backend
    try:
        check_model(
            request.match_info["name"],
            request.match_info.get("version", ""),
            ctx.cfg.model_name,
            None if backend is None else backend.info,
        )
    except UnknownModel as exc:
        raise HttpFailure(404, str(exc)) from None
    return ctx


async def model(request: web.Request) -> web.Response:
    ctx = _checked(request)
    if ctx.path.backend is None:
        raise HttpFailure(503, ctx.path.refusal)
    return web.json_response(model_metadata(ctx.path.backend.info, ctx.cfg.model_name))


async def model_ready(request: web.Request) -> web.Response:
    ctx = _checked(request)
    if not ctx.path.accepting:
        raise HttpFailure(503, ctx.path.refusal)
    return web.json_response({"name": ctx.cfg.model_name, "ready": True})


def _parameters(obj: dict[str, object]) -> dict[str, object]:
    params = obj.get("parameters") or {}
    if not isinstance(params, dict):
        raise HttpFailure(400, "'parameters' must be an object")
    return params


async def infer(request: web.Request) -> web.Response:
    ctx = _checked(request)
    raw = await request.read()
    length = request.headers.get(HEADER_LENGTH)
    try:
        split = len(raw) if length is None else int(length)
    except ValueError:
        raise HttpFailure(400, f"{HEADER_LENGTH} must be an integer, got {length!r}") from None
    if not 0 <= split <= len(raw):
        raise HttpFailure(400, f"{HEADER_LENGTH} {split} is outside the body ({len(raw)} bytes)")
    try:
        body = json.loads(raw[:split])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HttpFailure(400, f"the inference header is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise HttpFailure(400, "the inference header must be a JSON object")
    params = _parameters(body)
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise HttpFailure(400, f"expected exactly one input, {INPUT!r}")
    tensor = inputs[0]
    if tensor.get("name") != INPUT:
        raise HttpFailure(400, f"unknown input {tensor.get('name')!r}; this model takes {INPUT!r}")
    binary = memoryview(raw)[split:]
    size = _parameters(tensor).get("binary_data_size")
    data = None
    if size is not None:
        if not isinstance(size, int) or not 0 <= size <= len(binary):
            raise HttpFailure(400, f"binary_data_size {size!r} does not fit the body")
        data = bytes(binary[:size])
    elif "data" not in tensor:
        raise HttpFailure(400, f"input {INPUT!r} has neither 'data' nor binary_data_size")
    wanted = body.get("outputs") or []
    if not isinstance(wanted, list) or not all(isinstance(o, dict) for o in wanted):
        raise HttpFailure(400, "'outputs' must be a list of objects")
    all_binary = bool(params.get("binary_data_output", False))
    as_binary = {o.get("name"): bool(_parameters(o).get("binary_data", all_binary)) for o in wanted}
    timeout_us = params.get("timeout")
    if timeout_us is not None and not isinstance(timeout_us, (int, float)):
        raise HttpFailure(400, "parameter 'timeout' must be microseconds")
    normalize = params.get("normalize", False)
    if not isinstance(normalize, bool):
        raise HttpFailure(400, "parameter 'normalize' must be true or false")
    try:
        outputs = requested_outputs([str(o.get("name")) for o in wanted])
        shape = tensor.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) for d in shape):
            raise HttpFailure(400, f"input {INPUT!r} needs a 'shape' list of integers")
        elements = tensor.get("data")
        if data is None and not isinstance(elements, list):
            raise HttpFailure(400, f"input {INPUT!r} 'data' must be a list")
        images = images_from_tensor(str(tensor.get("datatype")), shape, data, elements)
    except RequestError as exc:
        raise failure_of(exc) from None
    deadline = deadline_of(request, None if timeout_us is None else float(timeout_us) / 1e6)
    answer = await embed(
        ctx,
        images,
        EmbedOptions(output=outputs[0], also=outputs[1:], normalize=normalize, deadline=deadline),
    )
    header: dict[str, object] = {
        "model_name": ctx.cfg.model_name,
        "model_version": answer.model_version,
        "outputs": [],
    }
    if "id" in body:
        header["id"] = body["id"]
    blobs: list[bytes] = []
    for name in outputs:
        vectors = np.ascontiguousarray(answer.matrix(name), dtype="<f4")  # [n, D]
        out: dict[str, object] = {"name": name, "datatype": "FP32", "shape": list(vectors.shape)}
        if as_binary.get(name, all_binary):
            blob = vectors.tobytes()
            out["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            out["data"] = vectors.reshape(-1).tolist()
        header["outputs"].append(out)  # type: ignore[union-attr]
    text = json.dumps(header, separators=(",", ":")).encode()
    if not blobs:
        return web.Response(body=text, content_type="application/json")
    return web.Response(
        body=b"".join([text, *blobs]),
        headers={HEADER_LENGTH: str(len(text)), "Content-Type": "application/octet-stream"},
    )
