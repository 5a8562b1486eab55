"""Rolling restarts lose nothing: SIGTERM under load, repeated, against real servers.

Clients here use plain stubs with no retries, so every answer is exactly what the server sent:
before the signal everything is OK; after it, OK (accepted before) or UNAVAILABLE (refused while
draining, or the port already closed) and never CANCELLED, which no retry policy retries.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from simclr_embed.client import EmbeddingClient
from simclr_embed.pb.simclr.v1 import embedding_pb2 as pb
from simclr_embed.pb.simclr.v1 import embedding_pb2_grpc as pb_grpc
from tests.server.conftest import ServerProcess, ServerThread, serve_config

S = 32
CLIENTS = 16
OK, UNAVAILABLE = grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE
# A request sent this long before the signal has certainly reached the server's handler before
# it (16 client threads share one GIL here, and a loaded 2-core machine can hold bytes in flight
# for a while). One sent later may have arrived after it: OK or UNAVAILABLE, never CANCELLED.
# That no accepted request is lost is checked exactly, by the server's own counts.
IN_TRANSIT_S = 0.5


def _image(seed: int) -> pb.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (S, S, 3), dtype=np.uint8)
    return pb.Image(raw=pb.RawImage(pixels=pixels.tobytes(), height=S, width=S, channels=3))


@dataclasses.dataclass
class Outcome:
    sent: float  # time.monotonic() just before the call
    code: grpc.StatusCode
    details: str


@dataclasses.dataclass
class Load:
    """``CLIENTS`` threads sending Embed calls (1–4 images; one thread 256) until told to stop
    or until the port is gone. Bounded: at most ``seconds`` and ``max_calls`` per thread."""

    target: str
    seconds: float = 30.0
    max_calls: int = 5000
    leave_when_refused: bool = False  # a balanced client moves on at the first "draining"
    outcomes: list[Outcome] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._client, args=(k,), daemon=True) for k in range(CLIENTS)
        ]

    def start(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def _client(self, k: int) -> None:
        # One channel per client: like 16 separate processes, no shared connection.
        with grpc.insecure_channel(self.target) as channel:
            stub = pb_grpc.EmbeddingServiceStub(channel)
            n = 256 if k == 0 else 1 + k % 4
            request = pb.EmbedRequest(images=[_image(k * 7 + i) for i in range(n)])
            end = time.monotonic() + self.seconds
            for _ in range(self.max_calls):
                if self._stop.is_set() or time.monotonic() > end:
                    return
                sent = time.monotonic()
                try:
                    response = stub.Embed(request, timeout=60)
                    assert len(response.embeddings) == n
                    outcome = Outcome(sent, OK, "")
                except grpc.RpcError as exc:
                    outcome = Outcome(sent, exc.code(), exc.details() or "")
                with self._lock:
                    self.outcomes.append(outcome)
                if outcome.code == UNAVAILABLE and (
                    self.leave_when_refused or "draining" not in outcome.details
                ):
                    return  # this server is gone (port closed), or going

    def wait_calls(self, n: int, timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        while len(self.outcomes) < n:
            assert time.monotonic() < end, f"only {len(self.outcomes)} calls answered"
            time.sleep(0.01)

    def join(self, timeout: float = 60) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout)
            assert not t.is_alive()


def _check(load: Load, signalled: float) -> Counter[str]:
    """The outcomes obey the drain rules; returns client-side counts (OK / refused-draining)."""
    seen: Counter[str] = Counter()
    for o in load.outcomes:
        assert o.code in (OK, UNAVAILABLE), (o.code, o.details, o.sent - signalled)
        if o.sent < signalled - IN_TRANSIT_S:
            assert o.code == OK, (o.code, o.details, o.sent - signalled)
        if o.code == OK:
            seen["OK"] += 1
        elif "draining" in o.details:
            seen["UNAVAILABLE"] += 1  # answered by the draining server (counted there too)
    assert seen["OK"] > CLIENTS  # the load really ran
    return seen


class HealthWatch(threading.Thread):
    """Polls health Check every 10 ms over its own channel; remembers every status seen."""

    def __init__(self, target: str) -> None:
        super().__init__(daemon=True)
        self.target, self.seen = target, []
        self.stop = threading.Event()

    def run(self) -> None:
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for _ in range(6000):  # ≤ 60 s
                if self.stop.wait(0.01):
                    return
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                    self.seen.append((time.monotonic(), status.status))
                except grpc.RpcError:
                    self.seen.append((time.monotonic(), None))


def _port_is_free(port: int) -> bool:
    """Nothing listens there any more. SO_REUSEADDR as a restarted server binds: the closed
    connections' TIME_WAIT entries on the port (the server closed them) do not count."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_sigterm_under_load_repeated(tiny_onnx: Path) -> None:
    """Real processes and signals, 4 rounds: answers, health, exit code, port, final counts.

    The clients keep sending through the drain until the port closes (they ignore health and
    retry refusals at once): the worst case for the race at the very end.
    """
    grace, delay = 10.0, 0.6
    for round_ in range(4):
        server = ServerProcess(
            "--model", str(tiny_onnx), "--port", "0", "--device", "cpu",
            "--max-batch-size", "16", "--max-delay-ms", "2",
            "--grace-s", str(grace), "--drain-delay-s", str(delay),
        )  # fmt: skip
        try:
            port = server.wait_serving()
            target = f"127.0.0.1:{port}"
            health = HealthWatch(target)
            health.start()
            load = Load(target).start()
            load.wait_calls(80 + 40 * round_)  # vary the moment of the signal
            signalled = time.monotonic()
            server.terminate()
            assert server.wait(timeout=grace + 5) == 0, server.log
            stopped = time.monotonic()
            load.join()
            health.stop.set()
            health.join(10)
        finally:
            server.kill()
        assert stopped - signalled < grace, server.log
        seen = _check(load, signalled)
        after = [status for t, status in health.seen if t > signalled]
        assert health_pb2.HealthCheckResponse.NOT_SERVING in after  # before the port closed
        assert _port_is_free(port)
        # The server's own count (its last log line) agrees with what clients saw.
        last = server.log.strip().splitlines()[-1]
        assert "stopped; Embed calls answered:" in last, server.log
        counted = dict(item.split("=") for item in last.split("answered: ")[1].split())
        assert counted == {code: str(n) for code, n in seen.items() if n}, last


