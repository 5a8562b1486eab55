"""The client side of ``EmbedStream`` for bulk work: chunks in, batches out, in order.

One stream carries many requests; at most ``window`` are unanswered at a time (the request
generator waits on a semaphore the answers release), so memory stays bounded however long the
input. If the stream breaks with a resendable status (a draining or restarted server, a network
error: UNAVAILABLE, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED) the unanswered chunks are sent again
first on a new stream, after a backoff, up to ``resend`` times in a row. A server without the
RPC (UNIMPLEMENTED before any answer) raises :class:`StreamUnsupported`, and the caller goes on
with unary calls from where the stream stopped.
"""

from __future__ import annotations

import collections
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from simclr_embed.client.codec import Chunk, EmbedBatch, EmbeddingError, build_request, to_batch

_MESSAGE_RE = re.compile(r"^message \d+: (?:image (\d+): )?")


class StreamUnsupported(Exception):
    """The server has no EmbedStream; ``remaining`` is every chunk not yet answered, in order."""

    def __init__(self, remaining: Iterator[Chunk]) -> None:
        super().__init__("EmbedStream not implemented by the server")
        self.remaining = remaining


def stream_batches(
    call: Callable[..., Any],
    chunks: Iterator[Chunk],
    *,
    kind: str,
    normalize: bool,
    skip: bool,
    window: int,
    resend: int,
    dim: Callable[[], int],
    metadata: Any,
    backoff: Callable[[int], float],
    resendable: tuple[grpc.StatusCode, ...],
) -> Iterator[EmbedBatch]:
    """``call`` is the stub's ``EmbedStream``; yields a batch per chunk, in input order."""
    lock = threading.Lock()
    retry: collections.deque[Chunk] = collections.deque()  # sent, unanswered, to send again
    failures = 0
    answered_any = False
    while True:
        pending: collections.deque[Chunk] = collections.deque()  # this stream's, in send order
        slots = threading.Semaphore(window)
        closed = threading.Event()

        def requests(
            pending: collections.deque[Chunk] = pending,
            slots: threading.Semaphore = slots,
            closed: threading.Event = closed,
        ) -> Iterator[Any]:
            while True:
                slots.acquire()  # blocks while `window` messages are unanswered
                with lock:
                    if closed.is_set():
                        return
                    chunk = retry.popleft() if retry else next(chunks, None)
                    if chunk is None:
                        return
                    pending.append(chunk)  # before it is sent: the answer can only come after
                if chunk.images:  # a chunk with nothing sendable waits in `pending` for its turn
                    yield build_request(chunk.images, kind, normalize, skip)

        responses = call(requests(), metadata=metadata)
        try:
            for response in responses:
                while pending and not pending[0].images:
                    yield to_batch(pending.popleft(), None, dim())
                    slots.release()
                chunk = pending.popleft()
                answered_any, failures = True, 0
                yield to_batch(chunk, response, 0)
                slots.release()
            while pending:  # trailing chunks with nothing to send
                yield to_batch(pending.popleft(), None, dim())
            return
        except grpc.RpcError as exc:
            with lock:
                closed.set()
                retry.extendleft(reversed(pending))  # unanswered, in order, before the rest
                pending.clear()
            slots.release()  # wake the request generator so it sees `closed`
            code = exc.code()
            if code == grpc.StatusCode.UNIMPLEMENTED and not answered_any:
                raise StreamUnsupported(_rest(retry, chunks)) from None
            if code not in resendable or failures >= resend:
                raise _error(exc, retry[0] if retry else None) from None
            time.sleep(backoff(failures))
            failures += 1


def _rest(retry: collections.deque[Chunk], chunks: Iterator[Chunk]) -> Iterator[Chunk]:
    yield from retry
    yield from chunks


def _error(exc: grpc.RpcError, chunk: Chunk | None) -> EmbeddingError:
    """``message k: image i: reason`` → the input index of image ``i`` of that chunk."""
    details = exc.details() or ""
    found = _MESSAGE_RE.match(details)
    if found is None or chunk is None:
        return EmbeddingError(exc.code(), details)
    rest = details[found.end() :]
    if found.group(1) is None:
        return EmbeddingError(exc.code(), rest)
    index = chunk.positions[int(found.group(1))]
    return EmbeddingError(exc.code(), f"image {index}: {rest}", index)
