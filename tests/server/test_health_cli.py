"""``simclr health`` and the wait before a bulk job: a real server, a closed port, a TLS server
reached in plaintext, a token server without the token, a URL given as --target (issue 20, 4 + 7)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from simclr_embed.cli import main as simclr
from simclr_embed.client import health
from simclr_embed.server import config as server_config
from tests.server.conftest import ServerThread, serve_config


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def test_health_says_serving_with_the_model_version(server: ServerThread, capsys) -> None:
    assert simclr(["health", "--target", server.target]) == 0
    out = capsys.readouterr().out.strip()
    version = server.server.runtime.info.model_version
    assert out == f"{server.target}: SERVING (model {version})"


def test_health_on_a_closed_port_fails_at_once_naming_the_cause(capsys) -> None:
    started = time.monotonic()
    assert simclr(["health", "--target", f"127.0.0.1:{_closed_port()}"]) == 1
    assert time.monotonic() - started < 10
    err = capsys.readouterr().err
    assert "connection refused" in err and err.count("\n") == 1, err


def test_a_url_target_gets_a_hint_not_a_minute_of_waiting(capsys) -> None:
    started = time.monotonic()
    code = simclr(["embed", "--target", "http://127.0.0.1:50099", "--output", "x.npy", "."])
    assert code == 1 and time.monotonic() - started < 5
    err = capsys.readouterr().err
    assert "not a URL" in err and "--target 127.0.0.1:50099" in err, err


def test_embed_says_why_while_waiting_then_gives_up_after_wait_s(tmp_path: Path) -> None:
    """A real `simclr embed` process against a closed port: the reason appears at once, the job
    ends after --wait-s with the same reason, exit 1."""
    port = _closed_port()
    img = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(img)
    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "simclr_embed.cli", "embed", "--target", f"127.0.0.1:{port}",
         "--wait-s", "3", "--no-progress", "--output", str(tmp_path / "o.npy"), str(img)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    took = time.monotonic() - started
    assert run.returncode == 1, run.stderr
    assert 3 <= took < 30
    lines = run.stderr.strip().splitlines()
    assert lines[0].startswith(f"waiting for 127.0.0.1:{port}") and "connection refused" in lines[0]
    assert lines[-1].startswith("error:") and "no SERVING server after 3 s" in lines[-1]
    assert "connection refused" in lines[-1]
    assert not (tmp_path / "o.npy").exists()


def test_token_problems_are_named_and_final(tiny_onnx: Path, capsys) -> None:
    srv = ServerThread(serve_config(tiny_onnx, auth_token="s3cret"))
    try:
        assert simclr(["health", "--target", srv.target]) == 1
        assert "wants a token" in capsys.readouterr().err
        assert simclr(["health", "--target", srv.target, "--token", "wrong"]) == 1
        assert "refused the token" in capsys.readouterr().err
        assert simclr(["health", "--target", srv.target, "--token", "s3cret"]) == 0
        started = time.monotonic()  # final: no point waiting out --wait-s
        with pytest.raises(health.SimclrError, match="wants a token"):
            health.wait_for_serving(srv.target, wait_s=30)
        assert time.monotonic() - started < 10
    finally:
        srv.close()


def test_the_token_variable_has_one_name_on_both_sides() -> None:
    assert health.TOKEN_ENV == server_config.TOKEN_ENV
