"""Per-process state: the init of a container and its execs.

Every lifecycle verb goes through one transition table (``TRANSITIONS``), so an
illegal verb fails the same way everywhere, with runc's wording ("cannot pause
task in created state"). A process also carries what Wait and the exit
watcher share: the exit status and time, and an event set once both the exit
and the drain of its output are recorded.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import UTC, datetime

import trio

from shimv2.errdefs import FailedPrecondition, NotFound
from shimv2.pb.containerd.types.task import task_pb2
from shimv2.task_service.stdio import ProcessIO, StdioConfig


class State(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    DELETED = "deleted"


class Verb(enum.Enum):
    START = "start"
    PAUSE = "pause"
    RESUME = "resume"
    EXIT = "exit"  # the process ended (observed, never requested)
    DELETE = "delete"
    KILL = "kill"  # no state change; legality only
    EXEC = "exec"  # add an exec to the init's container; legality only


S, V = State, Verb

# (is_init, state, verb) -> the state after the verb. Absent: illegal.
TRANSITIONS: dict[tuple[bool, State, Verb], State] = {
    # init
    (True, S.CREATED, V.START): S.RUNNING,
    (True, S.CREATED, V.KILL): S.CREATED,
    (True, S.CREATED, V.DELETE): S.DELETED,  # stopped first by the caller
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

STATUS: dict[State, task_pb2.Status] = {
    S.CREATED: task_pb2.CREATED,
    S.RUNNING: task_pb2.RUNNING,
    S.PAUSED: task_pb2.PAUSED,
    S.STOPPED: task_pb2.STOPPED,
    S.DELETED: task_pb2.STOPPED,
}


def check(is_init: bool, state: State, verb: Verb) -> State:
    """The state after ``verb``, or the error runc would give."""
    after = TRANSITIONS.get((is_init, state, verb))
    if after is not None:
        return after
    if state is S.DELETED:
        raise NotFound(f"{'task' if is_init else 'exec'} was deleted")
    if verb is V.KILL and state is S.STOPPED:
        raise NotFound("process already finished")
    kind = "task" if is_init else "exec"
    raise FailedPrecondition(f"cannot {verb.value} {kind} in {state.value} state")


@dataclass
class Process:
    """One process of a task; ``exec_id`` "" is the init."""

    container_id: str
    exec_id: str
    stdio: StdioConfig
    io: ProcessIO
    pid: int = 0
    state: State = S.CREATED
    exit_status: int = 0
    exited_at: datetime | None = None
    # Serialises this process's lifecycle verbs (start/pause/resume/delete).
    lock: trio.Lock = field(default_factory=trio.Lock)
    # Set when the exit (after the output drained) is recorded and published.
    exited: trio.Event = field(default_factory=trio.Event)
    # Set once Start succeeded: the exit watcher runs.
    started: bool = False
    # Set once vc reported the exit (its output may still be draining).
    ended: bool = False

    @property
    def is_init(self) -> bool:
        return self.exec_id == ""

    @property
    def id(self) -> str:
        """The id containerd uses in events: the exec id, or the container id."""
        return self.exec_id or self.container_id

    @property
    def status(self) -> task_pb2.Status:
        return STATUS[self.state]

    def check(self, verb: Verb) -> State:
        return check(self.is_init, self.state, verb)

    def transition(self, verb: Verb) -> None:
        self.state = self.check(verb)

    def record_exit(self, status: int, when: datetime | None = None) -> None:
        """The process ended: stopped, with its status and time (first call wins)."""
        if self.state in (S.STOPPED, S.DELETED):
            return
        self.state = self.check(V.EXIT)
        self.exit_status = status
        self.exited_at = when or datetime.now(UTC)

    async def wait(self) -> None:
        await self.exited.wait()
