"""The ``--http-port`` server: the aiohttp application of every HTTP protocol (OpenAI-style in
``server.openai_api``, KServe V2 in ``server.v2_http``, ``/metrics``) with the shared error and
token handling of ``server.http_app``, bound on the gRPC server's event loop."""

from __future__ import annotations

import logging
import os
import ssl

from aiohttp import web

from simclr_embed.errors import SimclrError
from simclr_embed.server import openai_api, v2_http
from simclr_embed.server.http_app import CONTEXT, HttpContext, middlewares
from simclr_embed.server.ports import address, why_not

log = logging.getLogger(__name__)


def build_app(ctx: HttpContext) -> web.Application:
    app = web.Application(client_max_size=ctx.cfg.max_message_bytes, middlewares=middlewares(ctx))
    app[CONTEXT] = ctx
    openai_api.add_routes(app)
    v2_http.add_routes(app)
    app.router.add_get("/metrics", _metrics)
    return app


async def _metrics(request: web.Request) -> web.Response:
    from prometheus_client import CollectorRegistry, generate_latest, multiprocess

    registry = request.app[CONTEXT].metrics.registry
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # a --processes worker: the whole group
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    body = generate_latest(registry)
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4"})


class HttpServer:
    """The HTTP port: bound early (probes get 503 while the model loads), closed on release."""

    def __init__(self, ctx: HttpContext) -> None:
        self.ctx = ctx
        self.port: int | None = None
        self._runner: web.AppRunner | None = None

    async def start(self) -> int:
        cfg = self.ctx.cfg
        runner = web.AppRunner(build_app(self.ctx), access_log=None, handle_signals=False)
        await runner.setup()
        context = None
        if cfg.tls_cert is not None and cfg.tls_key is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(cfg.tls_cert, cfg.tls_key)
        site = web.TCPSite(
            runner,
            cfg.host.strip("[]"),
            cfg.http_port or 0,
            ssl_context=context,
            reuse_port=cfg.worker is not None,  # a --processes group shares the port
            backlog=1024,
        )
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            where = address(cfg.host, cfg.http_port or 0)
            reason = why_not(cfg.host, cfg.http_port or 0, exc, "--http-port")
            raise SimclrError(f"cannot serve HTTP on {where}: {reason}") from None
        self._runner = runner
        self.port = int(runner.addresses[0][1])  # the bound one, for --http-port 0
        log.info(
            "HTTP on %s://%s (OpenAI /v1/embeddings, KServe V2 /v2/models/%s/infer, /metrics)",
            "https" if context else "http",
            address(cfg.host, self.port),
            cfg.model_name,
        )
        return self.port

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.ctx.fetcher.close()
