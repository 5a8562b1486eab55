"""The transport-neutral request path: one request's images in → vectors, per-image errors,
timings out — shared by every transport (``simclr.v1`` gRPC, and any adapter added beside it).

    images (encoded bytes | raw pixels) ─▶ admission ─▶ decode pool ─▶ batcher ─▶ answer

A transport adapter turns its request into a list of images (``bytes`` of an image file, or an
object with ``pixels``/``height``/``width``/``channels`` — a ``simclr.v1.RawImage`` is one as it
is) and :class:`EmbedOptions`, awaits :meth:`RequestPath.embed`, and maps the typed
:class:`RequestError` it may raise to its own status codes (``STATUS`` names the gRPC one; an HTTP
adapter maps the same ``status`` strings to 400/429/504/503). Admission (accepting, draining, the
count of requests in flight) lives here too, so every transport drains the same way.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from simclr_embed import tracing
from simclr_embed.inference.images import ImageError, Preprocessor, RawPixels
from simclr_embed.inference.runtime import ModelInfo, select_output
from simclr_embed.server.batcher import (
    BatcherStoppedError,
    DeadlineExceededError,
    DynamicBatcher,
    QueueFullError,
)
from simclr_embed.server.metrics import Metrics

ImageInput = bytes | RawPixels | None  # None: the request named no image source
OUTPUTS = ("features", "projection")


class RequestError(Exception):
    """A request that cannot be answered; ``status`` says why, ``index`` names the image."""

    status = "internal"

    def __init__(self, message: str, index: int | None = None) -> None:
        super().__init__(message)
        self.message, self.index = message, index


class InvalidRequest(RequestError):
    status = "invalid"  # the caller's fault: bad image, empty request, too many images


class Overloaded(RequestError):
    status = "overloaded"  # queue full: retry later


class DeadlineExceeded(RequestError):
    status = "deadline"


class Unavailable(RequestError):
    status = "unavailable"  # starting up, draining, stopped: retry (another replica)


# What each status is called on gRPC (``grpc.StatusCode`` names, kept as strings: no grpc here).
STATUS = {
    "invalid": "INVALID_ARGUMENT",
    "overloaded": "RESOURCE_EXHAUSTED",
    "deadline": "DEADLINE_EXCEEDED",
    "unavailable": "UNAVAILABLE",
    "internal": "INTERNAL",
}


@dataclass(frozen=True)
class EmbedOptions:
    output: str = "features"  # features | projection
    normalize: bool = False
    per_image_errors: bool = False  # False: the first bad image fails the whole request
    deadline: float | None = None  # the event loop's clock (loop.time())
    wait_for_room: bool = False  # wait for queue space instead of Overloaded (streams)
    also: tuple[str, ...] = ()  # more outputs of the same model call (V2 asks for both)


@dataclass(frozen=True)
class Answer:
    """``vectors`` ``[m, D]``: the usable images' vectors in request order; ``bad``: index →
    reason of the others (only with ``per_image_errors``); ``n`` images were asked for."""

    vectors: np.ndarray
    bad: dict[int, str]
    n: int
    output: str
    model_version: str
    decode_ms: float
    queue_ms: float
    inference_ms: float
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # ``also`` outputs, ``[m, D']``

    def matrix(self, output: str | None = None) -> np.ndarray:
        """``[n, D]`` float32 of ``output`` (default: the asked one), zero rows for bad images."""
        vectors = self.vectors if output in (None, self.output) else self.extra[output]
        if not self.bad:
            return vectors
        out = np.zeros((self.n, vectors.shape[1]), np.float32)
        out[[i for i in range(self.n) if i not in self.bad]] = vectors
        return out


@dataclass(frozen=True)
class Backend:
    """Everything that exists only once the model is loaded and warm."""

    info: ModelInfo
    providers: tuple[str, ...]
    preprocessor: Preprocessor
    batcher: DynamicBatcher


def _stage_spans(
    span: object, decode_started: int, decode_ms: float, timing: dict[str, float], bad: int
) -> None:
    decode_end = decode_started + int(decode_ms * 1e6)
    tracing.child(span, "decode", decode_started, decode_end, **{"simclr.bad_images": bad})
    if "started_at" not in timing:
        return
    loop_now = asyncio.get_running_loop().time()
    queued = tracing.wall_ns(timing["queued_at"], loop_now)
    started = tracing.wall_ns(timing["started_at"], loop_now)
    tracing.child(span, "queue", queued, started)
    tracing.child(span, "model", started, started + int(timing["inference_s"] * 1e9))


@dataclass
class RequestPath:
    """Admission and the request path; refuses (``Unavailable``) until :meth:`attach` and after
    :meth:`drain`."""

    metrics: Metrics
    decode_pool: concurrent.futures.Executor
    max_request_images: int
    decode_workers: int = 1
    backend: Backend | None = None
    accepting: bool = False
    refusal: str = "server is starting up (model loading)"
    inflight: int = 0  # requests accepted and not yet answered
    last_call: float = 0.0  # loop.time() of the latest request to arrive
    _idle: asyncio.Event = field(default_factory=asyncio.Event)
    _draining: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.decode_workers = max(1, self.decode_workers)
        self._idle.set()

    def attach(self, backend: Backend) -> None:
        self.backend = backend
        self.accepting = True

    def drain(self) -> None:
        """Refuse every new request from now on; accepted ones run to the end."""
        self.accepting = False
        self.refusal = "server is draining (shutting down); retry, another replica will answer"
        self._draining.set()

    async def wait_draining(self) -> None:
        """Return once :meth:`drain` has been called (streams stop reading then)."""
        await self._draining.wait()

    def enter(self) -> bool:
        """Count a new request in flight; False while not accepting (the caller answers
        ``Unavailable(self.refusal)`` and counts the refusal)."""
        self.last_call = asyncio.get_running_loop().time()
        if not self.accepting:
            return False
        self.inflight += 1
        self._idle.clear()
        return True

    def leave(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float | None) -> bool:
        """Wait until no accepted request is left (True) or ``timeout`` seconds pass (False)."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def embed(self, images: Sequence[ImageInput], opts: EmbedOptions) -> Answer:
        """One admitted request → its :class:`Answer`; raises :class:`RequestError`."""
        backend = self.backend
        if backend is None:
            raise Unavailable(self.refusal)
        for name in (opts.output, *opts.also):
            if name not in OUTPUTS:
                raise InvalidRequest(f"unknown output {name!r} (expected one of {OUTPUTS})")
        n = len(images)
        if n == 0:
            raise InvalidRequest("request has no images")
        batcher = backend.batcher
        limit = min(self.max_request_images, batcher.max_queue)
        if n > limit:
            raise InvalidRequest(
                f"request has {n} images, at most {limit} per request "
                f"(--max-request-images/--max-queue); send several requests"
            )
        if opts.wait_for_room and not await batcher.wait_for_room(n, opts.deadline):
            raise DeadlineExceeded("deadline passed waiting for room")
        if not batcher.has_room(n):  # overloaded: refuse before spending decode time
            raise Overloaded(
                f"queue full: {batcher.queued_images} of {batcher.max_queue} images waiting, "
                f"{n} more do not fit; retry later"
            )
        span = tracing.start_request({"simclr.images": n, "simclr.output": opts.output})
        try:
            return await self._embed(images, opts, backend, span)
        except BaseException as exc:
            tracing.finish(span, exc)
            span = None
            raise
        finally:
            tracing.finish(span)

    async def _embed(
        self, images: Sequence[ImageInput], opts: EmbedOptions, backend: Backend, span: object
    ) -> Answer:
        batcher, n = backend.batcher, len(images)
        t0 = time.perf_counter()
        decode_started = time.time_ns()
        batch, bad = await self._decode(images, backend.preprocessor, opts.per_image_errors)
        decode_ms = 1e3 * (time.perf_counter() - t0)
        timing: dict[str, float] = {}
        if len(batch):
            try:
                outputs = await batcher.submit(
                    batch, deadline=opts.deadline, timing=timing, trace=span
                )
            except QueueFullError as exc:
                raise Overloaded(f"{exc}; retry later") from None
            except DeadlineExceededError as exc:
                raise DeadlineExceeded(str(exc)) from None
            except BatcherStoppedError as exc:
                raise Unavailable(str(exc)) from None
            vectors = select_output(outputs, opts.output, opts.normalize)  # [m, D]
            extra = {name: select_output(outputs, name, opts.normalize) for name in opts.also}
        else:  # every image was bad: nothing to run
            info = backend.info
            dims = {"features": info.feature_dim, "projection": info.projection_dim}
            vectors = np.zeros((0, dims[opts.output]), np.float32)
            extra = {name: np.zeros((0, dims[name]), np.float32) for name in opts.also}
        if span is not None:  # the stages as child spans, from the times measured anyway
            _stage_spans(span, decode_started, decode_ms, timing, bad=len(bad))
        return Answer(
            vectors=vectors,
            bad=bad,
            n=n,
            output=opts.output,
            model_version=backend.info.model_version,
            decode_ms=decode_ms,
            queue_ms=1e3 * timing.get("queue_s", 0.0),
            inference_ms=1e3 * timing.get("inference_s", 0.0),
            extra=extra,
        )

    async def _decode(
        self, images: Sequence[ImageInput], pre: Preprocessor, per_image_errors: bool
    ) -> tuple[np.ndarray, dict[int, str]]:
        """The images → (``[m, S, S, 3]`` usable ones in order, ``{index: reason}``).

        Without ``per_image_errors`` the first bad image (by index) fails the whole request.
        """
        if all(image is not None and not isinstance(image, bytes) for image in images):
            started = time.perf_counter()  # the bulk case, all raw pixels: no decode at all
            batch = pre.raw_batch(images)  # type: ignore[arg-type]
            if batch is not None:
                share = (time.perf_counter() - started) / len(images)
                for _ in images:  # simclr_decode_seconds counts images, whatever their path
                    self.metrics.decode_seconds.observe(share)
                return batch, {}
        loop = asyncio.get_running_loop()
        results: list[object] = [None] * len(images)
        pending: list[int] = []
        for i, image in enumerate(images):
            if (
                image is not None
                and not isinstance(image, bytes)
                and pre.is_direct(image.height, image.width)
            ):
                started = time.perf_counter()
                try:  # a copy of the pixels: not worth a thread hop
                    results[i] = pre.from_raw(
                        image.pixels, image.height, image.width, image.channels
                    )
                except ImageError as exc:
                    results[i] = exc
                self.metrics.decode_seconds.observe(time.perf_counter() - started)
            else:
                pending.append(i)
        if pending:
            # One job per decode thread, not per image: a hop to a thread and back costs about
            # as much CPU as decoding a small JPEG (bench/serve_overhead.py).
            k = min(len(pending), self.decode_workers)
            chunks = [pending[j::k] for j in range(k)]
            jobs = [
                loop.run_in_executor(
                    self.decode_pool, self._decode_many, [images[i] for i in chunk], pre
                )
                for chunk in chunks
            ]
            for chunk, decoded in zip(chunks, await asyncio.gather(*jobs), strict=True):
                for i, result in zip(chunk, decoded, strict=True):
                    results[i] = result
        good: list[np.ndarray] = []
        bad: dict[int, str] = {}
        for index, result in enumerate(results):
            if isinstance(result, ImageError):
                if not per_image_errors:
                    raise InvalidRequest(f"image {index}: {result}", index)
                bad[index] = str(result)
            elif isinstance(result, BaseException):
                raise result
            else:
                good.append(result)  # type: ignore[arg-type]
        size = pre.size
        stacked = np.stack(good) if good else np.zeros((0, size, size, 3), np.uint8)
        return stacked, bad

    def _decode_many(self, images: list[ImageInput], pre: Preprocessor) -> list[object]:
        """Runs in a decode thread: each image's array, or its :class:`ImageError` (or another
        exception, re-raised on the loop)."""
        out: list[object] = []
        for image in images:
            started = time.perf_counter()
            try:
                if isinstance(image, bytes):
                    out.append(pre.from_encoded(image))
                elif image is not None:
                    out.append(
                        pre.from_raw(image.pixels, image.height, image.width, image.channels)
                    )
                else:
                    raise ImageError("neither encoded bytes nor raw pixels are set")
            except Exception as exc:
                out.append(exc)
            finally:  # refused images cost decode time too
                self.metrics.decode_seconds.observe(time.perf_counter() - started)
        return out
