"""Table-driven and property tests of the sans-IO ttrpc codec."""

from __future__ import annotations

import struct
from typing import NamedTuple

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shimv2.errdefs import Code, ResourceExhausted
from shimv2.pb.google.rpc.status_pb2 import Status
from shimv2.pb.ttrpc.request_pb2 import Request, Response
from shimv2.ttrpc._codec import (
    HEADER_LENGTH,
    MAX_PAYLOAD,
    NEED_DATA,
    Connection,
    ConnectionClosed,
    DataReceived,
    Event,
    Flags,
    LocalProtocolError,
    MessageType,
    NeedData,
    ProtocolError,
    RemoteProtocolError,
    RequestReceived,
    ResponseReceived,
    Role,
    StreamError,
    encode_frame,
)


def frame(stream_id: int, mtype: int, payload: bytes, flags: int = 0) -> bytes:
    return struct.pack(">IIBB", len(payload), stream_id, mtype, flags) + payload


def drain(conn: Connection) -> list[Event]:
    events: list[Event] = []
    while not isinstance(event := conn.next_event(), NeedData):
        events.append(event)
        if isinstance(event, ConnectionClosed):
            break
    return events


def request_bytes(service: str = "svc", method: str = "M", payload: bytes = b"") -> bytes:
    return Request(service=service, method=method, payload=payload).SerializeToString()


@pytest.mark.parametrize(
    ("stream_id", "mtype", "flags", "payload", "wire"),
    [
        (1, MessageType.REQUEST, Flags.NONE, b"abc", b"\0\0\0\x03\0\0\0\x01\x01\x00abc"),
        (2, MessageType.RESPONSE, Flags.NONE, b"", b"\0\0\0\0\0\0\0\x02\x02\x00"),
        (
            0x01020304,
            MessageType.DATA,
            Flags.REMOTE_CLOSED | Flags.NO_DATA,
            b"",
            b"\0\0\0\0\x01\x02\x03\x04\x03\x05",
        ),
        (7, MessageType.DATA, Flags.REMOTE_OPEN, b"\xff", b"\0\0\0\x01\0\0\0\x07\x03\x02\xff"),
    ],
)
def test_header_is_ten_bytes_big_endian(
    stream_id: int, mtype: MessageType, flags: Flags, payload: bytes, wire: bytes
) -> None:
    assert HEADER_LENGTH == 10
    assert encode_frame(stream_id, mtype, flags, payload) == wire


def test_request_round_trip_fed_byte_by_byte() -> None:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    sid, wire = client.send_request(
        "containerd.task.v2.Task",
        "State",
        b"\x0a\x01x",
        timeout_nano=5_000_000,
        metadata=[("containerd-namespace-ttrpc", "default")],
    )
    assert sid == 1
    events: list[Event] = []
    for i in range(len(wire)):
        assert server.next_event() is NEED_DATA
        server.receive_data(wire[i : i + 1])
        events += drain(server)
    assert len(events) == 1
    event = events[0]
    assert isinstance(event, RequestReceived)
    assert event.stream_id == 1
    assert event.request.service == "containerd.task.v2.Task"
    assert event.request.method == "State"
    assert event.request.payload == b"\x0a\x01x"
    assert event.request.timeout_nano == 5_000_000
    assert [(kv.key, kv.value) for kv in event.request.metadata] == [
        ("containerd-namespace-ttrpc", "default")
    ]


def test_client_stream_ids_are_odd_and_increasing() -> None:
    client = Connection(Role.CLIENT)
    ids = [client.send_request("s", "m", b"")[0] for _ in range(4)]
    assert ids == [1, 3, 5, 7]


@pytest.mark.parametrize(
    ("ids", "expected"),
    [
        ([2], ["odd"]),
        ([1, 1], [None, "re-used"]),
        ([5, 3], [None, "re-used"]),
        ([1, 3, 0], [None, None, "odd"]),
        ([1, 3, 5], [None, None, None]),
    ],
)
def test_server_rejects_even_or_non_increasing_stream_ids(
    ids: list[int], expected: list[str | None]
) -> None:
    server = Connection(Role.SERVER)
    server.receive_data(b"".join(frame(i, MessageType.REQUEST, request_bytes()) for i in ids))
    events = drain(server)
    assert len(events) == len(ids)
    for sid, want, event in zip(ids, expected, events, strict=True):
        if want is None:
            assert isinstance(event, RequestReceived)
        else:
            assert isinstance(event, StreamError)
            assert event.code == Code.INVALID_ARGUMENT
            assert want in event.message
        assert event.stream_id == sid


