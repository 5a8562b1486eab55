"""DynamicBatcher with a fake runtime: what leaves in which batch, splitting, limits, failures."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any

import numpy as np
import pytest

from simclr_embed.server.batcher import (
    BatcherStoppedError,
    DeadlineExceededError,
    DynamicBatcher,
    QueueFullError,
)

LONG = 30.0  # a delay no test waits for: batches in these tests must leave for another reason
BAD = 255  # marker pixel value the fake runtime refuses


class FakeRuntime:
    """Encodes image i (all pixels = its id) to features [id, id+1] and projection [2*id].

    ``gate``: when set up, each call blocks until released, so tests can hold a batch in flight.
    """

    def __init__(self, gated: bool = False) -> None:
        self.batches: list[list[int]] = []
        self.threads: set[str] = set()
        self.gate = threading.Semaphore(0) if gated else None
        self.entered = threading.Semaphore(0)

    def encode(self, images: np.ndarray) -> dict[str, np.ndarray]:
        ids = images[:, 0, 0, 0].astype(np.float32)  # [B]
        self.batches.append([int(i) for i in ids])
        self.threads.add(threading.current_thread().name)
        self.entered.release()
        if self.gate is not None:
            assert self.gate.acquire(timeout=10), "test never released the gate"
        if (ids == BAD).any():
            raise RuntimeError("fake runtime failure")
        return {"features": np.stack([ids, ids + 1], axis=1), "projection": 2 * ids[:, None]}

    def release(self, n: int = 1) -> None:
        assert self.gate is not None
        for _ in range(n):
            self.gate.release()

    async def wait_entered(self, n: int = 1) -> None:
        for _ in range(n):
            ok = await asyncio.get_running_loop().run_in_executor(
                None, self.entered.acquire, True, 10
            )
            assert ok, "runtime was not called"


def images(*ids: int) -> np.ndarray:
    out = np.zeros((len(ids), 2, 2, 3), np.uint8)  # [n, S, S, 3]
    out[:] = np.asarray(ids, np.uint8)[:, None, None, None]
    return out


def expected(*ids: int) -> dict[str, np.ndarray]:
    f = np.asarray(ids, np.float32)
    return {"features": np.stack([f, f + 1], axis=1), "projection": 2 * f[:, None]}


def assert_outputs(got: dict[str, np.ndarray], *ids: int) -> None:
    want = expected(*ids)
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 20))


async def started(runtime: FakeRuntime, **kwargs: Any) -> DynamicBatcher:
    batcher = DynamicBatcher(runtime.encode, **kwargs)
    batcher.start()
    return batcher


def test_full_batch_leaves_without_waiting_for_the_delay() -> None:
    async def main() -> None:
        rt = FakeRuntime()
        b = await started(rt, max_batch_size=4, max_delay_s=LONG)
        results = await asyncio.gather(*(b.submit(images(i)) for i in range(1, 5)))
        for i, got in enumerate(results, start=1):
            assert_outputs(got, i)
        assert rt.batches == [[1, 2, 3, 4]]
        assert rt.threads and threading.current_thread().name not in rt.threads
        await b.stop()

    run(main())


def test_partial_batch_leaves_after_max_delay_with_what_arrived() -> None:
    """Triton's rule (policy "delay"): a partial batch waits out the delay even on an idle model."""

    async def main() -> None:
        rt = FakeRuntime()
        b = await started(rt, max_batch_size=8, max_delay_s=0.3, policy="delay")
        first = asyncio.ensure_future(b.submit(images(1)))
        await asyncio.sleep(0.01)  # well inside the first image's delay
        second = asyncio.ensure_future(b.submit(images(2, 3)))
        assert_outputs(await first, 1)
        assert_outputs(await second, 2, 3)
        assert rt.batches == [[1, 2, 3]]
        await b.stop()

    run(main())


def test_continuous_an_idle_model_takes_a_lone_request_at_once() -> None:
    """Nobody else is coming: however long the delay, an idle model does not wait."""

    async def main() -> None:
        rt = FakeRuntime()
        b = await started(rt, max_batch_size=8, max_delay_s=LONG)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert_outputs(await b.submit(images(1)), 1)
        assert_outputs(await b.submit(images(2)), 2)
        assert loop.time() - t0 < 1.0 and rt.batches == [[1], [2]]
        await b.stop()

    run(main())


def test_continuous_calls_arriving_turn_after_turn_go_together() -> None:
    """Back-to-back arrivals (the loop itself busy with calls) share a batch on an idle model:
    it goes once a turn of the loop brings nobody new, not one model call per request."""

    async def main() -> None:
        rt = FakeRuntime()
        b = await started(rt, max_batch_size=8, max_delay_s=LONG)
        futures: list[asyncio.Future[dict[str, np.ndarray]]] = []

        def arrive(i: int) -> None:  # one request per loop turn, as a busy gRPC loop hands them
            futures.append(asyncio.ensure_future(b.submit(images(i))))
            if i < 5:
                asyncio.get_running_loop().call_soon(arrive, i + 1)

        arrive(1)
        while len(futures) < 5:
            await asyncio.sleep(0)
        for i, fut in enumerate(futures, start=1):
            assert_outputs(await fut, i)
        assert rt.batches == [[1, 2, 3, 4, 5]]
        await b.stop()

    run(main())


