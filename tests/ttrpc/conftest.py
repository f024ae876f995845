from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from shimv2.ttrpc import Client, Server, open_unix_client, open_unix_listener
from shimv2.ttrpc.testing import InteropHandlers


@dataclass
class Served:
    path: str
    server: Server
    handlers: InteropHandlers


@pytest.fixture
async def served(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[Served]:
    """Our server with the interop service on a real unix socket."""
    handlers = InteropHandlers()
    server = Server([handlers.service()])
    path = str(tmp_path / "ttrpc.sock")
    listener = await open_unix_listener(path)
    await nursery.start(server.serve, listener)
    yield Served(path, server, handlers)
    await listener.aclose()


@pytest.fixture
async def client(served: Served) -> AsyncIterator[Client]:
    async with open_unix_client(served.path) as c:
        yield c
