"""``EmbedStream``: many requests on one call, answered in order, bounded in flight.

A reader task takes request messages off the stream and starts each one through the servicer's
own ``embed`` (the same checks, decode, batching and answer as a unary ``Embed``) — at most
``WINDOW`` at once: beyond that it stops reading, so gRPC's flow control makes the sender wait
(backpressure, not unbounded buffering). Messages run concurrently, so the batcher merges them
with each other and with other callers' requests; the answers leave in message order. A stream
waits for queue room instead of being refused RESOURCE_EXHAUSTED: its own window bounds it.

Ending: a failing message ends the stream with its status and the message's index
(``message 3: image 1: ...``), after the messages before it have been answered; a cancelled
stream cancels its running messages, which frees their queue space at once; a draining server
answers the messages it has read and then ends the stream with UNAVAILABLE saying from which
message to resend.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import NoReturn, Protocol

import grpc

from simclr_embed.pb.simclr.v1 import embedding_pb2 as pb
from simclr_embed.server.rpc import RpcFailure

log = logging.getLogger(__name__)

WINDOW = 8  # messages in progress per stream (each up to --max-request-images images)
_DRAINING = object()  # the reader stopped because the server is draining


class StreamHost(Protocol):
    """What a stream needs of the servicer (``server.servicer.EmbeddingServicer``)."""

    @property
    def accepting(self) -> bool: ...

    async def embed(
        self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext, *, wait_for_room: bool
    ) -> pb.EmbedResponse: ...

    async def fail(
        self, exc: RpcFailure, context: grpc.aio.ServicerContext, n: int, prefix: str = ""
    ) -> NoReturn: ...

    def count_ok(self, request: pb.EmbedRequest, response: pb.EmbedResponse) -> None: ...

    async def wait_draining(self) -> None: ...


async def stream_responses(
    servicer: StreamHost,
    requests: AsyncIterator[pb.EmbedRequest],
    context: grpc.aio.ServicerContext,
) -> AsyncIterator[pb.EmbedResponse]:
    pending: asyncio.Queue[object] = asyncio.Queue()  # unbounded: `slots` bounds it
    slots = asyncio.Semaphore(WINDOW)
    running: list[asyncio.Task[pb.EmbedResponse]] = []

    async def read() -> None:
        messages = aiter(requests)
        # A drain must not wait for a client that sends nothing more (a slow consumer, an idle
        # stream): waiting for the next message races the drain, and the drain ends the read.
        drained = asyncio.ensure_future(servicer.wait_draining())
        try:
            while True:
                message = asyncio.ensure_future(anext(messages))
                await asyncio.wait((message, drained), return_when=asyncio.FIRST_COMPLETED)
                if not message.done():
                    message.cancel()
                    pending.put_nowait(_DRAINING)
                    return
                try:
                    request = message.result()
                except StopAsyncIteration:
                    return
                if not servicer.accepting:
                    pending.put_nowait(_DRAINING)
                    return
                task = asyncio.ensure_future(servicer.embed(request, context, wait_for_room=True))
                running.append(task)
                pending.put_nowait((request, task))
                await slots.acquire()  # WINDOW messages in progress: stop reading, the sender waits
        finally:
            drained.cancel()
            pending.put_nowait(None)  # never blocks: nothing to await while being cancelled

    reader = asyncio.ensure_future(read())
    answered = 0
    try:
        while True:
            item = await pending.get()
            if item is None:
                break
            if item is _DRAINING:
                await servicer.fail(
                    RpcFailure(
                        grpc.StatusCode.UNAVAILABLE,
                        f"server is draining after answering {answered} message(s) of this "
                        f"stream; resend from message {answered} on another stream",
                    ),
                    context,
                    0,
                )
            request, task = item  # type: ignore[misc]
            try:
                response = await task
            except RpcFailure as exc:
                await servicer.fail(exc, context, len(request.images), f"message {answered}: ")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug: the stream ends, the server stays up
                log.exception("EmbedStream message %d failed", answered)
                await servicer.fail(
                    RpcFailure(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}"),
                    context,
                    len(request.images),
                    f"message {answered}: ",
                )
            running.remove(task)
            slots.release()
            servicer.count_ok(request, response)
            answered += 1
            yield response
        if reader.done() and reader.exception() is not None:
            raise reader.exception()  # type: ignore[misc]
    finally:
        reader.cancel()
        for task in running:  # a cancelled or failed stream drops what it still has queued
            task.cancel()
        await asyncio.gather(reader, *running, return_exceptions=True)