def test_inline_model_runs_on_the_loop_and_keeps_every_guarantee() -> None:
    """``inline``: no thread; an idle model is called inside submit; splitting, order and
    failures work as with threads."""

    async def main() -> None:
        rt = FakeRuntime()
        b = await started(rt, max_batch_size=4, max_delay_s=LONG, inline=True)
        assert_outputs(await b.submit(images(1)), 1)  # called at once, inside submit
        assert rt.batches == [[1]]
        got = await asyncio.gather(b.submit(images(*range(10, 16))), b.submit(images(2)))
        assert_outputs(got[0], *range(10, 16))  # 6 > 4: split by the collector, in order
        assert_outputs(got[1], 2)
        with pytest.raises(RuntimeError, match="fake runtime failure"):
            await b.submit(images(BAD))
        assert_outputs(await b.submit(images(3)), 3)  # the failure was its own
        assert rt.threads == {threading.current_thread().name}
        assert sorted(i for batch in rt.batches for i in batch) == sorted(
            [1, *range(10, 16), 2, BAD, 3]
        )
        await b.stop()

    run(main())


def test_continuous_the_next_batch_fills_while_the_model_is_busy() -> None:
    """With a batch in the model, requests accumulate (a free second slot waits beside it) and
    leave together the moment the model is idle again."""

    async def main() -> None:
        rt = FakeRuntime(gated=True)
        b = await started(rt, max_batch_size=8, max_delay_s=LONG, max_inflight=2)
        first = asyncio.ensure_future(b.submit(images(1)))
        await rt.wait_entered()  # [1] is in the model
        rest = [asyncio.ensure_future(b.submit(images(i))) for i in (2, 3, 4)]
        await asyncio.sleep(0.2)
        assert rt.batches == [[1]]  # the free slot waits: the model is busy
        rt.release()  # [1] done → the model is idle → [2, 3, 4] go together
        assert_outputs(await first, 1)
        await rt.wait_entered()
        rt.release()
        for i, fut in zip((2, 3, 4), rest, strict=True):
            assert_outputs(await fut, i)
        assert rt.batches == [[1], [2, 3, 4]]
        await b.stop()

    run(main())


def test_continuous_max_delay_bounds_the_wait_beside_a_busy_model() -> None:
    async def main() -> None:
        rt = FakeRuntime(gated=True)
        b = await started(rt, max_batch_size=8, max_delay_s=0.2, max_inflight=2)
        first = asyncio.ensure_future(b.submit(images(1)))
        await rt.wait_entered()
        second = asyncio.ensure_future(b.submit(images(2)))
        await rt.wait_entered()  # after 0.2 s [2] runs in the second slot beside [1]
        assert rt.batches == [[1], [2]]
        rt.release(2)
        assert_outputs(await first, 1)
        assert_outputs(await second, 2)
        await b.stop()

    run(main())


def test_zero_delay_runs_a_lone_request_at_once() -> None:
    async def main() -> None:
        rt = FakeRuntime()
        b = await started(rt, max_batch_size=8, max_delay_s=0.0)
        assert_outputs(await b.submit(images(7)), 7)
        assert rt.batches == [[7]]
        await b.stop()

    run(main())


def test_large_requests_are_split_and_reassembled_in_order() -> None:
    async def main() -> None:
        rt = FakeRuntime()
        b = await started(rt, max_batch_size=4, max_delay_s=LONG)
        a_ids, b_ids = tuple(range(10, 20)), (30, 31)
        got_a, got_b = await asyncio.gather(b.submit(images(*a_ids)), b.submit(images(*b_ids)))
        assert_outputs(got_a, *a_ids)
        assert_outputs(got_b, *b_ids)
        # FIFO: request A fills two batches, shares the third with B.
        assert rt.batches == [[10, 11, 12, 13], [14, 15, 16, 17], [18, 19, 30, 31]]
        await b.stop()

    run(main())


def test_full_queue_refuses_at_once_and_frees_space_as_batches_leave() -> None:
    async def main() -> None:
        rt = FakeRuntime(gated=True)
        b = await started(rt, max_batch_size=2, max_delay_s=0.0, max_queue=3, max_inflight=1)
        running = asyncio.ensure_future(b.submit(images(1, 2)))
        await rt.wait_entered()  # [1, 2] is in flight; the queue is empty again
        waiting = asyncio.ensure_future(b.submit(images(3, 4, 5)))
        await asyncio.sleep(0)
        assert b.queued_images == 3
        with pytest.raises(QueueFullError, match="queue full"):
            await b.submit(images(6))
        rt.release(4)  # [1, 2], [3, 4], [5], [6]
        assert_outputs(await running, 1, 2)
        assert_outputs(await waiting, 3, 4, 5)
        assert_outputs(await b.submit(images(6)), 6)
        assert rt.batches == [[1, 2], [3, 4], [5], [6]]
        await b.stop()

    run(main())


