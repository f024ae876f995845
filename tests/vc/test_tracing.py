from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import trio
from opentelemetry.proto.trace.v1.trace_pb2 import Status

from shimv2.errdefs import NotFound
from shimv2.vc.api import VirtContainers
from shimv2.vc.config import Config, RuntimeConfig
from shimv2.vc.tracing import NoTracer, default_tracer, otlp_tracer
from tests.otlp import Collector


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


async def test_spans_reach_an_otlp_collector(tmp_path: Path, nursery: trio.Nursery) -> None:
    config = Config(runtime=RuntimeConfig(state_dir=str(tmp_path)))
    # Leaving the block shuts the tracer down first, which flushes the batch to the collector.
    with (
        Collector() as collector,
        otlp_tracer(collector.endpoint, {"kata_py.shim_id": "pod1"}) as tracer,
    ):
        vc = VirtContainers(nursery, config, tracer=tracer)
        assert await vc.list_sandbox() == []
        with pytest.raises(NotFound):
            await vc.status_sandbox("pod1")
    spans = collector.spans()
    assert spans["ListSandbox"] == ({}, Status.STATUS_CODE_UNSET)
    assert spans["StatusSandbox"] == ({"sandbox": "pod1"}, Status.STATUS_CODE_ERROR)
    resource = collector.resources()[0]
    assert resource["service.name"] == "kata-py"
    assert resource["kata_py.shim_id"] == "pod1"


async def test_an_absent_collector_costs_the_verbs_nothing(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    config = Config(runtime=RuntimeConfig(state_dir=str(tmp_path)))
    closed = Collector()  # bound, then closed: nothing listens on its port
    closed.server_close()
    with otlp_tracer(closed.endpoint, {}) as tracer:
        vc = VirtContainers(nursery, config, tracer=tracer)
        assert await vc.list_sandbox() == []
