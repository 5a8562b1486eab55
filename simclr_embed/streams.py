"""Output that can never cost a result: stdout/stderr whose reader has gone.

``simclr train … | tee train.log`` after Ctrl-C reached tee, a supervisor that died, a closed
terminal: every later write to the pipe fails with EPIPE (Python ignores SIGPIPE, so it is a
``BrokenPipeError``). Unguarded, the first progress line after that ends a training run before
it writes its checkpoint — or leaves it waiting on its DataLoader workers. :func:`guard_output`
wraps both streams so that such a write instead points the file descriptor at ``/dev/null``
(what a dead reader would have read) and the program goes on; every other error still raises.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from typing import Any, TextIO

_GONE = (errno.EPIPE, errno.ECONNRESET)


class GuardedStream:
    """Forwards to ``stream``; a write to a reader that has gone is dropped, once and for all."""

    def __init__(self, stream: TextIO, fd: int) -> None:
        self._stream, self._fd = stream, fd
        self.broken = False

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as exc:
            if not self._reader_gone(exc):
                raise
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as exc:
            if not self._reader_gone(exc):
                raise

    def _reader_gone(self, exc: OSError) -> bool:
        if exc.errno not in _GONE:
            return False
        if not self.broken:
            self.broken = True
            # Point the descriptor itself at /dev/null: buffered bytes, child processes, C
            # libraries and the interpreter's flush at exit all write there from now on.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._fd)
            os.close(devnull)
            with contextlib.suppress(OSError):  # what was buffered goes to /dev/null
                self._stream.flush()
        return True

    def __getattr__(self, name: str) -> Any:  # fileno, isatty, encoding, buffer, ...
        return getattr(self._stream, name)


def guard_output() -> None:
    """Wrap ``sys.stdout`` and ``sys.stderr`` (idempotent; streams without a file descriptor,
    such as a test's capture buffer, are left as they are)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is None or isinstance(stream, GuardedStream):
            continue
        try:
            fd = stream.fileno()
        except (AttributeError, OSError, ValueError):
            continue
        setattr(sys, name, GuardedStream(stream, fd))
