"""``containerd-shim-kata-py-v2``: the binary containerd starts for io.containerd.kata-py.v2."""

from __future__ import annotations

import sys

from shimv2.cli import package_version

NOT_YET = (
    "containerd-shim-kata-py-v2: not yet available: the Task API shim is still being built "
    "(the shim issue); this binary cannot serve containerd yet"
)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args in (["-v"], ["--version"], ["-version"]):
        print(f"containerd-shim-kata-py-v2 {package_version()}")
        return 0
    # containerd parses start's stdout as an address; say nothing there.
    print(NOT_YET, file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
