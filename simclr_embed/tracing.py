"""OpenTelemetry tracing, off unless asked for (``--otlp-endpoint``; the SDK is the optional
``tracing`` extra, so the serve install carries none of it).

What is traced (docs/serving.md "Observability"):
- the server: one SERVER span per embedding call on every protocol, its parent the caller's W3C
  ``traceparent`` (gRPC metadata or an HTTP header); children ``decode``, ``queue`` and ``model``
  made after the fact from the times the request path measures anyway; one ``batch`` span per
  model call, *linked* to every request it served (a batch has many parents, so links, not a
  parent);
- ``simclr embed`` runs under one root span; :class:`simclr_embed.client.EmbeddingClient` puts
  the caller's current context (that span, or the application's own) into every call's
  metadata, so the server's spans join the caller's trace.

Off (the default), every helper returns at its first line: no SDK import, no span objects.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from typing import Any

from simclr_embed.errors import SimclrError

PROTOCOLS = ("grpc", "http")
_STATE: dict[str, Any] = {}  # "tracer", "provider" once set up
# (span name, the incoming headers/metadata) of the call being handled, set by each transport.
INCOMING: contextvars.ContextVar[tuple[str, Mapping[str, str]] | None] = contextvars.ContextVar(
    "simclr_incoming", default=None
)


def enabled() -> bool:
    return "tracer" in _STATE  # ("inject" alone is the client's cached import, not tracing)


def setup(
    service: str, endpoint: str | None, protocol: str = "grpc", sample_ratio: float = 1.0
) -> None:
    """Export spans to the OTLP collector at ``endpoint`` (``host:port`` for gRPC, a URL for
    HTTP); ``None`` leaves tracing off. ``sample_ratio``: the share of root traces kept (a
    caller's sampled flag is always followed)."""
    if endpoint is None or enabled():
        return
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    except ImportError:
        raise SimclrError(
            "--otlp-endpoint needs the OpenTelemetry SDK: pip install 'simclr-embed[tracing]'"
        ) from None
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=endpoint, insecure=not endpoint.startswith("https"))
    elif protocol == "http":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpExporter,
        )

        url = endpoint if "/v1/traces" in endpoint else endpoint.rstrip("/") + "/v1/traces"
        exporter = HttpExporter(endpoint=url if "://" in url else "http://" + url)
    else:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    provider = TracerProvider(
        resource=Resource.create({"service.name": service}),
        sampler=ParentBased(TraceIdRatioBased(sample_ratio)),
    )
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=500))
    _STATE["provider"] = provider
    _STATE["tracer"] = provider.get_tracer("simclr_embed")
    _STATE["trace"] = trace


def shutdown() -> None:
    """Send what is buffered and stop (the server's drain, the end of a job)."""
    provider = _STATE.pop("provider", None)
    for key in ("tracer", "trace"):
        _STATE.pop(key, None)
    if provider is not None:
        provider.shutdown()


def wall_ns(loop_time: float, now_loop: float) -> int:
    """A ``loop.time()`` instant as epoch nanoseconds (spans need wall-clock times)."""
    return time.time_ns() - int((now_loop - loop_time) * 1e9)


def _context(carrier: Mapping[str, str] | None) -> Any:
    if not carrier:
        return None
    from opentelemetry.propagate import extract

    return extract({k.lower(): v for k, v in carrier.items()})


def start_request(attributes: Mapping[str, Any]) -> Any:
    """The SERVER span of the call the transport put in :data:`INCOMING`; None when off."""
    if not enabled():
        return None
    incoming = INCOMING.get()
    name, carrier = incoming if incoming is not None else ("embed", None)
    trace = _STATE["trace"]
    return _STATE["tracer"].start_span(
        name, context=_context(carrier), kind=trace.SpanKind.SERVER, attributes=dict(attributes)
    )


def child(parent: Any, name: str, start_ns: int, end_ns: int, **attributes: Any) -> None:
    """A finished child span of ``parent`` over [start_ns, end_ns]."""
    if parent is None:
        return
    trace = _STATE["trace"]
    span = _STATE["tracer"].start_span(
        name, context=trace.set_span_in_context(parent), start_time=start_ns, attributes=attributes
    )
    span.end(end_time=end_ns)


def finish(span: Any, error: BaseException | None = None, **attributes: Any) -> None:
    if span is None:
        return
    for key, value in attributes.items():
        span.set_attribute(key, value)
    if error is not None:
        from opentelemetry.trace import Status, StatusCode

        span.set_status(Status(StatusCode.ERROR, str(error)))
        span.set_attribute("simclr.error", type(error).__name__)
    span.end()


def batch_span(served: Sequence[Any], start_ns: int, end_ns: int, images: int) -> None:
    """One model call, linked to the request spans it served."""
    if not enabled():
        return
    from opentelemetry.trace import Link

    links = [Link(s.get_span_context()) for s in served if s is not None]
    span = _STATE["tracer"].start_span(
        "batch", links=links, start_time=start_ns, attributes={"simclr.batch_images": images}
    )
    span.end(end_time=end_ns)


def inject_current(metadata: MutableMapping[str, str]) -> None:
    """Put the caller's current trace context (``traceparent``) into outgoing ``metadata``:
    ours when ``simclr embed`` traces, or the application's own OpenTelemetry setup around an
    :class:`EmbeddingClient` call. Nothing when neither has a span (or the API is absent)."""
    if "inject" not in _STATE:
        try:
            from opentelemetry.propagate import inject
        except ImportError:
            inject = None
        _STATE["inject"] = inject
    if _STATE["inject"] is not None:
        _STATE["inject"](metadata)


@contextlib.contextmanager
def root_span(name: str, **attributes: Any) -> Iterator[Any]:
    """The job's own span (``simclr embed``): every call it makes is under it."""
    if not enabled():
        yield None
        return
    with _STATE["tracer"].start_as_current_span(name, attributes=attributes) as span:
        yield span
