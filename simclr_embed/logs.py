"""Logging for every command: ``--log-format text`` (a line per record, for people) or ``json``
(one JSON object per line, for log pipelines: ``time`` (UTC, ISO 8601), ``level``, ``logger``,
``message``, and ``request_id``/``trace_id``/``span_id`` when the record carries them, the
traceback under ``exception``).

The auth token never reaches a log line in either format: :class:`Redactor` replaces the value of
``$SIMCLR_AUTH_TOKEN`` (and a token given as a flag) and any ``Bearer …`` credential in every
record's final text.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import sys
from collections.abc import Sequence

FORMATS = ("text", "json")
TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
EXTRA_KEYS = ("request_id", "trace_id", "span_id")
_BEARER = re.compile(r"(?i)(bearer\s+)[^\s\"',;]+")


class Redactor(logging.Filter):
    """Masks credentials in the rendered message (args merged first, so none slip through)."""

    def __init__(self, secrets: Sequence[str | None] = ()) -> None:
        super().__init__()
        given = [os.environ.get("SIMCLR_AUTH_TOKEN"), *secrets]
        self.secrets = [t for t in given if t and len(t) >= 4]

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        clean = _BEARER.sub(r"\1***", text)
        for secret in self.secrets:
            clean = clean.replace(secret, "***")
        if clean != text:
            record.msg, record.args = clean, None
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in EXTRA_KEYS:
            value = getattr(record, key, None)
            if value is not None:
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure(
    log_format: str = "text",
    level: int | str = logging.INFO,
    datefmt: str | None = None,
    secrets: Sequence[str | None] = (),
) -> None:
    """Install one stderr handler in ``log_format`` on the root logger (replacing the one an
    earlier call installed); ``secrets``
    (a token given as a flag) are masked like ``$SIMCLR_AUTH_TOKEN``."""
    if log_format not in FORMATS:
        raise ValueError(f"log format must be one of {FORMATS}, got {log_format!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else logging.Formatter(TEXT, datefmt)
    )
    handler.addFilter(Redactor(secrets))
    handler.simclr = True  # type: ignore[attr-defined]  # ours: replaced on the next call
    handler.simclr_json = log_format == "json"  # type: ignore[attr-defined]  # errors.run_main
    root = logging.getLogger()
    for old in root.handlers[:]:  # others (a test harness's capture) stay
        if getattr(old, "simclr", False):
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
