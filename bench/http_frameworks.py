"""Which asyncio HTTP server to build ``simclr serve --http-port`` on: aiohttp's own server vs
Starlette on uvicorn, each answering the same JSON embedding-shaped call with no model behind it.

    python bench/http_frameworks.py [--seconds 4] [--clients 1,32]

Each server runs in its own process on 127.0.0.1; one aiohttp client process drives it with a
bounded number of concurrent callers. Only the framework's per-request cost is measured (the
body is parsed and a 512-float answer is built the same way in both).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import socket
import subprocess
import sys
import time

BODY = json.dumps({"model": "m", "input": [base64.b64encode(os.urandom(4096)).decode()]})
ANSWER = {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.5] * 512}]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_aiohttp(port: int) -> None:
    from aiohttp import web

    async def handle(request: web.Request) -> web.Response:
        body = await request.json()
        base64.b64decode(body["input"][0])
        return web.json_response(ANSWER)

    app = web.Application()
    app.router.add_post("/v1/embeddings", handle)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def run_starlette(port: int) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def handle(request: Request) -> JSONResponse:
        body = await request.json()
        base64.b64decode(body["input"][0])
        return JSONResponse(ANSWER)

    app = Starlette(routes=[Route("/v1/embeddings", handle, methods=["POST"])])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


async def drive(port: int, clients: int, seconds: float) -> tuple[float, float]:
    import aiohttp

    url = f"http://127.0.0.1:{port}/v1/embeddings"
    latencies: list[float] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as session:
        for _ in range(200):  # wait for the server, then warm it
            try:
                async with session.post(url, data=BODY) as r:
                    await r.read()
                break
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.05)
        end = time.perf_counter() + seconds

        async def caller() -> None:
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                async with session.post(url, data=BODY) as r:
                    await r.read()
                latencies.append(time.perf_counter() - t0)

        await asyncio.gather(*(caller() for _ in range(clients)))
    latencies.sort()
    return len(latencies) / seconds, 1e3 * latencies[len(latencies) // 2]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--clients", default="1,32")
    p.add_argument("--serve", choices=("aiohttp", "starlette"), help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        {"aiohttp": run_aiohttp, "starlette": run_starlette}[args.serve](args.port)
        return
    print("| server | clients | req/s | p50 ms |\n|---|---|---|---|")
    for name in ("aiohttp", "starlette"):
        port = free_port()
        proc = subprocess.Popen([sys.executable, __file__, "--serve", name, "--port", str(port)])
        try:
            for clients in (int(c) for c in args.clients.split(",")):
                rate, p50 = asyncio.run(drive(port, clients, args.seconds))
                print(f"| {name} | {clients} | {rate:.0f} | {p50:.2f} |", flush=True)
        finally:
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    main()