def test_payload_at_the_cap_is_accepted() -> None:
    server = Connection(Role.SERVER)
    overhead = len(request_bytes(payload=b"x" * MAX_PAYLOAD)) - MAX_PAYLOAD
    body = request_bytes(payload=b"x" * (MAX_PAYLOAD - overhead - 1))
    # Varint lengths shrink with the payload; pad to exactly the cap.
    body = request_bytes(payload=b"x" * (MAX_PAYLOAD - overhead - 1 + MAX_PAYLOAD - len(body)))
    assert len(body) == MAX_PAYLOAD
    server.receive_data(frame(1, MessageType.REQUEST, body))
    (event,) = drain(server)
    assert isinstance(event, RequestReceived)
    assert len(event.request.payload) == MAX_PAYLOAD - overhead


def test_oversize_frame_is_skipped_without_buffering() -> None:
    server = Connection(Role.SERVER)
    length = MAX_PAYLOAD + 1
    server.receive_data(struct.pack(">IIBB", length, 1, MessageType.REQUEST, 0) + b"a" * 1000)
    (event,) = drain(server)
    assert isinstance(event, StreamError)
    assert (event.stream_id, event.code) == (1, Code.RESOURCE_EXHAUSTED)
    sent = 1000
    chunk = b"b" * 65536
    while sent < length:
        part = chunk[: length - sent]
        server.receive_data(part)
        sent += len(part)
        assert server.buffered == 0
        assert server.next_event() is NEED_DATA
    # The connection goes on with the next frame.
    server.receive_data(frame(3, MessageType.REQUEST, request_bytes(method="After")))
    (event,) = drain(server)
    assert isinstance(event, RequestReceived)
    assert event.request.method == "After"


def test_oversize_send_raises_and_keeps_stream_id() -> None:
    client = Connection(Role.CLIENT)
    with pytest.raises(ResourceExhausted):
        client.send_request("s", "m", b"x" * MAX_PAYLOAD)
    assert client.send_request("s", "m", b"")[0] == 1


def test_oversize_response_becomes_resource_exhausted() -> None:
    server = Connection(Role.SERVER)
    wire = server.send_response(1, None, b"x" * MAX_PAYLOAD)
    client = Connection(Role.CLIENT)
    client.receive_data(wire)
    (event,) = drain(client)
    assert isinstance(event, ResponseReceived)
    assert event.response.status.code == Code.RESOURCE_EXHAUSTED
    assert event.response.payload == b""


def test_response_carries_status_or_payload() -> None:
    server, client = Connection(Role.SERVER), Connection(Role.CLIENT)
    client.receive_data(server.send_response(1, None, b"ok"))
    client.receive_data(server.send_response(3, Status(code=5, message="gone"), b"ignored"))
    ok, failed = drain(client)
    assert isinstance(ok, ResponseReceived)
    assert isinstance(failed, ResponseReceived)
    assert ok.response == Response(payload=b"ok")
    assert (failed.response.status.code, failed.response.status.message) == (5, "gone")
    assert failed.response.payload == b""


def test_undecodable_request_is_a_stream_error() -> None:
    server = Connection(Role.SERVER)
    server.receive_data(frame(1, MessageType.REQUEST, b"\xff\xff\xff"))
    server.receive_data(frame(3, MessageType.REQUEST, request_bytes()))
    bad, good = drain(server)
    assert isinstance(bad, StreamError)
    assert bad.code == Code.INVALID_ARGUMENT
    assert isinstance(good, RequestReceived)


def test_unexpected_frame_types_are_ignored() -> None:
    server = Connection(Role.SERVER)
    junk = b"".join(frame(1, MessageType.RESPONSE, b"") for _ in range(20000))
    server.receive_data(junk + frame(9, 42, b"") + frame(1, MessageType.REQUEST, request_bytes()))
    (event,) = drain(server)
    assert isinstance(event, RequestReceived)


def test_data_frames_keep_their_flags() -> None:
    server = Connection(Role.SERVER)
    server.receive_data(frame(1, MessageType.DATA, b"chunk", Flags.REMOTE_CLOSED))
    (event,) = drain(server)
    assert event == DataReceived(1, b"chunk", Flags.REMOTE_CLOSED)


def test_clean_eof_and_truncated_eof() -> None:
    server = Connection(Role.SERVER)
    server.receive_data(b"")
    assert drain(server) == [ConnectionClosed()]

    server = Connection(Role.SERVER)
    server.receive_data(frame(1, MessageType.REQUEST, request_bytes())[:-1])
    server.receive_data(b"")
    with pytest.raises(RemoteProtocolError):
        server.next_event()
    with pytest.raises(RemoteProtocolError):  # stays broken
        server.next_event()


