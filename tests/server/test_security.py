"""Bearer-token auth (every RPC but health) and TLS, on real channels."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from simclr_embed.client import EmbeddingClient, EmbeddingError
from simclr_embed.pb.simclr.v1 import embedding_pb2 as pb
from simclr_embed.pb.simclr.v1 import embedding_pb2_grpc as pb_grpc
from tests.server.conftest import ServerThread, photo, serve_config

TOKEN = "s3cret-token"
IMAGE = np.asarray(photo(32, 32))


@pytest.fixture(scope="module")
def auth_server(tiny_onnx: Path) -> Iterator[ServerThread]:
    srv = ServerThread(serve_config(tiny_onnx, auth_token=TOKEN))
    yield srv
    srv.close()


@pytest.mark.parametrize(
    "metadata",
    [(), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),), (("x-token", TOKEN),)],
    ids=["none", "wrong", "no-bearer-prefix", "other-header"],
)
def test_embed_without_the_right_token_is_unauthenticated(
    auth_server: ServerThread, metadata: tuple[tuple[str, str], ...]
) -> None:
    stub = pb_grpc.EmbeddingServiceStub(grpc.insecure_channel(auth_server.target))
    for call, request in (
        (stub.Embed, pb.EmbedRequest()),
        (stub.GetModelInfo, pb.GetModelInfoRequest()),
    ):
        with pytest.raises(grpc.RpcError) as err:
            call(request, metadata=metadata, timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_reflection_needs_the_token_health_does_not(auth_server: ServerThread) -> None:
    channel = grpc.insecure_channel(auth_server.target)
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    ask = [reflection_pb2.ServerReflectionRequest(list_services="")]
    with pytest.raises(grpc.RpcError) as err:
        list(refl.ServerReflectionInfo(iter(ask), timeout=10))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    answers = list(
        refl.ServerReflectionInfo(
            iter(ask), timeout=10, metadata=(("authorization", f"Bearer {TOKEN}"),)
        )
    )
    assert answers[0].list_services_response.service
    health = health_pb2_grpc.HealthStub(channel)
    status = health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
    assert status == health_pb2.HealthCheckResponse.SERVING


def test_client_with_token(auth_server: ServerThread) -> None:
    with EmbeddingClient(auth_server.target, token=TOKEN) as client:
        assert client.embed([IMAGE]).shape == (1, 512)
    with (
        EmbeddingClient(auth_server.target, token="nope") as client,
        pytest.raises(EmbeddingError) as err,
    ):
        client.embed([IMAGE])
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    rejected = auth_server.server.metrics.registry.get_sample_value(
        "simclr_requests_total", {"code": "UNAUTHENTICATED", "protocol": "grpc"}
    )
    assert rejected is not None and rejected >= 1


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost/127.0.0.1 (openssl CLI; the venv has no cryptography)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("needs the openssl command to make a test certificate")
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return cert, key


def test_tls_with_token(tiny_onnx: Path, tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    srv = ServerThread(serve_config(tiny_onnx, tls_cert=cert, tls_key=key, auth_token=TOKEN))
    try:
        with EmbeddingClient(srv.target, token=TOKEN, tls=cert) as client:
            assert client.embed([IMAGE], kind="projection").shape == (1, 32)
            assert client.health() == "SERVING"
        # A plaintext client cannot talk to a TLS port.
        with (
            EmbeddingClient(srv.target, token=TOKEN, timeout=5) as client,
            pytest.raises(EmbeddingError) as err,
        ):
            client.embed([IMAGE])
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        srv.close()


def test_embed_cli_token_from_flag_or_env(
    auth_server: ServerThread,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from PIL import Image

    from simclr_embed.cli import main as simclr

    Image.fromarray(IMAGE).save(tmp_path / "a.png")
    args = [
        "embed",
        "--target",
        auth_server.target,
        "--no-progress",
        "--output",
        str(tmp_path / "o.npy"),
        str(tmp_path / "a.png"),
    ]
    monkeypatch.delenv("SIMCLR_AUTH_TOKEN", raising=False)
    assert simclr(args) == 1
    assert "the server wants a token" in capsys.readouterr().err
    assert simclr([*args, "--token", TOKEN]) == 0
    monkeypatch.setenv("SIMCLR_AUTH_TOKEN", TOKEN)
    assert simclr([*args, "--overwrite"]) == 0  # the same OUTPUT again
    assert np.load(tmp_path / "o.npy").shape == (1, 512)
