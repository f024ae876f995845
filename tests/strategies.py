"""Hypothesis strategies for the fuzz tests: protobuf messages built from their descriptors.

hypothesis-protobuf is not available; this covers what the fuzz tests need:
every scalar type at its full range (so out-of-range values are the handlers'
problem, as they would be on the wire), repeated fields, maps, enums (unknown
numbers too, as proto3 open enums allow) and nested messages to a bounded depth.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import Any, TypeVar

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import settings
from hypothesis import strategies as st

from shimv2.errdefs import Error, error_for
from shimv2.vc.testing import AGENT_SERVICE, RawReply, Reply

M = TypeVar("M", bound=Message)

MAX_DEPTH = 4
MAX_REPEATED = 3

_INT_RANGES: dict[int, tuple[int, int]] = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}

# Strings the handlers give meaning to, mixed in with arbitrary text: ids, paths, addresses.
INTERESTING_TEXT = (
    "", "c1", "e1", "sb", "/", "..", "../..", "/dev/null", "eth0", "lo",
    "10.0.0.1", "10.0.0.0/24", "::1", "fe80::/64", "default", "02:00:00:aa:bb:01",
    "virtiofs", "9p", "a" * 300, "x\x00y", "1.0.2", "2.0.0",
)  # fmt: skip


def texts(interesting: Sequence[str] = INTERESTING_TEXT) -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(interesting), st.text(max_size=40))


def _integers(lo: int, hi: int) -> st.SearchStrategy[int]:
    # The edges and small numbers are where bounds checks go wrong.
    edges = sorted({lo, hi, max(lo, -1), max(lo, 0), min(hi, 1)})
    small = st.integers(max(lo, -300), min(hi, 300))
    return st.one_of(st.sampled_from(edges), small, st.integers(lo, hi))


def _scalar(field: Any) -> st.SearchStrategy[Any]:
    t = field.type
    if t in _INT_RANGES:
        return _integers(*_INT_RANGES[t])
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return st.floats(width=32 if t == FieldDescriptor.TYPE_FLOAT else 64)
    if t == FieldDescriptor.TYPE_STRING:
        return texts()
    if t == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if t == FieldDescriptor.TYPE_ENUM:
        known = st.sampled_from([v.number for v in field.enum_type.values])
        if field.enum_type.is_closed:
            return known
        return st.one_of(known, st.integers(-(2**31), 2**31 - 1))
    raise AssertionError(f"no strategy for field type {t} of {field.full_name}")


def _is_map(field: Any) -> bool:
    return (
        field.type == FieldDescriptor.TYPE_MESSAGE
        and field.message_type.GetOptions().map_entry
        and bool(field.is_repeated)
    )


def _value(field: Any, depth: int) -> st.SearchStrategy[Any]:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return _fields(field.message_type, depth + 1)
    return _scalar(field)


# Descriptors are typed Any: in the stubs a field's message_type and enum_type are Optional,
# which they never are for a field of that type.
@cache
def _fields(desc: Any, depth: int) -> st.SearchStrategy[dict[str, Any]]:
    """A message as a dict of field values (``_fill`` makes it a message)."""
    if depth > MAX_DEPTH:
        return st.just({})
    optional: dict[str, st.SearchStrategy[Any]] = {}
    for field in desc.fields:
        if _is_map(field):
            key = field.message_type.fields_by_name["key"]
            value = field.message_type.fields_by_name["value"]
            optional[field.name] = st.dictionaries(
                _scalar(key), _value(value, depth), max_size=MAX_REPEATED
            )
        elif field.is_repeated:
            optional[field.name] = st.lists(_value(field, depth), max_size=MAX_REPEATED)
        else:
            optional[field.name] = _value(field, depth)
    return st.fixed_dictionaries({}, optional=optional)


def _fill(msg: Message, values: dict[str, Any]) -> None:
    desc: Any = msg.DESCRIPTOR
    for name, value in values.items():
        field = desc.fields_by_name[name]
        target = getattr(msg, name)
        if _is_map(field):
            value_field = field.message_type.fields_by_name["value"]
            for k, v in value.items():
                if value_field.type == FieldDescriptor.TYPE_MESSAGE:
                    _fill(target[k], v)
                else:
                    target[k] = v
        elif field.is_repeated:
            for v in value:
                if field.type == FieldDescriptor.TYPE_MESSAGE:
                    _fill(target.add(), v)
                else:
                    target.append(v)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            target.SetInParent()
            _fill(target, value)
        else:
            setattr(msg, name, value)


def messages(cls: type[M]) -> st.SearchStrategy[M]:
    """Valid instances of ``cls`` with arbitrary field values."""

    def build(values: dict[str, Any]) -> M:
        msg = cls()
        _fill(msg, values)
        return msg

    return _fields(cls.DESCRIPTOR, 0).map(build)


def messages_of(desc: Descriptor) -> st.SearchStrategy[Message]:
    return messages(GetMessageClass(desc))


def fuzz_settings(ci_examples: int) -> settings:
    """``ci_examples`` examples in the bounded run (slow examples: fewer than the profile's);
    the profile's count in a long one (KATA_PY_FUZZ, see tests/conftest.py)."""
    if settings.get_current_profile_name() == "long":
        return settings()
    return settings(max_examples=ci_examples)


# -- what a hostile guest agent answers --------------------------------------------------------

AGENT_RESPONSE_TYPES = sorted(
    {m.output_type.full_name: m.output_type for m in AGENT_SERVICE.methods}.values(),
    key=lambda d: d.full_name,
)


def hostile_replies(response_type: type[Message]) -> st.SearchStrategy[Message | Error]:
    """An agent's answer: a reply of the right type with any values, one of another type,
    bytes that may not decode, or an error status with any code and a text up to 4 KiB."""
    return st.one_of(
        messages(response_type),
        st.sampled_from(AGENT_RESPONSE_TYPES).flatmap(messages_of),
        st.binary(max_size=300).map(lambda b: RawReply(b).as_message()),
        st.builds(error_for, st.integers(0, 20), st.text(max_size=4096)),
    )


def reply_with(answer: Message | Error) -> Reply:
    """A FakeAgent reply function giving ``answer`` (raising it, if an error) to every call."""

    async def reply(request: Any) -> Message:
        if isinstance(answer, Error):
            raise answer
        return answer

    return reply