def test_expired_request_is_dropped_before_running() -> None:
    async def main() -> None:
        rt = FakeRuntime(gated=True)
        b = await started(rt, max_batch_size=4, max_delay_s=0.0, max_inflight=1)
        loop = asyncio.get_running_loop()
        running = asyncio.ensure_future(b.submit(images(1)))
        await rt.wait_entered()
        late = asyncio.ensure_future(b.submit(images(2), deadline=loop.time() + 0.05))
        fine = asyncio.ensure_future(b.submit(images(3), deadline=loop.time() + LONG))
        await asyncio.sleep(0.1)  # the deadline passes while [1] holds the only slot
        rt.release(2)
        assert_outputs(await running, 1)
        with pytest.raises(DeadlineExceededError):
            await late
        assert_outputs(await fine, 3)
        assert rt.batches == [[1], [3]]
        await b.stop()

    run(main())


def test_cancelled_request_is_dropped_and_frees_its_queue_space() -> None:
    async def main() -> None:
        rt = FakeRuntime(gated=True)
        b = await started(rt, max_batch_size=4, max_delay_s=0.0, max_inflight=1)
        running = asyncio.ensure_future(b.submit(images(1)))
        await rt.wait_entered()
        doomed = asyncio.ensure_future(b.submit(images(2, 3)))
        kept = asyncio.ensure_future(b.submit(images(4)))
        await asyncio.sleep(0)
        assert b.queued_images == 3
        doomed.cancel()
        with pytest.raises(asyncio.CancelledError):
            await doomed
        assert b.queued_images == 1
        rt.release(2)
        assert_outputs(await running, 1)
        assert_outputs(await kept, 4)
        assert rt.batches == [[1], [4]]
        await b.stop()

    run(main())


def test_runtime_error_fails_only_its_own_batch() -> None:
    async def main() -> None:
        rt = FakeRuntime()
        b = await started(rt, max_batch_size=2, max_delay_s=LONG)
        bad, mate, later = (
            asyncio.ensure_future(b.submit(images(BAD))),
            asyncio.ensure_future(b.submit(images(5))),
            asyncio.ensure_future(b.submit(images(6, 7))),
        )
        for fut in (bad, mate):  # batch-mates share a model call, so they share its failure
            with pytest.raises(RuntimeError, match="fake runtime failure"):
                await fut
        assert_outputs(await later, 6, 7)
        assert_outputs(await b.submit(images(8, 9)), 8, 9)  # the batcher keeps working
        assert rt.batches == [[BAD, 5], [6, 7], [8, 9]]
        await b.stop()

    run(main())


def test_batches_run_concurrently_up_to_max_inflight() -> None:
    async def main() -> None:
        rt = FakeRuntime(gated=True)
        b = await started(rt, max_batch_size=1, max_delay_s=0.0, max_inflight=2)
        futs = [asyncio.ensure_future(b.submit(images(i))) for i in (1, 2, 3)]
        await rt.wait_entered(2)  # two calls are inside encode at the same time
        assert b.inflight_batches == 2
        assert b.queued_images == 1
        rt.release(3)
        for i, fut in zip((1, 2, 3), futs, strict=True):
            assert_outputs(await fut, i)
        await b.stop()

    run(main())


def test_stop_drains_queued_work_then_refuses() -> None:
    async def main() -> None:
        rt = FakeRuntime()
        b = await started(rt, max_batch_size=8, max_delay_s=LONG)
        futs = [asyncio.ensure_future(b.submit(images(i))) for i in (1, 2, 3)]
        await asyncio.sleep(0)
        await b.stop(timeout=10)  # does not wait out the 30 s delay
        for i, fut in zip((1, 2, 3), futs, strict=True):
            assert_outputs(await fut, i)
        with pytest.raises(BatcherStoppedError):
            await b.submit(images(4))

    run(main())


def test_stop_timeout_fails_what_is_left() -> None:
    async def main() -> None:
        rt = FakeRuntime(gated=True)
        b = await started(rt, max_batch_size=1, max_delay_s=0.0, max_inflight=1)
        stuck = asyncio.ensure_future(b.submit(images(1)))
        queued = asyncio.ensure_future(b.submit(images(2)))
        await rt.wait_entered()
        await b.stop(timeout=0.1)
        for fut in (stuck, queued):
            with pytest.raises(BatcherStoppedError):
                await fut
        rt.release(2)  # let the abandoned worker thread finish

    run(main())
