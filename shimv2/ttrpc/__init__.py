"""ttrpc: containerd's lightweight RPC over unix sockets.

``_codec`` is the sans-IO protocol and ``_service`` what a server is; neither
imports an event loop. The host's shell is on trio (the names below), the guest
agent's on asyncio (``shimv2.ttrpc.aio``). The trio names load on first use, so
that the guest, which imports this package for the codec, never loads trio.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from shimv2.ttrpc._codec import HEADER_LENGTH as HEADER_LENGTH
from shimv2.ttrpc._codec import MAX_PAYLOAD as MAX_PAYLOAD
from shimv2.ttrpc._service import CallContext as CallContext
from shimv2.ttrpc._service import CallObserver as CallObserver
from shimv2.ttrpc._service import Method as Method
from shimv2.ttrpc._service import PeerCredentials as PeerCredentials
from shimv2.ttrpc._service import Service as Service
from shimv2.ttrpc._service import peer_credentials as peer_credentials
from shimv2.ttrpc._service import same_user as same_user
from shimv2.ttrpc._status import error_from_status as error_from_status
from shimv2.ttrpc._status import status_from_exception as status_from_exception

if TYPE_CHECKING:
    from shimv2.ttrpc._client import Client as Client
    from shimv2.ttrpc._client import open_client as open_client
    from shimv2.ttrpc._client import open_unix_client as open_unix_client
    from shimv2.ttrpc._nonblocking import Transport as Transport
    from shimv2.ttrpc._server import Server as Server
    from shimv2.ttrpc._transport import FdTransport as FdTransport
    from shimv2.ttrpc._transport import SocketTransport as SocketTransport
    from shimv2.ttrpc._unix import open_unix_listener as open_unix_listener
    from shimv2.ttrpc._unix import open_unix_stream as open_unix_stream

_TRIO_SHELL = {
    "Client": "_client",
    "open_client": "_client",
    "open_unix_client": "_client",
    "Transport": "_nonblocking",
    "Server": "_server",
    "FdTransport": "_transport",
    "SocketTransport": "_transport",
    "open_unix_listener": "_unix",
    "open_unix_stream": "_unix",
}


def __getattr__(name: str) -> Any:
    module = _TRIO_SHELL.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
