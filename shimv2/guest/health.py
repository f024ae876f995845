"""``grpc.Health``: Check answers SERVING while the agent serves; Version names it."""

from __future__ import annotations

from shimv2.guest.system import AGENT_VERSION
from shimv2.pb.kata import health_pb2
from shimv2.ttrpc import CallContext

# The Kata agent API version whose subset we speak (protos/kata/agent.proto).
GRPC_VERSION = "kata-agent-api-subset/ttrpc"


class HealthService:
    async def Check(
        self, ctx: CallContext, req: health_pb2.CheckRequest
    ) -> health_pb2.HealthCheckResponse:
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    async def Version(
        self, ctx: CallContext, req: health_pb2.CheckRequest
    ) -> health_pb2.VersionCheckResponse:
        return health_pb2.VersionCheckResponse(
            agent_version=AGENT_VERSION, grpc_version=GRPC_VERSION
        )