def test_roles_are_enforced() -> None:
    with pytest.raises(LocalProtocolError):
        Connection(Role.SERVER).send_request("s", "m", b"")
    with pytest.raises(LocalProtocolError):
        Connection(Role.CLIENT).send_response(1, None)
    conn = Connection(Role.SERVER)
    conn.receive_data(b"")
    with pytest.raises(LocalProtocolError):
        conn.receive_data(b"late")


requests = st.lists(
    st.tuples(st.text(max_size=30), st.text(max_size=30), st.binary(max_size=300)),
    min_size=1,
    max_size=8,
)


@given(requests, st.lists(st.integers(min_value=1, max_value=64), max_size=40))
def test_any_split_of_the_stream_decodes_the_same(
    calls: list[tuple[str, str, bytes]], cuts: list[int]
) -> None:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    wire = b"".join(client.send_request(s, m, p)[1] for s, m, p in calls)
    events: list[Event] = []
    pos = 0
    for cut in [*cuts, len(wire)]:
        server.receive_data(wire[pos : pos + cut])
        pos += cut
        events += drain(server)
        if pos >= len(wire):
            break
    got = [
        (e.request.service, e.request.method, e.request.payload)
        for e in events
        if isinstance(e, RequestReceived)
    ]
    assert got == calls


@pytest.mark.fuzz
@given(st.lists(st.binary(max_size=200), max_size=20), st.sampled_from([Role.CLIENT, Role.SERVER]))
def test_fuzz_decoder_only_raises_protocol_errors(chunks: list[bytes], role: Role) -> None:
    conn = Connection(role, max_payload=256)
    try:
        for chunk in [*chunks, b""]:
            conn.receive_data(chunk)
            drain(conn)
            assert conn.buffered <= HEADER_LENGTH + 256 + 200
    except ProtocolError:
        pass


# -- fuzzing: valid frames with corrupted headers, split anywhere ------------------------

FUZZ_CAP = 512  # a small cap, so that oversize lengths are common and cheap


class Corruption(NamedTuple):
    """Header fields to overwrite in one frame (None: keep)."""

    length: int | None
    stream_id: int | None
    mtype: int | None
    flags: int | None


u32 = st.one_of(
    st.sampled_from([0, 1, 2, FUZZ_CAP, FUZZ_CAP + 1, MAX_PAYLOAD, MAX_PAYLOAD + 1, 2**32 - 1]),
    st.integers(0, 2**32 - 1),
)
corruptions = st.builds(
    Corruption,
    st.none() | u32 | st.integers(0, 2 * FUZZ_CAP),
    st.none() | u32,
    st.none() | st.integers(0, 255),
    st.none() | st.integers(0, 255),
)


def corrupt(wire: bytes, c: Corruption) -> bytes:
    length, sid, mtype, flags = struct.unpack_from(">IIBB", wire)
    header = struct.pack(
        ">IIBB",
        length if c.length is None else c.length,
        sid if c.stream_id is None else c.stream_id,
        mtype if c.mtype is None else c.mtype,
        flags if c.flags is None else c.flags,
    )
    return header + wire[HEADER_LENGTH:]


def valid_frames(role: Role) -> st.SearchStrategy[bytes]:
    """Frames a well-behaved peer of ``role`` would send (requests to a server, responses
    and data to a client), before corruption."""
    body = st.binary(max_size=FUZZ_CAP // 2)
    if role is Role.SERVER:
        request = st.builds(
            lambda sid, svc, method, payload: frame(
                sid, MessageType.REQUEST, request_bytes(svc, method, payload)
            ),
            st.integers(0, 2**32 - 1),
            st.text(max_size=20),
            st.text(max_size=20),
            body,
        )
    else:
        request = st.builds(
            lambda sid, code, payload: frame(
                sid,
                MessageType.RESPONSE,
                Response(status=Status(code=code), payload=payload).SerializeToString(),
            ),
            st.integers(0, 2**32 - 1),
            st.integers(-(2**31), 2**31 - 1),
            body,
        )
    data = st.builds(
        lambda sid, flags, payload: frame(sid, MessageType.DATA, payload, flags),
        st.integers(0, 2**32 - 1),
        st.integers(0, 255),
        body,
    )
    return request | data


@st.composite
def hostile_streams(draw: st.DrawFn, role: Role) -> bytes:
    """Valid frames, some with corrupted headers, and some bytes of junk between them."""
    parts = []
    for wire in draw(st.lists(valid_frames(role), max_size=8)):
        if draw(st.booleans()):
            wire = corrupt(wire, draw(corruptions))
        parts.append(wire)
        if draw(st.integers(0, 9)) == 0:
            parts.append(draw(st.binary(max_size=20)))
    return b"".join(parts)


def split(wire: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(wire)) for c in cuts})
    return [wire[a:b] for a, b in zip([0, *points], [*points, len(wire)], strict=True) if b > a]


