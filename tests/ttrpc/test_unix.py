from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from shimv2.ttrpc import open_unix_listener, open_unix_stream


async def test_abstract_and_long_paths_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="abstract"):
        await open_unix_listener("\0kata-py")
    with pytest.raises(ValueError, match="longer"):
        await open_unix_stream(str(tmp_path / ("x" * 120)))


async def test_stale_socket_is_replaced_live_one_is_not(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()
    listener = await open_unix_listener(path)
    with pytest.raises(FileExistsError, match="already listening"):
        await open_unix_listener(path)
    await listener.aclose()


async def test_non_socket_file_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text("{}")
    with pytest.raises(FileExistsError, match="not a socket"):
        await open_unix_listener(str(path))
    assert path.read_text() == "{}"


async def test_mode_is_applied(tmp_path: Path) -> None:
    path = str(tmp_path / "m.sock")
    listener = await open_unix_listener(path, mode=0o660)
    assert os.stat(path).st_mode & 0o777 == 0o660
    await listener.aclose()
