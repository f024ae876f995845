"""Sans-IO ttrpc codec: bytes in, events out; calls in, bytes out.

No I/O and no trio here (like h11's ``Connection``). A frame is a 10-byte
big-endian header ``length u32 | stream_id u32 | type u8 | flags u8`` followed
by ``length`` bytes of protobuf. A frame whose length passes the cap is never
buffered: the header is answered with a ``StreamError`` and its payload is
skipped as it arrives, so a hostile peer cannot make us allocate past the cap.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from enum import Enum, IntEnum, IntFlag
from typing import NamedTuple

from google.protobuf.message import DecodeError

from shimv2.errdefs import Code, ResourceExhausted
from shimv2.pb.google.rpc.status_pb2 import Status
from shimv2.pb.ttrpc.request_pb2 import KeyValue, Request, Response

HEADER = struct.Struct(">IIBB")
HEADER_LENGTH = HEADER.size
MAX_PAYLOAD = 4 << 20
_MAX_STREAM_ID = (1 << 32) - 1


class MessageType(IntEnum):
    REQUEST = 1
    RESPONSE = 2
    DATA = 3


class Flags(IntFlag):
    NONE = 0
    REMOTE_CLOSED = 0x1
    REMOTE_OPEN = 0x2
    NO_DATA = 0x4


class Role(Enum):
    CLIENT = "client"
    SERVER = "server"


class ProtocolError(Exception):
    """The connection cannot go on; close it."""


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol forbids."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol in a way that ends the connection."""


# NamedTuples, not dataclasses: the agent imports this under TCG, where each
# dataclass costs ~10 ms to build (and the dataclasses module more).
class RequestReceived(NamedTuple):
    stream_id: int
    request: Request
    flags: Flags


class ResponseReceived(NamedTuple):
    stream_id: int
    response: Response


class DataReceived(NamedTuple):
    stream_id: int
    payload: bytes
    flags: Flags


class StreamError(NamedTuple):
    """One frame was bad but the connection is fine: answer ``stream_id`` with this."""

    stream_id: int
    code: Code
    message: str


class ConnectionClosed(NamedTuple):
    """The peer closed its side cleanly, between frames (an empty tuple: falsy)."""


class NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = NeedData()

Event = RequestReceived | ResponseReceived | DataReceived | StreamError | ConnectionClosed


def encode_frame(stream_id: int, mtype: MessageType, flags: Flags, payload: bytes) -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ResourceExhausted(
            f"ttrpc: message length {len(payload)} exceeds maximum message size of {MAX_PAYLOAD}"
        )
    return HEADER.pack(len(payload), stream_id, mtype, flags) + payload


