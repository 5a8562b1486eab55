"""OpenTelemetry traces against a real OTLP receiver: a gRPC ``TraceService`` built from the
``opentelemetry-proto`` stubs in this process, a real ``simclr serve --otlp-endpoint`` process,
real callers. Asserted: the caller's W3C ``traceparent`` (gRPC metadata, HTTP header) is the
parent of the server's span on every protocol; decode/queue/model are its children; the batch
span links to the requests it served; ``simclr embed --otlp-endpoint`` puts the servers' spans
under its own root span."""

from __future__ import annotations

import concurrent.futures
import json
import os
import secrets
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

pytest.importorskip("opentelemetry.sdk")
from opentelemetry.proto.collector.trace.v1 import (
    trace_service_pb2,
    trace_service_pb2_grpc,
)

from simclr_embed.pb.simclr.v1 import embedding_pb2 as pb
from simclr_embed.pb.simclr.v1 import embedding_pb2_grpc as pb_grpc
from tests.conftest import write_image_folder
from tests.server.conftest import REPO, ServerProcess, encode, photo

pytestmark = pytest.mark.slow
SERVER_KIND = 2  # opentelemetry.proto Span.SpanKind.SPAN_KIND_SERVER


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver keeping every span with its service name."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, Any]] = []
        self.lock = threading.Lock()

    def Export(self, request: Any, context: Any) -> Any:
        with self.lock:
            for rs in request.resource_spans:
                service = next(
                    (
                        a.value.string_value
                        for a in rs.resource.attributes
                        if a.key == "service.name"
                    ),
                    "",
                )
                for ss in rs.scope_spans:
                    self.spans += [(service, s) for s in ss.spans]
        return trace_service_pb2.ExportTraceServiceResponse()

    def wait(self, pred: Any, timeout: float = 20) -> list[tuple[str, Any]]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self.lock:
                found = [x for x in self.spans if pred(x)]
            if found:
                return found
            time.sleep(0.1)
        raise AssertionError(f"no such span; have {[s.name for _, s in self.spans]}")


@pytest.fixture(scope="module")
def receiver() -> Iterator[tuple[Receiver, int]]:
    rec = Receiver()
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(rec, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield rec, port
    server.stop(0)


@pytest.fixture(scope="module")
def traced_server(receiver: tuple[Receiver, int], tiny_onnx: Path) -> Iterator[tuple[int, int]]:
    _, otlp = receiver
    server = ServerProcess("--model", str(tiny_onnx), "--device", "cpu", "--port", "0",
                           "--http-port", "0", "--otlp-endpoint", f"127.0.0.1:{otlp}")  # fmt: skip
    try:
        port = server.wait_serving()
        http = int(server.log.split("HTTP on http://127.0.0.1:")[1].split("/")[0].split()[0])
        yield port, http
    finally:
        server.terminate()
        server.wait(30)


def _traceparent() -> tuple[str, bytes, bytes]:
    trace_id, span_id = secrets.token_bytes(16), secrets.token_bytes(8)
    return f"00-{trace_id.hex()}-{span_id.hex()}-01", trace_id, span_id


def _family(rec: Receiver, server_span: Any) -> dict[str, Any]:
    """The server span's children by name, and a batch span linking to it."""
    sid = server_span.span_id
    kids = rec.wait(lambda x: x[1].parent_span_id == sid and x[1].name == "model")
    children = {s.name: s for _, s in rec.spans if s.parent_span_id == sid}
    batch = rec.wait(
        lambda x: x[1].name == "batch" and any(link.span_id == sid for link in x[1].links)
    )
    assert kids
    return {**children, "batch": batch[0][1]}


def test_grpc_call_joins_the_callers_trace(receiver: tuple[Receiver, int], traced_server: tuple[int, int]) -> None:  # fmt: skip
    rec, _ = receiver
    port, _ = traced_server
    header, trace_id, parent = _traceparent()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        request = pb.EmbedRequest(kind=pb.EMBEDDING_KIND_FEATURES)
        request.images.add().encoded = encode(photo(40, 30), "PNG")
        stub.Embed(request, metadata=(("traceparent", header),), timeout=30)
    ((service, span),) = rec.wait(lambda x: x[1].trace_id == trace_id and x[1].kind == SERVER_KIND)
    assert service == "simclr-serve" and span.name == "simclr.v1.EmbeddingService/Embed"
    assert span.parent_span_id == parent
    family = _family(rec, span)
    assert {"decode", "queue", "model"} <= family.keys()
    for name in ("decode", "queue", "model"):  # inside the request's own span
        assert span.start_time_unix_nano - 5_000_000 <= family[name].start_time_unix_nano
        assert family[name].end_time_unix_nano <= span.end_time_unix_nano + 5_000_000


def test_http_call_joins_the_callers_trace(receiver: tuple[Receiver, int], traced_server: tuple[int, int]) -> None:  # fmt: skip
    rec, _ = receiver
    _, http = traced_server
    header, trace_id, parent = _traceparent()
    import base64

    body = json.dumps(
        {"model": "simclr", "input": [base64.b64encode(encode(photo(32, 32), "PNG")).decode()]}
    )
    req = urllib.request.Request(f"http://127.0.0.1:{http}/v1/embeddings", body.encode(),
                                 {"Content-Type": "application/json", "traceparent": header})  # fmt: skip
    assert urllib.request.urlopen(req, timeout=30).status == 200
    ((_, span),) = rec.wait(lambda x: x[1].trace_id == trace_id and x[1].kind == SERVER_KIND)
    assert span.name == "POST /v1/embeddings" and span.parent_span_id == parent
    assert "model" in _family(rec, span)


def test_simclr_embed_traces_the_job(receiver: tuple[Receiver, int], traced_server: tuple[int, int], tmp_path: Path) -> None:  # fmt: skip
    rec, otlp = receiver
    port, _ = traced_server
    data = write_image_folder(tmp_path / "data", per_class=4, size=16)
    proc = subprocess.run(
        [sys.executable, "-m", "simclr_embed.cli", "embed", "--target", f"127.0.0.1:{port}",
         "--output", str(tmp_path / "e.npy"), "--batch", "4", "--no-progress",
         "--otlp-endpoint", f"127.0.0.1:{otlp}", str(data)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ((_, root),) = rec.wait(lambda x: x[0] == "simclr-embed" and x[1].name == "simclr embed")
    served = rec.wait(lambda x: x[0] == "simclr-serve" and x[1].trace_id == root.trace_id)
    server_spans = [s for _, s in served if s.kind == SERVER_KIND]
    assert len(server_spans) >= 3  # 12 images in batches of 4 (a stream: one span per message)
    assert all(s.parent_span_id == root.span_id for s in server_spans)
