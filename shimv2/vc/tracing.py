"""Tracing: one span per public verb, through the OpenTelemetry API.

The tracer is passed in (no global); by default it is OpenTelemetry's, which
records nothing until an SDK and exporter are configured by the process.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Protocol


class Tracer(Protocol):
    def span(
        self, name: str, attributes: Mapping[str, str]
    ) -> contextlib.AbstractContextManager[None]: ...


class OpenTelemetryTracer:
    def __init__(self) -> None:
        from opentelemetry import trace

        self._tracer = trace.get_tracer("kata-py")

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