def test_drain_in_process_repeated_metrics_match(tiny_onnx: Path) -> None:
    """``EmbeddingServer.stop()`` (what tests and embedders call), 4 rounds, clients that move on
    when refused: the same rules, and /metrics counts equal the client-side counts."""
    for round_ in range(4):
        srv = ServerThread(
            serve_config(tiny_onnx, max_batch_size=16, max_delay_ms=2, drain_delay_s=0.3)
        )
        try:
            load = Load(srv.target, leave_when_refused=True).start()
            load.wait_calls(60 + 30 * round_)
            signalled = time.monotonic()
            srv.call(srv.server.stop(10.0), timeout=30)
            load.join()
            seen = _check(load, signalled)
            counted = {k: v for k, v in srv.server.metrics.request_counts().items() if v}
            assert counted == {code: n for code, n in seen.items() if n}
        finally:
            srv.close()


def test_retrying_client_survives_a_restart_on_the_same_port(tiny_onnx: Path) -> None:
    """EmbeddingClient's retry policy + health watch + wait-for-ready: a server restarted
    mid-run (SIGTERM, then a new process on the same port) costs latency, not errors."""
    args = ("--model", str(tiny_onnx), "--device", "cpu", "--drain-delay-s", "0.3")
    first = ServerProcess(*args, "--port", "0")
    second: ServerProcess | None = None
    try:
        port = first.wait_serving()
        target = f"127.0.0.1:{port}"
        images = [np.asarray(np.random.default_rng(i).integers(0, 256, (S, S, 3)), np.uint8)
                  for i in range(6)]  # fmt: skip
        errors: list[BaseException] = []
        answered: list[np.ndarray] = []
        stop = threading.Event()

        def client() -> None:
            with EmbeddingClient(target, timeout=60, max_batch=2) as c:
                for _ in range(2000):  # bounded; stopped by the test well before
                    if stop.is_set():
                        return
                    try:
                        answered.append(c.embed(images))
                    except BaseException as exc:
                        errors.append(exc)
                        return

        threads = [threading.Thread(target=client, daemon=True) for _ in range(4)]
        for t in threads:
            t.start()
        end = time.monotonic() + 60  # bounded: a stuck client fails here, not at pytest's timeout
        while len(answered) < 20:
            assert not errors, errors
            assert time.monotonic() < end, f"only {len(answered)} answers in 60 s"
            time.sleep(0.01)
        first.terminate()
        assert first.wait(timeout=30) == 0
        before = len(answered)
        second = ServerProcess(*args, "--port", str(port))
        second.wait_serving()
        end = time.monotonic() + 30
        while len(answered) < before + 20 and time.monotonic() < end:
            time.sleep(0.01)
        stop.set()
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert len(answered) >= before + 20  # answered again, by the new server
        np.testing.assert_allclose(answered[-1], answered[0], rtol=1e-5, atol=1e-5)
        second.terminate()
        assert second.wait(timeout=30) == 0
    finally:
        first.kill()
        if second is not None:
            second.kill()


