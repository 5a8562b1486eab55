"""Dynamic batching in pure asyncio, after Triton's dynamic batcher (no grpc, no onnxruntime).

(Long because the collector, admission, deadlines and inline model calls are one state machine
whose invariants are easier to check in one file than across several.)

Requests of ``[n, S, S, 3]`` images wait in one FIFO queue. The collector first takes a model
slot (at most ``max_inflight`` batches run at once; while all are busy, images accumulate), then:

- ``continuous`` (the default, like TEI's and vLLM's schedulers): when no batch is running — the
  model is idle — what is queued leaves at once: nobody else is coming, so waiting would only add
  latency. While another batch runs, the next one fills until it holds ``max_batch_size`` images,
  the oldest has waited ``max_delay_s``, or the model becomes idle: ``max_delay_s`` bounds only
  how long a batch waits beside a busy model.
- ``delay`` (Triton's rule): a batch leaves when full or when its oldest image has waited
  ``max_delay_s``, idle model or not.

Until then the collector sleeps exactly until that moment (a timer, no polling) or until a
request fills the batch or a batch finishes. A request larger than the room left is split across batches and its outputs reassembled
in order. The queue is bounded in images: a request that does not fit fails at once
(:class:`QueueFullError`). Requests whose caller was cancelled, or whose deadline passed, are
dropped before their batch runs. ``encode`` runs in a dedicated thread pool, and up to
``max_inflight`` batches run at once while the next one is being collected — except with
``inline``, for models whose whole call is cheaper than a hop to a thread and back (~0.2 ms of
CPU on a small VM, more than a do-nothing model's call): those run on the event loop, one at a
time, each blocking it for less than that hop would.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from simclr_embed import tracing

log = logging.getLogger(__name__)

POLICIES = ("continuous", "delay")
Outputs = dict[str, np.ndarray]
Encode = Callable[[np.ndarray], Mapping[str, np.ndarray]]  # [B, ...] -> {name: [B, ...]}


class QueueFullError(Exception):
    """The request does not fit the bounded queue (gRPC: RESOURCE_EXHAUSTED)."""


class DeadlineExceededError(Exception):
    """The request's deadline passed before its batch ran (gRPC: DEADLINE_EXCEEDED)."""


class BatcherStoppedError(Exception):
    """The batcher is not running or is draining (gRPC: UNAVAILABLE)."""


class BatchObserver(Protocol):
    """Hooks for metrics; called on the event loop."""

    def queue_changed(self, images: int) -> None: ...

    def batch_done(
        self, size: int, queue_seconds: Sequence[float], inference_seconds: float
    ) -> None: ...


class _NullObserver:
    def queue_changed(self, images: int) -> None:
        pass

    def batch_done(
        self, size: int, queue_seconds: Sequence[float], inference_seconds: float
    ) -> None:
        pass


@dataclass(eq=False)
class _Request:
    images: np.ndarray  # [n, S, S, 3]
    future: asyncio.Future[Outputs]
    enqueued_at: float  # loop.time()
    deadline: float | None  # loop.time() after which the answer is useless
    taken: int = 0  # images already handed to a batch
    answered: int = 0  # images whose outputs have been copied into `outputs`
    outputs: Outputs | None = field(default=None, repr=False)
    started_at: float | None = None  # loop.time() its first model call started
    inference_s: float = 0.0  # duration of the model calls its images were in
    trace: object = None  # the request's span when tracing (a batch span links to it)

    @property
    def size(self) -> int:
        return len(self.images)


def _dead(request: _Request, now: float) -> bool:
    """Cancelled or failed already, or past its deadline: not worth a model call."""
    return request.future.done() or (request.deadline is not None and request.deadline <= now)


def _check_rows(outputs: Mapping[str, np.ndarray], n: int) -> None:
    for name, arr in outputs.items():
        if len(arr) != n:
            raise RuntimeError(f"encode returned {len(arr)} rows of {name!r} for {n} images")


