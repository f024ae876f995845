from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import trio

from shimv2.errdefs import NotFound
from shimv2.vc.api import VirtContainers
from shimv2.vc.config import Config, RuntimeConfig
from shimv2.vc.tracing import NoTracer, default_tracer


class RecordingTracer:
    def __init__(self) -> None:
        self.spans: list[tuple[str, dict[str, str]]] = []

    @contextlib.contextmanager
    def span(self, name: str, attributes: Mapping[str, str]) -> Iterator[None]:
        self.spans.append((name, dict(attributes)))
        yield


async def test_every_verb_opens_a_span(tmp_path: Path, nursery: trio.Nursery) -> None:
    tracer = RecordingTracer()
    vc = VirtContainers(
        nursery, Config(runtime=RuntimeConfig(state_dir=str(tmp_path))), tracer=tracer
    )
    assert await vc.list_sandbox() == []
    with pytest.raises(NotFound):
        await vc.status_sandbox("pod1")
    with pytest.raises(NotFound):
        await vc.stop_sandbox("pod1")
    assert tracer.spans == [
        ("ListSandbox", {}),
        ("StatusSandbox", {"sandbox": "pod1"}),
        ("StopSandbox", {"sandbox": "pod1"}),
        ("FetchSandbox", {"sandbox": "pod1"}),
    ]


def test_default_tracer_works_with_or_without_opentelemetry() -> None:
    tracer = default_tracer()
    with tracer.span("X", {"a": "b"}):
        pass
    with NoTracer().span("Y", {}):
        pass