@pytest.mark.parametrize("delay", [0.0, 1.0])
def test_drain_delay_keeps_the_port_open_and_refusing(tiny_onnx: Path, delay: float) -> None:
    """With nothing in flight, stop() still lingers --drain-delay-s, answering UNAVAILABLE."""
    srv = ServerThread(serve_config(tiny_onnx, drain_delay_s=delay))
    try:
        stub = pb_grpc.EmbeddingServiceStub(grpc.insecure_channel(srv.target))
        t0 = time.monotonic()
        stopping = srv.call_soon(srv.server.stop(5.0))
        time.sleep(0.1)
        if delay:
            with pytest.raises(grpc.RpcError) as err:
                stub.Embed(pb.EmbedRequest(images=[_image(0)]), timeout=5)
            assert err.value.code() == UNAVAILABLE and "draining" in err.value.details()
        stopping.result(timeout=30)
        took = time.monotonic() - t0
        assert delay <= took < delay + 2.0
    finally:
        srv.close()


def test_clients_giving_up_are_counted_not_logged_as_errors(
    tiny_onnx: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Clients with tiny deadlines against a full queue: they give up before, during or after
    the RESOURCE_EXHAUSTED answer. Normal events: no ERROR log, and each call is counted with
    the code its client saw (a caller already gone is DEADLINE_EXCEEDED, not RESOURCE_EXHAUSTED)."""
    caplog.set_level(logging.DEBUG)
    srv = ServerThread(
        serve_config(tiny_onnx, max_batch_size=64, max_delay_ms=3000, max_queue=4, batching="delay")
    )
    seen: Counter[str] = Counter()
    lock = threading.Lock()

    latency = [0.0]  # how long a refusal takes here (a loaded machine is slower): set below

    def client(k: int) -> None:
        with grpc.insecure_channel(srv.target) as channel:
            stub = pb_grpc.EmbeddingServiceStub(channel)
            for i in range(100):
                # 0.3–3× the refusal's own latency: expires before, while or after the answer
                timeout = latency[0] * (0.3 + 2.7 * ((i * 7 + k) % 16) / 15)
                try:
                    stub.Embed(pb.EmbedRequest(images=[_image(2)] * 2), timeout=timeout)
                    code = "OK"
                except grpc.RpcError as exc:
                    code = exc.code().name
                with lock:
                    seen[code] += 1

    try:
        stub = pb_grpc.EmbeddingServiceStub(grpc.insecure_channel(srv.target))
        held = stub.Embed.future(pb.EmbedRequest(images=[_image(1)] * 3), timeout=30)
        end = time.monotonic() + 10
        while srv.server.metrics.queue_images._value.get() < 3:  # held in the queue 3 s
            assert time.monotonic() < end
            time.sleep(0.01)
        times: list[float] = []

        def calibrate() -> None:  # the refusal's latency with 8 callers, on this machine, now
            with grpc.insecure_channel(srv.target) as channel:
                probe = pb_grpc.EmbeddingServiceStub(channel)
                for _ in range(6):
                    t0 = time.monotonic()
                    with pytest.raises(grpc.RpcError):
                        probe.Embed(pb.EmbedRequest(images=[_image(2)] * 2), timeout=10)
                    with lock:
                        times.append(time.monotonic() - t0)

        probes = [threading.Thread(target=calibrate) for _ in range(8)]
        for t in probes:
            t.start()
        for t in probes:
            t.join(60)
        latency[0] = sorted(times[8:])[len(times[8:]) // 2]  # past the connection set-up
        refused_before = srv.server.metrics.request_counts()["RESOURCE_EXHAUSTED"]
        threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(held.result(timeout=30).embeddings) == 3
        time.sleep(0.3)  # the last calls are counted on the server's loop
        counts = srv.server.metrics.request_counts()
    finally:
        srv.close()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
    assert set(seen) <= {"RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"}, seen
    assert seen["RESOURCE_EXHAUSTED"] > 10 and seen["DEADLINE_EXCEEDED"] > 10, (seen, counts)
    # Every refusal a client saw was counted once; a counted refusal whose answer arrived after
    # its caller's deadline was seen as DEADLINE_EXCEEDED (how many is the machine's timing).
    refused = counts["RESOURCE_EXHAUSTED"] - refused_before
    seen_refused, seen_late = seen["RESOURCE_EXHAUSTED"], seen["DEADLINE_EXCEEDED"]
    assert seen_refused <= refused <= seen_refused + seen_late, (counts, seen)
    assert refused + counts["DEADLINE_EXCEEDED"] <= 800, (counts, seen)  # none counted twice
    assert counts["DEADLINE_EXCEEDED"] <= seen_late  # some never got there
    assert counts["OK"] == 1