def _settle(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


Segment = tuple[_Request, int, int]  # (request, start, stop) rows of one request in a batch


class DynamicBatcher:
    """Merge concurrent requests into model batches; see the module docstring.

    Args:
        encode: blocking ``[B, ...] uint8 -> {name: [B, ...]}``; called from worker threads.
        max_batch_size: most images in one ``encode`` call.
        max_delay_s: longest time the oldest queued image waits for batch-mates.
        max_queue: most images waiting (not yet handed to a batch) at once.
        max_inflight: most ``encode`` calls running at once.
        observer: metrics hooks.
        policy: ``continuous`` or ``delay`` (see the module docstring).
        inline: call ``encode`` on the event loop instead of in a thread (see the module
            docstring; only for calls of well under a millisecond).
    """

    def __init__(
        self,
        encode: Encode,
        *,
        max_batch_size: int = 32,
        max_delay_s: float = 0.002,
        max_queue: int = 1024,
        max_inflight: int = 1,
        observer: BatchObserver | None = None,
        policy: str = "continuous",
        inline: bool = False,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_inflight < 1 or max_delay_s < 0:
            raise ValueError(
                "max_batch_size, max_queue, max_inflight must be >= 1, max_delay_s >= 0"
            )
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        self.policy = policy
        self.inline = inline
        self._encode = encode
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self.max_inflight = max_inflight
        self._observer: BatchObserver = observer or _NullObserver()
        self._queue: collections.deque[_Request] = collections.deque()
        self._queued = 0  # images in the queue not yet handed to a batch
        self._waiter: asyncio.Future[None] | None = None  # the collector's, while it sleeps
        self._room = asyncio.Event()  # replaced (and the old one set) whenever the queue shrinks
        self._slots = asyncio.Semaphore(max_inflight)
        self._running: set[asyncio.Task[None]] = set()
        self._busy = 0  # batches in the model right now
        self._collector: asyncio.Task[None] | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._stopping = False

    @property
    def queued_images(self) -> int:
        return self._queued

    @property
    def inflight_batches(self) -> int:
        return len(self._running)

    def has_room(self, n: int) -> bool:
        """Whether ``n`` more images would fit now (lets callers refuse before costly work)."""
        return self._queued + n <= self.max_queue

    def start(self) -> None:
        """Start the collector task on the running loop."""
        if self._collector is not None:
            raise RuntimeError("batcher already started")
        self._executor = concurrent.futures.ThreadPoolExecutor(
            self.max_inflight, thread_name_prefix="simclr-infer"
        )
        self._collector = asyncio.get_running_loop().create_task(self._collect(), name="batcher")

    async def wait_for_room(self, n: int, deadline: float | None = None) -> bool:
        """Wait until ``n`` images fit the queue (True) or ``deadline`` passes (False): for callers
        that would rather wait than be refused (a stream, which bounds itself)."""
        loop = asyncio.get_running_loop()
        while not self.has_room(n):
            timeout = None if deadline is None else deadline - loop.time()
            if timeout is not None and timeout <= 0:
                return False
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._room.wait(), timeout)
        return True

    async def submit(
        self,
        images: np.ndarray,
        *,
        deadline: float | None = None,
        timing: dict[str, float] | None = None,
        trace: object = None,
    ) -> Outputs:
        """Queue ``images`` ``[n, ...]`` and wait for ``{name: [n, ...]}`` in the same order.

        ``deadline`` is in ``loop.time()`` seconds. ``timing``, when given, gets ``queue_s`` (wait
        before the first model call) and ``inference_s`` (the model calls' durations). Raises
        :class:`QueueFullError`, :class:`DeadlineExceededError`, :class:`BatcherStoppedError`, or
        what ``encode`` raised.
        """
        if self._collector is None or self._stopping:
            raise BatcherStoppedError("the batcher is not accepting work (starting or draining)")
        n = len(images)
        if n == 0:
            raise ValueError("no images to submit")
        if self._queued + n > self.max_queue:
            raise QueueFullError(
                f"queue full: {self._queued} of {self.max_queue} images waiting, {n} more do not fit"
            )
        loop = asyncio.get_running_loop()
        idle = not self._queue and not self._busy
        if self.inline and idle and self.policy == "continuous" and n <= self.max_batch_size:
            return self._run_now(images, loop, timing, trace)  # on the loop, idle: call it now
        request = _Request(images, loop.create_future(), loop.time(), deadline)
        request.trace = trace
        was_empty = not self._queue
        self._queue.append(request)
        self._queued += n
        self._observer.queue_changed(self._queued)
        # The collector waits without a timeout only on an empty queue, and otherwise sleeps
        # until the oldest image's delay is up: only these two events need to wake it early.
        if was_empty or self._queued >= self.max_batch_size:
            self._wake()
        try:
            outputs = await request.future
        except asyncio.CancelledError:
            self._forget(request)  # free its queue space now, not when the collector gets there
            raise
        if timing is not None and request.started_at is not None:
            timing["queue_s"] = request.started_at - request.enqueued_at
            timing["inference_s"] = request.inference_s
            timing["queued_at"], timing["started_at"] = request.enqueued_at, request.started_at
        return outputs

    def _run_now(
        self,
        images: np.ndarray,
        loop: asyncio.AbstractEventLoop,
        timing: dict[str, float] | None,
        trace: object = None,
    ) -> Outputs:
        """The whole request as one batch, on the loop, without queueing: no future, no task,
        no collector turn (together costlier than a do-nothing model's call)."""
        started = loop.time()
        outputs = dict(self._encode(images))
        inference_s = loop.time() - started
        _check_rows(outputs, len(images))
        self._observer.batch_done(len(images), (0.0,), inference_s)
        if trace is not None:
            self._trace_batch([trace], started, inference_s, len(images), loop)
        if timing is not None:
            timing["queue_s"] = 0.0
            timing["inference_s"] = inference_s
            timing["queued_at"] = timing["started_at"] = started
        return outputs

    async def stop(self, timeout: float | None = None) -> None:
        """Drain: refuse new work, run what is queued without waiting for the delay, wait for
        running batches; after ``timeout`` seconds fail whatever is left with
        :class:`BatcherStoppedError`."""
        self._stopping = True
        self._wake()
        if self._collector is None:
            return
        try:
            await asyncio.wait_for(self._drain(), timeout)
        except asyncio.TimeoutError:
            log.warning("batcher drain timed out; failing %d queued images", self._queued)
            self._collector.cancel()
            for task in list(self._running):
                task.cancel()
            await asyncio.gather(self._collector, *self._running, return_exceptions=True)
            for request in list(self._queue):
                self._fail(request, BatcherStoppedError("server stopped before this request ran"))
        finally:
            assert self._executor is not None
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def _drain(self) -> None:
        assert self._collector is not None
        await asyncio.shield(self._collector)  # on timeout stop() cancels it itself
        while self._running:
            await asyncio.gather(*self._running, return_exceptions=True)

    # -- collector -----------------------------------------------------------------------------

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            # Take an in-flight slot first: while all slots are busy, images keep accumulating,
            # so a loaded server naturally runs fuller batches.
            await self._slots.acquire()
            try:
                batch = await self._next_batch(loop)
            except BaseException:
                self._slots.release()
                raise
            if batch is None:  # stopping and nothing left
                self._slots.release()
                return
            self._busy += 1  # counted here, uncounted in _run_batch: no done-callback lag
            task = loop.create_task(self._run_batch(batch, loop))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _next_batch(self, loop: asyncio.AbstractEventLoop) -> list[Segment] | None:
        gathered = False
        while True:
            self._drop_dead(loop.time())
            if not self._queue:
                if self._stopping:
                    return None
                await self._wait(None)
                continue
            now = loop.time()
            remaining = self._queue[0].enqueued_at + self.max_delay_s - now
            if (
                self._queued >= self.max_batch_size
                or self._stopping
                or (self.policy == "continuous" and not self._busy)  # idle model: go now
                or remaining <= 0
            ):
                if not gathered and remaining > 0 and self._queued < self.max_batch_size:
                    gathered = True
                    await self._gather(loop)
                    continue
                batch = self._take(now)
                if batch:  # else every request left was dead: look again
                    return batch
                continue
            await self._wait(remaining)

    async def _gather(self, loop: asyncio.AbstractEventLoop) -> None:
        """Before an idle model takes what is queued: let the event loop turn while each turn
        brings new requests (bounded by the delay and the batch size). A lone request goes after
        one turn (microseconds); when calls arrive back to back — the loop itself is the
        bottleneck — they go as one batch instead of one model call each."""
        while not self._stopping and self._queue and self._queued < self.max_batch_size:
            if loop.time() >= self._queue[0].enqueued_at + self.max_delay_s:
                return
            before = self._queued
            await asyncio.sleep(0)
            if self._queued <= before:  # a turn with nobody new
                return

    async def _wait(self, timeout: float | None) -> None:
        """Sleep until :meth:`_wake` or ``timeout`` seconds. A bare future and a timer handle:
        ``asyncio.wait_for(event.wait())`` costs a Task per sleep, once per batch at load."""
        loop = asyncio.get_running_loop()
        # No await between the caller's checks and this: a submit cannot slip in between.
        self._waiter = waiter = loop.create_future()
        timer = None if timeout is None else loop.call_later(timeout, _settle, waiter)
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    def _wake(self) -> None:
        if self._waiter is not None:
            _settle(self._waiter)

    def _drop_dead(self, now: float) -> None:
        """Bury dead requests (cancelled, failed, or past their deadline) at the head of the
        queue, the ones that decide when the next batch leaves; :meth:`_take` skips those further
        back. O(1) per batch rather than a scan of the whole queue (64+ requests at load)."""
        while self._queue and _dead(self._queue[0], now):
            self._bury(self._queue[0])

    def _bury(self, request: _Request) -> None:
        if request.future.done():
            self._forget(request)
        else:
            self._fail(request, DeadlineExceededError("deadline passed while waiting in the queue"))

    def _take(self, now: float) -> list[Segment]:
        batch: list[Segment] = []
        room = self.max_batch_size
        while room and self._queue:
            request = self._queue[0]
            if _dead(request, now):
                self._bury(request)
                continue
            k = min(room, request.size - request.taken)
            batch.append((request, request.taken, request.taken + k))
            request.taken += k
            self._queued -= k
            room -= k
            if request.taken == request.size:
                self._queue.popleft()
        self._observer.queue_changed(self._queued)
        self._room_freed()
        return batch

    def _room_freed(self) -> None:
        """Wake everyone in :meth:`wait_for_room` (each re-checks)."""
        room, self._room = self._room, asyncio.Event()
        room.set()

    async def _run_batch(self, batch: list[Segment], loop: asyncio.AbstractEventLoop) -> None:
        try:
            parts = [request.images[a:b] for request, a, b in batch]
            images = parts[0] if len(parts) == 1 else np.concatenate(parts)  # [B, S, S, 3]
            started = loop.time()
            if self.inline:
                outputs = self._encode(images)
            else:
                outputs = await loop.run_in_executor(self._executor, self._encode, images)
            inference_s = loop.time() - started
            _check_rows(outputs, len(images))
            self._observer.batch_done(
                len(images), [started - request.enqueued_at for request, _, _ in batch], inference_s
            )
            for request, _, _ in batch:
                if request.started_at is None:
                    request.started_at = started
                request.inference_s += inference_s
            if tracing.enabled():
                traces = [r.trace for r, _, _ in batch]
                self._trace_batch(traces, started, inference_s, len(images), loop)
            self._scatter(batch, outputs)
        except asyncio.CancelledError:
            for request, _, _ in batch:
                self._fail(request, BatcherStoppedError("server stopped while this request ran"))
            raise
        except Exception as exc:  # a failing batch fails its own requests, nothing else
            log.exception("batch of %d images failed", sum(b - a for _, a, b in batch))
            for request, _, _ in batch:
                self._fail(request, exc)
        finally:
            self._busy -= 1
            self._slots.release()
            self._wake()  # a collector waiting beside a busy model may go now

    @staticmethod
    def _trace_batch(
        traces: list[object],
        started: float,
        inference_s: float,
        images: int,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        start = tracing.wall_ns(started, loop.time())
        tracing.batch_span(traces, start, start + int(inference_s * 1e9), images)

    @staticmethod
    def _scatter(batch: list[Segment], outputs: Mapping[str, np.ndarray]) -> None:
        offset = 0
        for request, a, b in batch:
            k = b - a
            if not request.future.done():
                if request.outputs is None:
                    request.outputs = {
                        name: np.empty((request.size, *arr.shape[1:]), arr.dtype)
                        for name, arr in outputs.items()
                    }
                for name, arr in outputs.items():
                    request.outputs[name][a:b] = arr[offset : offset + k]
                request.answered += k
                if request.answered == request.size:
                    request.future.set_result(request.outputs)
            offset += k

    def _forget(self, request: _Request) -> None:
        """Take a request's not-yet-batched images out of the queue."""
        if request.taken < request.size:
            self._queued -= request.size - request.taken
            request.taken = request.size
            with contextlib.suppress(ValueError):
                self._queue.remove(request)
            self._observer.queue_changed(self._queued)
            self._room_freed()

    def _fail(self, request: _Request, exc: BaseException) -> None:
        if not request.future.done():
            request.future.set_exception(exc)
        self._forget(request)