def feed_hostile(conn: Connection, chunks: list[bytes]) -> list[Event]:
    """Feed ``chunks`` then EOF; the decoder yields events or raises ProtocolError, and
    between chunks holds less than one frame at the cap."""
    events: list[Event] = []
    for chunk in [*chunks, b""]:
        conn.receive_data(chunk)
        events += drain(conn)
        # Drained: what is left is one incomplete frame no larger than the cap.
        assert conn.buffered < HEADER_LENGTH + conn.max_payload
    return events


@pytest.mark.fuzz
@given(
    st.sampled_from([Role.CLIENT, Role.SERVER]).flatmap(
        lambda role: st.tuples(st.just(role), hostile_streams(role))
    ),
    st.lists(st.integers(0, 4 * FUZZ_CAP), max_size=12),
)
def test_fuzz_corrupted_headers_yield_events_or_a_protocol_error(
    stream: tuple[Role, bytes], cuts: list[int]
) -> None:
    role, wire = stream
    conn = Connection(role, max_payload=FUZZ_CAP)
    try:
        events = feed_hostile(conn, split(wire, cuts))
    except ProtocolError:
        with pytest.raises(ProtocolError):  # and it stays broken
            conn.next_event()
        return
    assert events[-1] == ConnectionClosed()
    for event in events:
        if isinstance(event, StreamError):
            assert event.code in (Code.RESOURCE_EXHAUSTED, Code.INVALID_ARGUMENT)
        elif isinstance(event, RequestReceived):
            assert role is Role.SERVER
            assert event.stream_id % 2 == 1
        elif isinstance(event, ResponseReceived):
            assert role is Role.CLIENT
        elif isinstance(event, DataReceived):
            assert len(event.payload) <= FUZZ_CAP


@pytest.mark.fuzz
@given(
    st.lists(
        st.tuples(
            st.one_of(u32, st.integers(0, 2 * FUZZ_CAP)), st.integers(0, 255), st.integers(0, 255)
        ),
        min_size=1,
        max_size=6,
    ),
    st.integers(1, 3 * FUZZ_CAP),
)
def test_fuzz_oversize_lengths_are_skipped_not_buffered(
    headers: list[tuple[int, int, int]], chunk_size: int
) -> None:
    # Each frame announces its length and sends exactly that many bytes: a frame over the
    # cap is one StreamError and its bytes are dropped as they come, and the stream stays
    # in step. Lengths past what a test can send are capped at 3 caps (still oversize).
    conn = Connection(Role.SERVER, max_payload=FUZZ_CAP)
    expected_oversize = 0
    wire = bytearray()
    for length, mtype, flags in headers:
        sent = min(length, 3 * FUZZ_CAP)
        expected_oversize += sent > FUZZ_CAP
        wire += struct.pack(">IIBB", sent, 1, mtype, flags) + b"\xff" * sent
    chunks = [bytes(wire[i : i + chunk_size]) for i in range(0, len(wire), chunk_size)]
    try:
        events = feed_hostile(conn, chunks)
    except ProtocolError:
        raise AssertionError("complete frames must never break the connection") from None
    oversize = [
        e for e in events if isinstance(e, StreamError) and e.code == Code.RESOURCE_EXHAUSTED
    ]
    assert len(oversize) == expected_oversize
    assert events[-1] == ConnectionClosed()


@pytest.mark.fuzz
@given(st.integers(FUZZ_CAP + 1, 2**32 - 1), st.lists(st.integers(1, 4096), max_size=30))
def test_fuzz_a_huge_announced_length_never_grows_the_buffer(length: int, sizes: list[int]) -> None:
    conn = Connection(Role.SERVER, max_payload=FUZZ_CAP)
    conn.receive_data(struct.pack(">IIBB", length, 1, MessageType.REQUEST, 0))
    (event,) = drain(conn)
    assert isinstance(event, StreamError)
    assert event.code == Code.RESOURCE_EXHAUSTED
    received = 0
    for size in sizes:
        conn.receive_data(b"\0" * size)
        received += size
        events = drain(conn)
        # Until the announced length has passed, nothing is kept and nothing comes out.
        if received <= length:
            assert conn.buffered == 0
            assert events == []
