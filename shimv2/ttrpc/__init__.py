"""ttrpc: containerd's lightweight RPC over unix sockets.

``_codec`` is the sans-IO protocol (no trio); the rest is a thin trio shell.
"""

from shimv2.ttrpc._client import Client as Client
from shimv2.ttrpc._client import open_client as open_client
from shimv2.ttrpc._client import open_unix_client as open_unix_client
from shimv2.ttrpc._codec import HEADER_LENGTH as HEADER_LENGTH
from shimv2.ttrpc._codec import MAX_PAYLOAD as MAX_PAYLOAD
from shimv2.ttrpc._server import CallContext as CallContext
from shimv2.ttrpc._server import CallObserver as CallObserver
from shimv2.ttrpc._server import Method as Method
from shimv2.ttrpc._server import Server as Server
from shimv2.ttrpc._server import Service as Service
from shimv2.ttrpc._server import same_user as same_user
from shimv2.ttrpc._status import error_from_status as error_from_status
from shimv2.ttrpc._status import status_from_exception as status_from_exception
from shimv2.ttrpc._transport import FdTransport as FdTransport
from shimv2.ttrpc._transport import SocketTransport as SocketTransport
from shimv2.ttrpc._transport import Transport as Transport
from shimv2.ttrpc._unix import PeerCredentials as PeerCredentials
from shimv2.ttrpc._unix import open_unix_listener as open_unix_listener
from shimv2.ttrpc._unix import open_unix_stream as open_unix_stream
from shimv2.ttrpc._unix import peer_credentials as peer_credentials
