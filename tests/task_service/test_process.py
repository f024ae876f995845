"""The process state machine: every (kind, state, verb), legal or not."""

from __future__ import annotations

import pytest

from shimv2.errdefs import FailedPrecondition, NotFound
from shimv2.pb.containerd.types.task import task_pb2
from shimv2.task_service.process import STATUS, TRANSITIONS, Process, State, Verb, check
from shimv2.task_service.stdio import ProcessIO, StdioConfig

S, V = State, Verb

LEGAL = {
    # init
    (True, S.CREATED, V.START): S.RUNNING,
    (True, S.CREATED, V.KILL): S.CREATED,
    (True, S.CREATED, V.DELETE): S.DELETED,
    (True, S.CREATED, V.EXIT): S.STOPPED,
    (True, S.RUNNING, V.PAUSE): S.PAUSED,
    (True, S.RUNNING, V.KILL): S.RUNNING,
    (True, S.RUNNING, V.EXEC): S.RUNNING,
    (True, S.RUNNING, V.EXIT): S.STOPPED,
    (True, S.PAUSED, V.RESUME): S.RUNNING,
    (True, S.PAUSED, V.KILL): S.PAUSED,
    (True, S.PAUSED, V.EXIT): S.STOPPED,
    (True, S.STOPPED, V.DELETE): S.DELETED,
    # exec
    (False, S.CREATED, V.START): S.RUNNING,
    (False, S.CREATED, V.DELETE): S.DELETED,
    (False, S.CREATED, V.EXIT): S.STOPPED,
    (False, S.RUNNING, V.KILL): S.RUNNING,
    (False, S.RUNNING, V.EXIT): S.STOPPED,
    (False, S.STOPPED, V.DELETE): S.DELETED,
}

ALL = [(i, s, v) for i in (True, False) for s in State for v in Verb]


def test_table_is_exactly_the_legal_set() -> None:
    assert TRANSITIONS == LEGAL


@pytest.mark.parametrize(("is_init", "state", "verb"), [k for k in ALL if k in LEGAL])
def test_legal(is_init: bool, state: State, verb: Verb) -> None:
    assert check(is_init, state, verb) is LEGAL[(is_init, state, verb)]


@pytest.mark.parametrize(("is_init", "state", "verb"), [k for k in ALL if k not in LEGAL])
def test_illegal(is_init: bool, state: State, verb: Verb) -> None:
    expected: type[Exception] = FailedPrecondition
    if state is S.DELETED or (verb is V.KILL and state is S.STOPPED):
        expected = NotFound
    with pytest.raises(expected):
        check(is_init, state, verb)


@pytest.mark.parametrize(
    ("is_init", "state", "verb", "message"),
    [
        (True, S.CREATED, V.PAUSE, "cannot pause task in created state"),
        (True, S.RUNNING, V.DELETE, "cannot delete task in running state"),
        (True, S.STOPPED, V.START, "cannot start task in stopped state"),
        (False, S.RUNNING, V.DELETE, "cannot delete exec in running state"),
        (False, S.STOPPED, V.KILL, "process already finished"),
    ],
)
def test_messages_read_like_runc(is_init: bool, state: State, verb: Verb, message: str) -> None:
    with pytest.raises((FailedPrecondition, NotFound)) as info:
        check(is_init, state, verb)
    assert str(info.value) == message


def test_every_state_has_a_containerd_status() -> None:
    assert STATUS[S.PAUSED] == task_pb2.PAUSED
    assert STATUS[S.STOPPED] == task_pb2.STOPPED
    assert set(STATUS) == set(State)


def _process(exec_id: str = "") -> Process:
    return Process("c1", exec_id, StdioConfig(), ProcessIO(StdioConfig()))


def test_record_exit_first_call_wins() -> None:
    p = _process()
    p.transition(V.START)
    p.record_exit(3)
    p.record_exit(9)
    assert (p.state, p.exit_status, p.status) == (S.STOPPED, 3, task_pb2.STOPPED)
    assert p.exited_at is not None


def test_ids_in_events() -> None:
    assert _process().id == "c1"
    assert _process("e1").id == "e1"
    assert _process().is_init
    assert not _process("e1").is_init
