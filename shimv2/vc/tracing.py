"""Tracing: one span per public verb, through OpenTelemetry.

The tracer is passed in (no global). ``default_tracer`` goes through the
OpenTelemetry API's provider, which records nothing unless the process set one
up. With ``[runtime] enable_tracing`` the shim opens its own provider instead
(``otlp_tracer``), whose spans go to ``tracing_endpoint`` over OTLP/HTTP; that
needs the ``tracing`` extra (the OpenTelemetry SDK and exporter).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

from shimv2.errdefs import FailedPrecondition

SERVICE_NAME = "kata-py"
# Seconds the exporter may take per batch; spans are dropped after that, the shim never waits.
EXPORT_TIMEOUT = 5.0


class Tracer(Protocol):
    def span(
        self, name: str, attributes: Mapping[str, str]
    ) -> contextlib.AbstractContextManager[None]: ...


class OpenTelemetryTracer:
    def __init__(self, tracer: Any = None) -> None:
        if tracer is None:
            from opentelemetry import trace

            tracer = trace.get_tracer(SERVICE_NAME)
        self._tracer = tracer

    @contextlib.contextmanager
    def span(self, name: str, attributes: Mapping[str, str]) -> Iterator[None]:
        with self._tracer.start_as_current_span(name, attributes=dict(attributes)):
            yield


class NoTracer:
    @contextlib.contextmanager
    def span(self, name: str, attributes: Mapping[str, str]) -> Iterator[None]:
        yield


def default_tracer() -> Tracer:
    try:
        return OpenTelemetryTracer()
    except ImportError:  # the optional "tracing" extra is not installed
        return NoTracer()


@contextlib.contextmanager
def otlp_tracer(endpoint: str, resource: Mapping[str, str]) -> Iterator[Tracer]:
    """A tracer whose spans go to ``endpoint`` (OTLP/HTTP), flushed when the block ends.

    Spans are exported in batches from the SDK's own thread, so a slow or
    absent collector never holds up a verb.
    """
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise FailedPrecondition(
            "enable_tracing needs the OpenTelemetry SDK: pip install 'kata-py[tracing]'"
        ) from exc
    provider = TracerProvider(resource=Resource.create({"service.name": SERVICE_NAME, **resource}))
    exporter = OTLPSpanExporter(endpoint=endpoint, timeout=EXPORT_TIMEOUT)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    try:
        yield OpenTelemetryTracer(provider.get_tracer(SERVICE_NAME))
    finally:
        provider.shutdown()
