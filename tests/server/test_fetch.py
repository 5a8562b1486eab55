"""``https://`` inputs with ``--fetch-hosts``: fetched from a real HTTPS server on loopback, and
every SSRF guard exercised (host list, scheme, a listed name resolving privately, redirects to
other hosts, size and time limits)."""

from __future__ import annotations

import http.server
import json
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server.conftest import ServerThread, encode, photo, serve_config
from tests.server.test_http import call, data_uri
from tests.server.test_security import _self_signed

JPEG = encode(photo(50, 40, seed=9), "JPEG", quality=90)
BIG = b"\xff" * 200_000


class _Images(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        port = self.server.server_address[1]
        if self.path == "/a.jpg":
            self._send(200, JPEG)
        elif self.path == "/big":
            self._send(200, BIG)
        elif self.path == "/slow":
            time.sleep(1.5)
            self._send(200, JPEG)
        elif self.path == "/same-host":
            self._send(302, b"", {"Location": "/a.jpg"})
        elif self.path == "/other-host":
            self._send(302, b"", {"Location": f"https://localhost:{port}/a.jpg"})
        else:
            self._send(404, b"")

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class _QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        pass  # the slow answer's client has gone (it timed out): expected


@pytest.fixture(scope="module")
def image_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    cert, key = _self_signed(tmp_path_factory.mktemp("tls"))
    server = _QuietServer(("127.0.0.1", 0), _Images)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], cert
    server.shutdown()
    server.server_close()


def test_fetch_hosts_fetch_and_refuse(
    tiny_onnx: Path, image_host: tuple[int, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    port, cert = image_host
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # trust the test host like a system CA
    srv = ServerThread(
        serve_config(
            tiny_onnx,
            http_port=0,
            fetch_hosts=("127.0.0.1", "localhost"),
            fetch_max_mb=0.1,
            fetch_timeout_s=0.5,
        )
    )
    url = f"http://127.0.0.1:{srv.server.http_port}/v1/embeddings"
    host = f"https://127.0.0.1:{port}"

    def embed(*inputs: str) -> tuple[int, dict[str, object]]:
        status, _, body = call(url, {"model": "simclr", "input": list(inputs)})
        return status, json.loads(body)

    try:
        status, fetched = embed(f"{host}/a.jpg", f"{host}/same-host", data_uri(JPEG))
        assert status == 200, fetched
        vectors = [d["embedding"] for d in fetched["data"]]  # type: ignore[index]
        assert vectors[0] == vectors[1] == vectors[2]  # fetched bytes = the bytes sent inline
        refusals = {
            f"https://localhost:{port}/a.jpg": "non-public address",  # listed name, private IP
            f"http://127.0.0.1:{port}/a.jpg": "only https",
            "https://10.1.2.3/a.jpg": "not in --fetch-hosts",
            f"{host}/other-host": "redirects to another host",
            f"{host}/big": "larger than",
            f"{host}/slow": "--fetch-timeout-s",
            f"{host}/missing": "HTTP 404",
        }
        for target, reason in refusals.items():
            status, body = embed(data_uri(JPEG), target)
            message = body["error"]["message"]  # type: ignore[index]
            assert status == 400 and message.startswith("image 1:"), (target, message)
            assert reason in message, (target, message)
    finally:
        srv.close()
