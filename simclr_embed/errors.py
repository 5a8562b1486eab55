"""The one exception type that entry points turn into exit code 1 with a one-line reason."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence

from simclr_embed.streams import guard_output


class SimclrError(Exception):
    """A runtime failure the user can act on (missing folder, corrupt checkpoint, ...).

    Entry points catch it, print ``error: <message>`` on stderr and exit 1; anything else is a
    bug and keeps its traceback.
    """


def run_main(fn: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run a command's ``main``: ``SimclrError`` → exit 1 with ``error: <message>`` on stderr.

    Here, not in ``simclr_embed.cli``, so that every ``python -m simclr_embed.<stage>`` entry
    point uses it without importing the dispatcher above it.
    """
    guard_output()  # a reader that has gone never costs a checkpoint or a result
    try:
        return fn(argv)
    except SimclrError as exc:
        if any(getattr(h, "simclr_json", False) for h in logging.getLogger().handlers):
            logging.getLogger("simclr_embed").error("error: %s", exc)  # --log-format json
        else:
            print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