class Connection:
    """One end of a ttrpc connection.

    Feed received bytes with ``receive_data`` (``b""`` at EOF) and drain
    ``next_event`` until it returns ``NEED_DATA``. Build outgoing bytes with
    ``send_request`` (client), ``send_response`` (server) or ``send_data``.
    """

    def __init__(self, role: Role, max_payload: int = MAX_PAYLOAD) -> None:
        self.role = role
        self.max_payload = max_payload
        self._buf = bytearray()
        self._eof = False
        self._discard = 0
        self._broken: ProtocolError | None = None
        self._last_remote_stream = 0
        self._next_local_stream = 1

    # -- receiving -------------------------------------------------------

    @property
    def buffered(self) -> int:
        """Bytes held for a frame not yet complete."""
        return len(self._buf)

    def receive_data(self, data: bytes | bytearray) -> None:
        if self._eof and data:
            raise LocalProtocolError("data received after EOF")
        if not data:
            self._eof = True
            return
        if self._discard:
            skipped = min(self._discard, len(data))
            self._discard -= skipped
            data = data[skipped:]
        self._buf += data

    def next_event(self) -> Event | NeedData:
        if self._broken is not None:
            raise self._broken
        try:
            return self._next_event()
        except ProtocolError as exc:
            self._broken = exc
            raise

    def _next_event(self) -> Event | NeedData:
        while True:
            event = self._next_frame()
            if event is not None:
                return event

    def _next_frame(self) -> Event | NeedData | None:
        """The next event, or None for a frame that is dropped."""
        if self._discard or len(self._buf) < HEADER_LENGTH:
            return self._at_eof_or_need()
        length, stream_id, mtype, raw_flags = HEADER.unpack_from(self._buf)
        flags = Flags(raw_flags & 0x7)
        if length > self.max_payload:
            del self._buf[:HEADER_LENGTH]
            skipped = min(length, len(self._buf))
            del self._buf[:skipped]
            self._discard = length - skipped
            return StreamError(
                stream_id,
                Code.RESOURCE_EXHAUSTED,
                f"message length {length} exceeds maximum message size of {self.max_payload}",
            )
        if len(self._buf) < HEADER_LENGTH + length:
            return self._at_eof_or_need()
        payload = bytes(self._buf[HEADER_LENGTH : HEADER_LENGTH + length])
        del self._buf[: HEADER_LENGTH + length]
        return self._decode(stream_id, mtype, flags, payload)

    def _at_eof_or_need(self) -> ConnectionClosed | NeedData:
        if not self._eof:
            return NEED_DATA
        if self._buf or self._discard:
            raise RemoteProtocolError("connection closed in the middle of a frame")
        return ConnectionClosed()

    def _decode(self, stream_id: int, mtype: int, flags: Flags, payload: bytes) -> Event | None:
        if self.role is Role.SERVER:
            if mtype == MessageType.REQUEST:
                return self._decode_request(stream_id, flags, payload)
            if mtype == MessageType.DATA:
                return DataReceived(stream_id, payload, flags)
        else:
            if mtype == MessageType.RESPONSE:
                try:
                    return ResponseReceived(stream_id, Response.FromString(payload))
                except DecodeError as exc:
                    raise RemoteProtocolError(f"undecodable response: {exc}") from exc
            if mtype == MessageType.DATA:
                return DataReceived(stream_id, payload, flags)
        # ttrpc ignores frame types it does not expect; so do we.
        return None

    def _decode_request(self, stream_id: int, flags: Flags, payload: bytes) -> Event:
        if stream_id % 2 != 1:
            return StreamError(
                stream_id,
                Code.INVALID_ARGUMENT,
                "StreamID must be odd for client initiated streams",
            )
        if stream_id <= self._last_remote_stream:
            return StreamError(
                stream_id, Code.INVALID_ARGUMENT, "StreamID cannot be re-used and must increment"
            )
        self._last_remote_stream = stream_id
        try:
            request = Request.FromString(payload)
        except DecodeError as exc:
            return StreamError(stream_id, Code.INVALID_ARGUMENT, f"undecodable request: {exc}")
        return RequestReceived(stream_id, request, flags)

    # -- sending ---------------------------------------------------------

    def send_request(
        self,
        service: str,
        method: str,
        payload: bytes,
        *,
        timeout_nano: int = 0,
        metadata: Iterable[tuple[str, str]] = (),
    ) -> tuple[int, bytes]:
        """Allocate the next odd stream id and frame a unary request."""
        if self.role is not Role.CLIENT:
            raise LocalProtocolError("only a client sends requests")
        stream_id = self._next_local_stream
        if stream_id > _MAX_STREAM_ID:
            raise LocalProtocolError("stream ids exhausted; open a new connection")
        request = Request(
            service=service,
            method=method,
            payload=payload,
            timeout_nano=timeout_nano,
            metadata=[KeyValue(key=k, value=v) for k, v in metadata],
        )
        frame = encode_frame(
            stream_id, MessageType.REQUEST, Flags.NONE, request.SerializeToString()
        )
        self._next_local_stream += 2
        return stream_id, frame

    def send_response(self, stream_id: int, status: Status | None, payload: bytes = b"") -> bytes:
        """Frame a response; one too large for the cap becomes RESOURCE_EXHAUSTED."""
        if self.role is not Role.SERVER:
            raise LocalProtocolError("only a server sends responses")
        response = Response(payload=payload)
        if status is not None and status.code != Code.OK:
            response = Response(status=status)
        body = response.SerializeToString()
        if len(body) > self.max_payload:
            exhausted = Status(
                code=Code.RESOURCE_EXHAUSTED,
                message=f"response length {len(body)} exceeds maximum message size "
                f"of {self.max_payload}",
            )
            body = Response(status=exhausted).SerializeToString()
        return encode_frame(stream_id, MessageType.RESPONSE, Flags.NONE, body)

    def send_data(self, stream_id: int, payload: bytes, flags: Flags = Flags.NONE) -> bytes:
        return encode_frame(stream_id, MessageType.DATA, flags, payload)
