"""Host and guest code meet only in neutral modules, and the guest image holds all it imports."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "shimv2"


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """shimv2 modules ``path`` imports: statements anywhere (lazy ones too) and
    ``importlib.import_module("shimv2....")`` by name."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.update(re.findall(r"^shimv2(?:\.\w+)+$", node.value))
    return {name for name in found if name == "shimv2" or name.startswith("shimv2.")}


def _known(name: str, modules: set[str]) -> str | None:
    """The module ``name`` is (or ``from module import name`` names a module attribute of)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _agent_parts() -> list[str]:
    script = (ROOT / "scripts" / "build-guest").read_text()
    match = re.search(r'^AGENT_PARTS="([^"]+)"', script, re.M)
    assert match, "AGENT_PARTS not found in scripts/build-guest"
    return match.group(1).split()


def _files(parts: list[str]) -> set[Path]:
    files: set[Path] = set()
    for part in parts:
        path = ROOT / part
        files.update(path.rglob("*.py") if path.is_dir() else [path])
    return files


def test_host_code_never_imports_the_guests() -> None:
    for path in PACKAGE.rglob("*.py"):
        if path.is_relative_to(PACKAGE / "guest") or path.is_relative_to(PACKAGE / "pb"):
            continue
        guest = sorted(n for n in _imports(path) if n.startswith("shimv2.guest."))
        assert guest == [], f"{path.relative_to(ROOT)} imports {guest}: move it to a neutral module"


def test_the_guest_image_holds_every_module_the_agent_imports() -> None:
    every = {_module(p) for p in PACKAGE.rglob("*.py")}
    shipped = _files(_agent_parts())
    assert PACKAGE / "guest" / "agent.py" in shipped
    shipped_modules = {_module(p) for p in shipped}
    for path in shipped:
        if path.is_relative_to(PACKAGE / "pb"):
            continue  # generated: imports only its own package and protobuf's
        for name in _imports(path):
            module = _known(name, every)
            assert module is not None, f"{path.relative_to(ROOT)}: unknown import {name}"
            assert module in shipped_modules, (
                f"{path.relative_to(ROOT)} imports {module}, which scripts/build-guest leaves "
                "out of the guest (AGENT_PARTS)"
            )
