"""Root in the guest attacks the host through the shared directory; the host must not change.

Each test runs a real sandbox (QEMU under TCG here, the real agent, real
virtiofsd) with the debug console, and plays root in the guest's own
namespaces through ``kata-py exec``: the strongest position a pod can reach.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from shimv2.vc.api import VirtContainers
from shimv2.vc.config import AgentConfig, Config, RuntimeConfig
from shimv2.vc.container import ContainerConfig
from shimv2.vc.sandbox import SandboxConfig
from tests.leaks import RecordingCgroups
from tests.mountinfo import mounted
from tests.vc.test_sandbox import container, host_cgroups, state_dir  # noqa: F401 - fixtures

pytestmark = pytest.mark.vm

SHARED = "/run/kata-containers/shared/containers"


@pytest.fixture
def host_victim(tmp_path: Path) -> Iterator[Path]:
    """Host files and a host mount that no guest may touch."""
    victim = tmp_path / "victim"
    victim.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "victim", str(victim)], check=True)
    (victim / "precious").write_text("keep")
    (victim / "dir").mkdir()
    (victim / "dir" / "also").write_text("keep")
    try:
        yield victim
    finally:
        subprocess.run(["umount", "-l", str(victim)], check=False)


def unchanged(victim: Path) -> bool:
    return (
        mounted(victim)
        and sorted(os.listdir(victim)) == ["dir", "precious"]
        and (victim / "precious").read_text() == "keep"
        and os.listdir(victim / "dir") == ["also"]
    )


@pytest.fixture
def config_file(state_dir: str, tmp_path: Path) -> Path:  # noqa: F811
    path = tmp_path / "c.toml"
    path.write_text(
        f'[runtime]\nstate_dir = "{state_dir}"\n[agent.kata]\ndebug_console_enabled = true\n'
    )
    return path


@pytest.fixture
async def vc(
    state_dir: str,  # noqa: F811
    nursery: trio.Nursery,
    host_cgroups: RecordingCgroups,  # noqa: F811
) -> VirtContainers:
    config = Config(
        runtime=RuntimeConfig(state_dir=state_dir),
        agent=AgentConfig(debug_console_enabled=True),
    )
    return VirtContainers(nursery, config, cgroups=host_cgroups)


async def as_guest_root(config: Path, sid: str, script: str) -> str:
    """Run ``script`` in a root shell of the pod's VM; returns what it printed."""
    bindir = sys.executable.rsplit("/", 1)[0]
    out = await trio.to_thread.run_sync(
        lambda: subprocess.run(
            [f"{bindir}/kata-py", "--config", str(config), "exec", sid],
            input=script + "\nexit 0\n",
            capture_output=True,
            text=True,
            timeout=180,
        )
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.replace("\r\n", "\n")


def with_binds(cfg: ContainerConfig, *binds: dict[str, Any]) -> ContainerConfig:
    return dataclasses.replace(cfg, spec={**cfg.spec, "mounts": [*cfg.spec["mounts"], *binds]})


def bind(source: Path, dest: str, *options: str) -> dict[str, Any]:
    return {"destination": dest, "type": "bind", "source": str(source), "options": [*options]}


async def test_root_in_the_guest_cannot_change_the_shared_tree(
    vc: VirtContainers, config_file: Path, tmp_path: Path, host_victim: Path
) -> None:
    data, conf = tmp_path / "data", tmp_path / "conf"
    data.mkdir()
    conf.mkdir()
    base = container(tmp_path, "c1", ["sleep", "1000"])
    rw, ro = len(base.spec["mounts"]), len(base.spec["mounts"]) + 1  # the binds' indexes
    c1 = with_binds(
        base,
        bind(data, "/data", "rbind", "rw"),
        bind(conf, "/conf", "rbind", "ro"),
    )
    s = f"sb{uuid.uuid4().hex[:8]}"
    await vc.run_sandbox(SandboxConfig(id=s, containers=(c1,)))
    v = host_victim
    # The attacks of the security review, each one's result on its own line.
    script = f"""
cd {SHARED} || exit 9
try() {{ "$@" 2>/dev/null && echo "$1: DONE" || echo "$1: refused"; }}
try mv c1 c1.x
try ln -s {v} c1-link
try ln -s {v} c2
try mkdir -p c2/mounts
try ln -s / c1/rootfs-link
try mv c1/rootfs c1/rootfs.x
try dd if=/dev/zero of=big bs=1M count=16
try touch c1/mounts/{ro}/x
try touch c1/mounts/{rw}/rw-ok
python3.11 -c '
import os
for name in ("trusted.overlay.opaque", "security.kata-py", "user.ok"):
    try:
        os.setxattr("c1/mounts/{rw}/rw-ok", name, b"y")
        print(name + ": DONE")
    except OSError as exc:
        print(name + ": refused", exc.errno)
'
"""
    out = await as_guest_root(config_file, s, script)
    for attack in ("mv", "ln", "mkdir", "dd", "touch (ro bind)"):
        lines = [line for line in out.splitlines() if line.startswith(attack.split()[0] + ":")]
        assert lines, out
        if attack.startswith("touch"):
            lines = lines[:1]  # the ro bind; the second touch is the rw volume
        assert all(line.endswith("refused") for line in lines), out
    assert "touch: DONE" in out  # the rw volume stays writable
    assert (data / "rw-ok").exists()
    assert not (conf / "x").exists()
    assert "trusted.overlay.opaque: refused 95" in out  # ENOTSUP
    assert "security.kata-py: refused 95" in out
    assert "user.ok: DONE" in out
    assert os.listxattr(data / "rw-ok") == ["user.ok"]

    # More containers while the guest keeps planting links where they will go.
    # os.symlink, not ln -s: ln puts the link inside an existing directory.
    racer = f"""
cat > /tmp/racer.py <<'EOF'
import os, time
planted, rounds, end = [], 0, time.monotonic() + 240
while not os.path.exists("/tmp/stop") and time.monotonic() < end:
    rounds += 1
    for c in ("c2", "c3"):
        for p in (c, c + "/rootfs", c + "/mounts/{rw}"):
            try:
                os.symlink("{v}", "{SHARED}/" + p)
                planted.append(p)
            except OSError:
                pass
with open("/tmp/race", "w") as f:
    f.write("".join("planted " + p + "\\n" for p in planted) + f"finished {{rounds}}\\n")
EOF
setsid python3.11 /tmp/racer.py </dev/null >/dev/null 2>&1 &
echo racing
"""
    assert "racing" in await as_guest_root(config_file, s, racer)
    for cid in ("c2", "c3"):
        cfg = with_binds(container(tmp_path, cid, ["true"]), bind(data, "/data", "rbind"))
        await vc.create_container(s, cfg)
        await vc.start_container(s, cid)
        with trio.fail_after(60):
            assert await (await vc.fetch_sandbox(s)).container(cid).wait() == 0
        await vc.delete_container(s, cid)
    wait = "touch /tmp/stop; until grep -q finished /tmp/race; do sleep 1; done; cat /tmp/race"
    race = await as_guest_root(config_file, s, wait)
    assert "planted" not in race
    rounds = re.findall(r"^finished (\d+)$", race, re.M)
    assert rounds, race
    assert int(rounds[0]) > 100  # it really raced the creates

    await vc.kill_container(s, "c1", 9)
    await vc.stop_sandbox(s)
    await vc.delete_sandbox(s)
    assert unchanged(v)
    assert sorted(os.listdir(data)) == ["rw-ok"]
