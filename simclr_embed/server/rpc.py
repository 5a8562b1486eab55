"""Ending an RPC: the failure the servicer raises, and aborting without noise when the caller
has already gone (shared by the unary and the streaming handlers)."""

from __future__ import annotations

import asyncio
import logging

import grpc

log = logging.getLogger(__name__)


class RpcFailure(Exception):
    """Ends the current RPC with ``code`` and ``details``."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


def caller_gone(context: grpc.aio.ServicerContext) -> bool:
    """The call's deadline has passed (grpc cancels it; an answer could no longer be sent)."""
    remaining = context.time_remaining()
    return remaining is not None and remaining <= 0


def gone_code(context: grpc.aio.ServicerContext) -> str:
    """What the caller saw when it went away: its own deadline, or a cancel."""
    return "DEADLINE_EXCEEDED" if caller_gone(context) else "CANCELLED"


async def abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, details: str) -> None:
    """``context.abort``, quiet when the call ended under us (client cancelled or timed out).

    Sending the status of a call the client has just abandoned fails inside grpc with an
    ``ExecuteBatchError`` that grpc logs at ERROR with a traceback; for a normal event (a client
    giving up) the answer is simply dropped, like a cancel.
    """
    try:
        await context.abort(code, details)
    except grpc.aio.AbortError:
        raise  # the normal way abort ends the handler
    except Exception as exc:
        log.debug("could not send %s (caller gone): %s", code.name, exc)
        raise asyncio.CancelledError from None
