"""The QMP bridge against a fake QEMU (a QMP server on a unix socket)."""

from __future__ import annotations

from pathlib import Path

import trio

from shimv2.vc.qmp import Qmp
from shimv2.vc.testing import FakeQmp


async def test_a_flood_of_events_does_not_grow_memory(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    # A guest makes QEMU send events (VSERPORT_CHANGE by opening and closing a
    # port); qemu.qmp's default listener would keep every one, queued and in history.
    qemu = FakeQmp(events_per_command=20000)
    path = str(tmp_path / "qmp.sock")
    await nursery.start(qemu.serve, path)
    qmp = Qmp("t")
    try:
        with trio.fail_after(60):
            await qmp.connect(path)
            assert await qmp.execute("query-status") == {}
            assert await qmp.execute("query-status") == {}
        assert qemu.commands == ["qmp_capabilities", "query-status", "query-status"]
        listener = qmp._client.events  # type: ignore[union-attr]  # the library's own
        assert len(listener.history) == 0
        assert listener.empty()
        assert qmp.events_seen == 40000  # counted, not kept
    finally:
        await qmp.aclose()
