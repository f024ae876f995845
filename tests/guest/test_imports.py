"""The agent's start loads only what serving needs: under TCG every module counts
(``import trio`` alone was ~0.9 s, so the agent runs on asyncio), so what only some
requests use waits for them."""

from __future__ import annotations

from tests.imports import imported_by, loaded

# The agent's startup up to serving, as ``agent.run`` does it, minus the guest setup.
STARTUP = """
from shimv2.guest import agent
from shimv2.guest.testing import FakeGuestOS

options = agent.parse_options([], "kata_py.channel=serial", pid=2, ppid=1)
reaper = agent.make_reaper()
built = agent.build_agent(options, guest=FakeGuestOS(), reaper=reaper)
assert built.containers is not None
"""


def test_agent_startup_loads_no_module_its_first_request_does_not_need() -> None:
    modules = imported_by(STARTUP)
    assert {"shimv2.guest.containers", "shimv2.guest.process", "asyncio"} <= modules
    # No trio (nor the host's trio shell of ttrpc); argparse only for a command line (the
    # guest's init passes none); no dataclasses module (NamedTuples instead); the debug
    # console when asked for; descriptor_pb2 never (oci.py tells map fields by their container).
    assert not loaded(
        modules,
        "argparse",
        "dataclasses",
        "shimv2.guest.debug_console",
        "google.protobuf.descriptor_pb2",
        "trio",
        "shimv2.ttrpc._server",
        "shimv2.ttrpc._client",
        "shimv2.relay",
        "pyroute2",
    )


def test_the_agent_starts_without_ssl() -> None:
    # The guest image leaves out _ssl (scripts/build-guest): asyncio must do without it.
    modules = imported_by("import sys\nsys.modules['ssl'] = None\n" + STARTUP)
    assert "asyncio" in modules  # and imported_by saw the startup succeed
    assert not loaded(modules, "_ssl")


def test_the_command_line_still_parses() -> None:
    code = """
from shimv2.guest.agent import parse_options
opts = parse_options(["--runtime", "runc", "--no-guest-setup"], "kata_py.debug=1", pid=2, ppid=1)
assert (opts.runtime, opts.guest_setup, opts.debug) == ("runc", False, True), opts
"""
    assert "argparse" in imported_by(code)
