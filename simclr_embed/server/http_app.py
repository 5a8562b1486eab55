"""``simclr serve --http-port``: an aiohttp server on the gRPC server's event loop, adapting the
OpenAI-style (``server.openai_api``) and Open Inference Protocol (``server.v2_http``) routes to
the one request path (``server.core``) — same admission, drain, batcher and model as gRPC.

aiohttp, not Starlette on uvicorn: uvicorn's ``Server.serve`` installs its own SIGTERM/SIGINT
handlers (the server's drain owns those), aiohttp's ``AppRunner`` runs inside a running loop as
it is, and its client fetches ``--fetch-hosts`` images with a resolver hook (``server.fetch``).
Starlette answered 1.07-1.36x the requests/s of aiohttp with no model behind either
(bench/http_frameworks.py); the gap is under 0.05 ms a request, against ≥ 1 ms of decode and
model call for a real one.

Errors: the core's typed errors → 400 / 429 / 503 / 504 (+ ``Retry-After`` where a retry helps),
401 without the token, 413 over ``--max-message-mb``, 404 for another model; the body is an
OpenAI error object under ``/v1/`` and V2's ``{"error": "..."}`` elsewhere. Every call on an
embedding route is counted in ``simclr_requests_total{code,protocol}`` under the gRPC name of
its outcome.
"""

from __future__ import annotations

import asyncio
import contextvars
import hmac
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from aiohttp import web

from simclr_embed import tracing
from simclr_embed.server.config import ServeConfig
from simclr_embed.server.core import (
    Answer,
    EmbedOptions,
    ImageInput,
    RequestError,
    RequestPath,
)
from simclr_embed.server.fetch import Fetcher
from simclr_embed.server.metrics import Metrics

log = logging.getLogger(__name__)

