"""``containerd-shim-kata-py-v2``: the binary containerd starts for io.containerd.kata-py.v2."""

from __future__ import annotations

import sys

from shimv2.shim import run


def main() -> int:
    return run()


if __name__ == "__main__":
    sys.exit(main())
