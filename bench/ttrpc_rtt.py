#!/opt/kata-py/venv/bin/python
"""Unary ttrpc round trip: our trio client + server against Go's, in one run.

Each server runs in its own process, as in a shim. For every pairing we time
N sequential Echo calls (p50, p99, calls/s) and N calls from 16 concurrent
callers (calls/s), and print the ratios py/go. Needs build/bin/ttrpc-interop
(scripts/build-go-tools).

    bench/ttrpc_rtt.py [-n 5000] [--size 64] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio
from google.protobuf.wrappers_pb2 import BytesValue

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shimv2.ttrpc import Server, open_unix_client, open_unix_listener  # noqa: E402
from shimv2.ttrpc.testing import INTEROP_SERVICE, InteropHandlers  # noqa: E402

GO_BIN = ROOT / "build" / "bin" / "ttrpc-interop"
CONCURRENCY = 16


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _serve_forever(path: str) -> None:
    server = Server([InteropHandlers().service()])
    listener = await open_unix_listener(path)
    print("READY", flush=True)
    await server.serve(listener)


async def py_client(path: str, n: int, size: int, warmup: int) -> dict[str, float]:
    payload = BytesValue(value=b"x" * size)
    async with open_unix_client(path) as client:
        for _ in range(warmup):
            await client.call(INTEROP_SERVICE, "Echo", payload, BytesValue)
        times: list[float] = []
        for _ in range(n):
            t0 = time.perf_counter()
            await client.call(INTEROP_SERVICE, "Echo", payload, BytesValue)
            times.append(time.perf_counter() - t0)

        async def worker(count: int) -> None:
            for _ in range(count):
                await client.call(INTEROP_SERVICE, "Echo", payload, BytesValue)

        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(CONCURRENCY):
                nursery.start_soon(worker, n // CONCURRENCY)
        conc = (n // CONCURRENCY) * CONCURRENCY / (time.perf_counter() - t0)
    return {
        "p50_us": percentile(times, 0.50) * 1e6,
        "p99_us": percentile(times, 0.99) * 1e6,
        "seq_calls_per_s": n / sum(times),
        "conc_calls_per_s": conc,
    }


def go_client(path: str, n: int, size: int, warmup: int) -> dict[str, float]:
    out = subprocess.run(
        [
            str(GO_BIN),
            "bench",
            "-socket",
            path,
            "-n",
            str(n),
            "-size",
            str(size),
            "-warmup",
            str(warmup),
            "-concurrency",
            str(CONCURRENCY),
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return result


def start_server(kind: str, path: str) -> subprocess.Popen[bytes]:
    if kind == "go":
        cmd = [str(GO_BIN), "server", "-socket", path]
    else:
        cmd = [sys.executable, __file__, "--serve", path]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != b"READY":
        proc.kill()
        raise SystemExit(f"{kind} server did not start: {line!r}")
    return proc


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    assert proc.stdin is not None
    proc.stdin.close()
    proc.terminate()
    proc.wait(timeout=10)


def run_pair(client: str, server: str, n: int, size: int, tmp: str) -> dict[str, float]:
    path = f"{tmp}/{client}-{server}.sock"
    proc = start_server(server, path)
    try:
        warmup = max(100, n // 20)
        if client == "go":
            return go_client(path, n, size, warmup)
        return trio.run(py_client, path, n, size, warmup)
    finally:
        stop_server(proc)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=5000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--serve", metavar="PATH", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        with contextlib.suppress(KeyboardInterrupt):
            trio.run(_serve_forever, args.serve)
        return 0
    if not GO_BIN.exists():
        raise SystemExit(f"{GO_BIN} missing: run scripts/build-go-tools")

    pairs = [("py", "py"), ("go", "go"), ("go", "py"), ("py", "go")]
    runs: dict[tuple[str, str], list[dict[str, float]]] = {p: [] for p in pairs}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for client, server in pairs:
                runs[(client, server)].append(run_pair(client, server, args.n, args.size, tmp))
    keys = ["p50_us", "p99_us", "seq_calls_per_s", "conc_calls_per_s"]
    medians = {
        f"{c}->{s}": {k: statistics.median(r[k] for r in rs) for k in keys}
        for (c, s), rs in runs.items()
    }
    py, go = medians["py->py"], medians["go->go"]
    ratios = {
        "p50": py["p50_us"] / go["p50_us"],
        "p99": py["p99_us"] / go["p99_us"],
        "seq_calls_per_s": go["seq_calls_per_s"] / py["seq_calls_per_s"],
        "conc_calls_per_s": go["conc_calls_per_s"] / py["conc_calls_per_s"],
    }
    if args.json:
        print(
            json.dumps({"n": args.n, "size": args.size, "medians": medians, "py_over_go": ratios})
        )
        return 0
    print(f"ttrpc unary Echo, {args.size} B payload, n={args.n}, medians of {args.rounds} rounds")
    print(f"{'client->server':16} {'p50 us':>9} {'p99 us':>9} {'seq/s':>9} {'conc/s':>9}")
    for name, m in medians.items():
        print(
            f"{name:16} {m['p50_us']:9.1f} {m['p99_us']:9.1f} "
            f"{m['seq_calls_per_s']:9.0f} {m['conc_calls_per_s']:9.0f}"
        )
    print(
        f"py/go ratio: p50 {ratios['p50']:.2f}x, p99 {ratios['p99']:.2f}x, "
        f"sequential throughput {ratios['seq_calls_per_s']:.2f}x slower, "
        f"concurrent throughput {ratios['conc_calls_per_s']:.2f}x slower"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
