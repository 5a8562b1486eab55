"""Ports and addresses, said the way a user reads them (shared by the server, its HTTP port and a
``--processes`` group)."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path


def address(host: str, port: int) -> str:
    """``host:port``, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def why_not(host: str, port: int, exc: BaseException | None, flag: str = "--port") -> str:
    """Why a port could not be bound, in our words (gRPC's own reason is only in its log)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((host.strip("[]"), port))
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            return f"address already in use (another server on that port? choose another {flag})"
        return err.strerror or str(err)
    return str(exc) if exc else "refused the address"


def touch_atomically(path: Path) -> None:
    """Create ``path`` (holding this pid) in one step: a reader never sees it half written."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(f"{os.getpid()}\n")
    os.replace(tmp, path)
