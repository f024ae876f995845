"""A small real service for tests and benchmarks, also served by our Go peer.

``kata_py.interop.v1.Interop`` uses only well-known protobuf types so the Go
program in tests/interop/go needs no generated code. Keep both in step.
"""

from __future__ import annotations

import trio
from google.protobuf.empty_pb2 import Empty
from google.protobuf.wrappers_pb2 import BytesValue, Int64Value, StringValue

from shimv2.errdefs import DeadlineExceeded, error_for
from shimv2.ttrpc._service import CallContext, Method, Service

INTEROP_SERVICE = "kata_py.interop.v1.Interop"
METADATA_KEY = "x-kata-test"


class InteropHandlers:
    """Echo, Fail, Sleep, Metadata and Blob, as the Go peer implements them."""

    def __init__(self) -> None:
        # Set once a Sleep was cancelled (by its deadline); tests wait on it.
        self.sleep_cancelled = trio.Event()

    async def echo(self, ctx: CallContext, req: BytesValue) -> BytesValue:
        return BytesValue(value=req.value)

    async def fail(self, ctx: CallContext, req: StringValue) -> Empty:
        code, _, message = req.value.partition(":")
        raise error_for(int(code), message)

    async def sleep(self, ctx: CallContext, req: Int64Value) -> Empty:
        try:
            await trio.sleep(req.value / 1000)
        except trio.Cancelled:
            self.sleep_cancelled.set()
            raise
        if ctx.deadline is not None and trio.current_time() >= ctx.deadline:
            raise DeadlineExceeded("deadline exceeded")
        return Empty()

    async def metadata(self, ctx: CallContext, req: Empty) -> StringValue:
        return StringValue(value=",".join(ctx.metadata.get(METADATA_KEY, ())))

    async def blob(self, ctx: CallContext, req: Int64Value) -> BytesValue:
        return BytesValue(value=b"x" * req.value)

    def service(self) -> Service:
        return Service(
            INTEROP_SERVICE,
            {
                "Echo": Method(BytesValue, self.echo),
                "Fail": Method(StringValue, self.fail),
                "Sleep": Method(Int64Value, self.sleep),
                "Metadata": Method(Empty, self.metadata),
                "Blob": Method(Int64Value, self.blob),
            },
        )