HTTP_STATUS = {"invalid": 400, "overloaded": 429, "deadline": 504, "unavailable": 503}
CODE_OF_HTTP = {
    200: "OK",
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    404: "NOT_FOUND",
    413: "RESOURCE_EXHAUSTED",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
RETRY_AFTER_S = "1"
TIMEOUT_HEADER = "Request-Timeout"  # seconds; the HTTP counterpart of gRPC's deadline
PUBLIC_PATHS = ("/v2/health/", "/metrics")  # probes and scrapers come without credentials

# Images answered by the current call (set by :func:`embed`, read by the middleware's count).
ANSWERED: contextvars.ContextVar[int] = contextvars.ContextVar("answered", default=0)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PROTOCOL = web.AppKey("protocol", str)


class HttpFailure(Exception):
    """Ends an HTTP call with ``status``; ``kind`` is the OpenAI error ``type``."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


@dataclass
class HttpContext:
    """What every HTTP handler needs."""

    cfg: ServeConfig
    path: RequestPath
    metrics: Metrics
    fetcher: Fetcher


CONTEXT = web.AppKey("context", HttpContext)


def failure_of(exc: RequestError) -> HttpFailure:
    status = HTTP_STATUS.get(exc.status, 500)
    kind = {400: "invalid_request_error", 429: "rate_limit_error"}.get(status, "server_error")
    return HttpFailure(status, exc.message, kind)


def deadline_of(request: web.Request, seconds: float | None = None) -> float | None:
    """The loop-clock deadline from ``Request-Timeout`` (or the protocol's own ``seconds``)."""
    header = request.headers.get(TIMEOUT_HEADER)
    if header is not None:
        try:
            seconds = float(header)
        except ValueError:
            raise HttpFailure(400, f"{TIMEOUT_HEADER} must be seconds, got {header!r}") from None
    if seconds is None:
        return None
    if not seconds > 0:
        raise HttpFailure(400, f"a timeout must be > 0 s, got {seconds}")
    return asyncio.get_running_loop().time() + seconds


async def embed(ctx: HttpContext, images: Sequence[ImageInput], opts: EmbedOptions) -> Answer:
    """Admission + :meth:`RequestPath.embed`; typed errors → :class:`HttpFailure`."""
    if not ctx.path.enter():
        raise HttpFailure(503, ctx.path.refusal, "server_error")
    try:
        # gRPC cancels a call at its deadline; HTTP has no such thing, so the wait is cut here
        # (cancelling the wait frees its queue space, as a cancelled gRPC call does).
        work = ctx.path.embed(images, opts)
        if opts.deadline is None:
            answer = await work
        else:
            left = opts.deadline - asyncio.get_running_loop().time()
            answer = await asyncio.wait_for(work, max(0.0, left))
    except RequestError as exc:
        raise failure_of(exc) from None
    except asyncio.TimeoutError:
        raise HttpFailure(
            504, "deadline passed before the answer was ready", "server_error"
        ) from None
    finally:
        ctx.path.leave()
    ANSWERED.set(answer.n - len(answer.bad))
    return answer


async def read_json(request: web.Request) -> dict[str, object]:
    try:
        body = json.loads(await request.read())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HttpFailure(400, f"the body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise HttpFailure(400, "the body must be a JSON object")
    return body


def _error_body(request: web.Request, failure: HttpFailure) -> dict[str, object]:
    if request.path.startswith("/v1/"):  # the OpenAI error object
        code = CODE_OF_HTTP.get(failure.status, "INTERNAL").lower()
        return {
            "error": {"message": failure.message, "type": failure.kind, "param": None, "code": code}
        }
    return {"error": failure.message}  # Open Inference Protocol


def _respond_error(request: web.Request, failure: HttpFailure) -> web.Response:
    headers = {"Retry-After": RETRY_AFTER_S} if failure.status in (429, 503) else None
    return web.json_response(_error_body(request, failure), status=failure.status, headers=headers)


def middlewares(ctx: HttpContext) -> list[Callable[..., Awaitable[web.StreamResponse]]]:
    expected = f"Bearer {ctx.cfg.auth_token}".encode() if ctx.cfg.auth_token else None

    @web.middleware
    async def answer(request: web.Request, handler: Handler) -> web.StreamResponse:
        protocol = getattr(request.match_info.handler, "protocol", None)
        ANSWERED.set(0)
        if protocol and tracing.enabled():
            route = request.match_info.route.resource
            name = route.canonical if route is not None else request.path
            tracing.INCOMING.set((f"{request.method} {name}", request.headers))
        try:
            if expected is not None and not request.path.startswith(PUBLIC_PATHS):
                given = request.headers.get("Authorization", "").encode()
                if not hmac.compare_digest(given, expected):  # constant time
                    raise HttpFailure(
                        401,
                        "missing or invalid token: send 'Authorization: Bearer <token>'",
                        "authentication_error",
                    )
            response = await handler(request)
        except HttpFailure as failure:
            response = _respond_error(request, failure)
        except web.HTTPException as exc:  # aiohttp's own: 404 no route, 405, 413 too large
            message = exc.text or exc.reason
            if exc.status == 413:
                message = (
                    f"request body over {ctx.cfg.max_message_mb} MB (--max-message-mb); "
                    "send fewer images per call"
                )
            response = _respond_error(request, HttpFailure(exc.status, message))
        except asyncio.CancelledError:  # the client went away
            if protocol:
                ctx.metrics.request_done("CANCELLED", 0, protocol)
            raise
        except Exception as exc:
            log.exception("%s %s failed", request.method, request.path)
            failure = HttpFailure(
                500, f"internal error: {type(exc).__name__}: {exc}", "server_error"
            )
            response = _respond_error(request, failure)
        if protocol:
            code = CODE_OF_HTTP.get(response.status, "INTERNAL")
            ctx.metrics.request_done(code, ANSWERED.get() if code == "OK" else 0, protocol)
        return response

    return [answer]


def counted(protocol: str, handler: Handler) -> Handler:
    """Mark an embedding route: its calls are counted under ``protocol``."""
    handler.protocol = protocol  # type: ignore[attr-defined]
    return handler
