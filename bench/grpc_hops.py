"""The floor under the stack's hops: one message between two processes on this host, one way, over a raw
socket and over gRPC in each form the stack could use (asyncio or thread-pool server, TCP or unix socket,
a new call or a message on an open stream), paced like a serving workload's arrivals. Prints a table;
writes JSON to bench/results/.

    python bench/grpc_hops.py                    # ~20 s, no GPU needed (run it on the serving host)
    python bench/grpc_hops.py --n 100 --only raw aio-tcp

Each probe is stamped with CLOCK_MONOTONIC (one clock for every process on the host) where it is sent and
where the other process's code first sees it, so each direction is measured on its own:
- raw: a unix socket ping-pong, blocking reads (what a thread wake-up costs here); raw-spin: the reader
  polls instead of sleeping, so no wake-up is paid (the difference is the host's wake-up latency).
- call: a new unary-stream call, client stamp -> the server's handler starts (the router's Generate,
  the client -> router hop), and the handler's first message back -> the client reads it.
- stream: a message on a bidi stream opened earlier (the router <-> engine GenerateStream), each way.
- aio-tcp-gil: the server process also runs a thread that holds the GIL in 2 ms stretches, releasing it
  for 0.2 ms between them, as the engine's step thread does between its launches and its device waits.
- sync-tcp: grpc's thread-pool server; -nobdp: no BDP probe, no write buffering; -noee: gRPC core's
  EventEngine experiments off (GRPC_EXPERIMENTS) in both processes; -poll: GRPC_POLL_STRATEGY=poll;
  -spin: both event loops spin; -trickle: a message each way every ~1 ms on another stream (gRPC's
  threads kept busy); -defaults: the client's channel with grpc's own defaults (retries on, as the
  bench's client and most clients have), not the stack's options; aio-tcp-warm / -idle20: probes back to back / 20 ms apart;
  -sspin: the server's loop alone polls (as the router's); -sspin-pin: and its grpc.aio poller thread runs on a CPU
  an idle-priority spinner keeps from halting (router --poller-cpu); -sspin-awake: spinners on every CPU.
Probes are spaced --gap-ms apart (threads fall idle in between, as they do between a serving stack's
tokens; back-to-back probes would keep every core awake and hide the wake-ups).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
STAMP = struct.Struct("<q")
CALL = "/folio.bench.Hops/Call"
STREAM = "/folio.bench.Hops/Stream"
NOEE = {"GRPC_EXPERIMENTS": "-event_engine_client,-event_engine_listener,-event_engine_for_all_other_endpoints"}
# The stack's channel options (services/common/server.py) unless a variant names its own.
VARIANTS = {
    "raw": ("raw", "unix", {}),
    "raw-spin": ("raw-spin", "unix", {}),
    "aio-tcp": ("aio", "tcp", {}),
    "aio-unix": ("aio", "unix", {}),
    "aio-tcp-spin": ("aio-spin", "tcp", {}),
    "aio-unix-spin": ("aio-spin", "unix", {}),
    "aio-tcp-gil": ("aio-gil", "tcp", {}),
    "sync-tcp": ("sync", "tcp", {}),
    "aio-tcp-nobdp": ("aio", "tcp", {"grpc.http2.bdp_probe": 0, "grpc.http2.write_buffer_size": 0}),
    # gRPC core's EventEngine experiments off (GRPC_EXPERIMENTS, both processes), as the services run
    # (services/common/grpc_env.py); the variants without it run with gRPC's own defaults.
    "aio-tcp-noee": ("aio", "tcp", {}, NOEE),
    "aio-tcp-noee-spin": ("aio-spin", "tcp", {}, NOEE),
    "aio-tcp-noee-warm": ("aio", "tcp", {}, NOEE),
    "aio-tcp-poll": ("aio", "tcp", {}, {"GRPC_POLL_STRATEGY": "poll"}),
    # The router as it runs: its loop polls (the client's does not); then its grpc.aio poller thread on a CPU kept
    # from halting by an idle-priority spinner (router --poller-cpu), or every CPU kept so (--awake-cpus).
    "aio-tcp-noee-sspin": ("aio-sspin", "tcp", {}, NOEE),
    "aio-tcp-noee-sspin-pin": ("aio-sspin-pin", "tcp", {}, NOEE),
    "aio-tcp-noee-sspin-awake": ("aio-sspin-awake", "tcp", {}, NOEE),
    "aio-tcp-trickle": ("aio-trickle", "tcp", {}),
    "aio-tcp-defaults": ("aio", "tcp", None),
    "aio-tcp-warm": ("aio", "tcp", {}),
    "aio-tcp-idle20": ("aio", "tcp", {}),
}
OPTIONAL = ("aio-tcp-gil", "aio-tcp-poll")
"""Run only when named in --only (measured once on the CPU machine: the GIL's cost is known, poll no change)."""
GAP_MS = {"aio-tcp-warm": 0.0, "aio-tcp-noee-warm": 0.0, "aio-tcp-idle20": 20.0}
"""Variants probed at their own spacing (warm: back to back; idle20: 20 ms apart) instead of --gap-ms."""


def now_ns() -> int:
    return time.monotonic_ns()


# ---- server side (a child process: python bench/grpc_hops.py --serve KIND --address ADDR) ----------------

def serve_raw(path: str, spin: bool) -> None:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    print("ready", flush=True)
    conn, _ = srv.accept()
    conn.setblocking(not spin)
    while True:
        try:
            b = conn.recv(8)
        except BlockingIOError:
            continue
        if not b:
            return
        conn.sendall(STAMP.pack(now_ns()))


def _stream_reply(req: bytes) -> bytes:
    return STAMP.pack(now_ns()) + req


async def _spin() -> None:
    """Keep this event loop from sleeping in epoll (a diagnostic: what the loop's own wake-up costs)."""
    while True:
        await asyncio.sleep(0)


def _hold_gil(busy_s: float = 0.002, free_s: float = 0.0002) -> None:
    while True:
        end = time.perf_counter() + busy_s
        while time.perf_counter() < end:
            pass
        time.sleep(free_s)


def serve_aio(address: str, spin: bool, options: list, gil: bool = False, spinners: str = "") -> None:
    """`spinners`: "pin" (grpc.aio's poller thread on the last usable CPU, kept from halting), "awake" (every
    usable CPU kept from halting) (services/common/cpu_spinners.py; kept running throughout)."""
    import grpc

    async def call(req: bytes, ctx):
        t = now_ns()
        yield STAMP.pack(t) + STAMP.pack(now_ns())

    async def stream(it, ctx):
        async for req in it:
            t = now_ns()
            yield STAMP.pack(t) + STAMP.pack(now_ns())

    async def main():
        server = grpc.aio.server(options=options)
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("folio.bench.Hops", {
            "Call": grpc.unary_stream_rpc_method_handler(call),
            "Stream": grpc.stream_stream_rpc_method_handler(stream)})])
        server.add_insecure_port(address)
        await server.start()
        if spin:
            asyncio.get_running_loop().create_task(_spin())
        if gil:
            threading.Thread(target=_hold_gil, daemon=True).start()
        if spinners:
            from services.common.cpu_spinners import CpuSpinners, pin_grpc_poller

            cpu = max(os.sched_getaffinity(0))
            pin_grpc_poller(cpu)
            CpuSpinners({cpu} if spinners == "pin" else os.sched_getaffinity(0)).resume()
        print("ready", flush=True)
        await server.wait_for_termination()

    asyncio.run(main())


def serve_sync(address: str, options: list) -> None:
    import grpc

    def call(req: bytes, ctx):
        t = now_ns()
        yield STAMP.pack(t) + STAMP.pack(now_ns())

    def stream(it, ctx):
        for req in it:
            t = now_ns()
            yield STAMP.pack(t) + STAMP.pack(now_ns())

    server = grpc.server(futures.ThreadPoolExecutor(16), options=options)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("folio.bench.Hops", {
        "Call": grpc.unary_stream_rpc_method_handler(call),
        "Stream": grpc.stream_stream_rpc_method_handler(stream)})])
    server.add_insecure_port(address)
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()


# ---- client side ------------------------------------------------------------------------------------------

def probe_raw(path: str, n: int, gap_s: float, spin: bool) -> dict[str, list[float]]:
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(path)
    c.setblocking(not spin)
    fwd, back = [], []
    for i in range(n + 10):
        time.sleep(gap_s)
        t0 = now_ns()
        c.sendall(STAMP.pack(t0))
        while True:
            try:
                b = c.recv(8)
                break
            except BlockingIOError:
                continue
        t3 = now_ns()
        if i >= 10:  # the first probes warm both ends
            t1 = STAMP.unpack(b)[0]
            fwd.append((t1 - t0) / 1e3)
            back.append((t3 - t1) / 1e3)
    c.close()
    return {"fwd_us": fwd, "back_us": back}


async def _trickle(stream_call) -> None:
    """A message each way every ~1 ms on a stream of its own: keeps both processes' gRPC threads busy."""
    q: asyncio.Queue = asyncio.Queue()

    async def requests():
        while True:
            yield await q.get()

    replies = stream_call(requests()).__aiter__()
    while True:
        q.put_nowait(STAMP.pack(0))
        await replies.__anext__()
        await asyncio.sleep(0.0005)


async def probe_grpc(address: str, n: int, gap_s: float, spin: bool, options: list,
                     trickle: bool = False) -> dict[str, list[float]]:
    import grpc

    out = {"call_fwd_us": [], "call_back_us": [], "stream_fwd_us": [], "stream_back_us": []}
    async with grpc.aio.insecure_channel(address, options=options) as ch:
        call = ch.unary_stream(CALL)
        stream_call = ch.stream_stream(STREAM)
        spinner = asyncio.get_running_loop().create_task(_spin()) if spin else None
        trickler = asyncio.get_running_loop().create_task(_trickle(stream_call)) if trickle else None
        q: asyncio.Queue = asyncio.Queue()

        async def requests():
            while (item := await q.get()) is not None:
                yield item

        bidi = stream_call(requests())
        replies = bidi.__aiter__()
        for i in range(n + 10):
            await asyncio.sleep(gap_s)
            t0 = now_ns()
            async for r in call(STAMP.pack(t0), timeout=30):
                t3 = now_ns()
                t1, t2 = STAMP.unpack(r[:8])[0], STAMP.unpack(r[8:16])[0]
            if i >= 10:
                out["call_fwd_us"].append((t1 - t0) / 1e3)
                out["call_back_us"].append((t3 - t2) / 1e3)
            await asyncio.sleep(gap_s)
            t0 = now_ns()
            q.put_nowait(STAMP.pack(t0))
            r = await replies.__anext__()
            t3 = now_ns()
            t1, t2 = STAMP.unpack(r[:8])[0], STAMP.unpack(r[8:16])[0]
            if i >= 10:
                out["stream_fwd_us"].append((t1 - t0) / 1e3)
                out["stream_back_us"].append((t3 - t2) / 1e3)
        q.put_nowait(None)
        async for _ in replies:
            pass
        for t in (spinner, trickler):
            if t is not None:
                t.cancel()
    return out


def run_variant(name: str, n: int, gap_s: float, tmp: Path) -> dict:
    """One variant: its server and its client, each a process of its own (with the variant's environment)."""
    kind, transport, _ = VARIANTS[name][:3]
    gap_s = GAP_MS.get(name, gap_s * 1e3) / 1e3
    env = {**os.environ, **(VARIANTS[name][3] if len(VARIANTS[name]) > 3 else {})}
    if transport == "unix":
        sock = tmp / f"{name}.sock"
        address = str(sock) if kind.startswith("raw") else f"unix:{sock}"
    else:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
        s.close()
    me = [sys.executable, __file__, "--address", address, "--n", str(n), "--gap-ms", str(gap_s * 1e3)]
    proc = subprocess.Popen(me + ["--serve", name], stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    try:
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"{name}: the server did not start")
        out = subprocess.run(me + ["--client", name], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"{name}: the client failed: {out.stderr[-2000:]}")
        res = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        proc.kill()
        proc.wait()
    return {k: {"p50": float(np.percentile(v, 50)), "p90": float(np.percentile(v, 90)), "n": len(v)}
            for k, v in res.items()}


def client(name: str, address: str, n: int, gap_s: float) -> None:
    from services.common.server import CHANNEL_OPTIONS

    kind, _, extra = VARIANTS[name][:3]
    if kind.startswith("raw"):
        res = probe_raw(address, n, gap_s, spin=kind == "raw-spin")
    else:
        options = [] if extra is None else CHANNEL_OPTIONS + list(extra.items())  # None: grpc's own defaults
        res = asyncio.run(probe_grpc(address, n, gap_s, kind == "aio-spin", options,
                                     trickle=kind == "aio-trickle"))
    print(json.dumps(res))


def serve(name: str, address: str) -> None:
    from services.common.server import SERVER_OPTIONS

    kind, _, extra = VARIANTS[name][:3]
    options = SERVER_OPTIONS + list((extra or {}).items())
    if kind.startswith("raw"):
        serve_raw(address, spin=kind == "raw-spin")
    elif kind.startswith("aio"):
        serve_aio(address, kind in ("aio-spin", "aio-sspin", "aio-sspin-pin", "aio-sspin-awake"), options,
                  gil=kind == "aio-gil", spinners=kind.removeprefix("aio-sspin").removeprefix("-"))
    else:
        serve_sync(address, options)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200, help="probes per variant (each: a new call and a stream message)")
    ap.add_argument("--gap-ms", type=float, default=4.0, help="idle time before each probe")
    ap.add_argument("--only", nargs="+", choices=list(VARIANTS), default=None,
                    help="variants (default: all but those in OPTIONAL; the -spin ones only with 4 or more CPUs, "
                         "as they take a core)")
    ap.add_argument("--label", default="")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--serve", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--client", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--address", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.serve:
        serve(args.serve, args.address)
        return
    if args.client:
        client(args.client, args.address, args.n, args.gap_ms / 1e3)
        return
    host = {"cpus": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release(),
            "load_avg": os.getloadavg()}
    import grpc

    host["grpc"] = grpc.__version__
    print("host: " + ", ".join(f"{k} {v}" for k, v in host.items()), flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        names = args.only or [v for v in VARIANTS if v not in OPTIONAL and ("spin" not in v or (os.cpu_count() or 1) >= 4)]
        for name in names:
            results[name] = run_variant(name, args.n, args.gap_ms / 1e3, Path(tmp))
            print(f"{name:<18}" + "  ".join(f"{k} {v['p50']:.0f} (p90 {v['p90']:.0f})" for k, v in results[name].items()),
                  flush=True)
    print(f"\nOne-way latency, p50 (p90) in µs over {args.n} probes each, {args.gap_ms:g} ms apart. "
          "call_fwd: a new call to its handler; stream: a message on an open stream.")
    record = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "host": host,
              "command": "python bench/grpc_hops.py " + " ".join(sys.argv[1:]), "n": args.n, "gap_ms": args.gap_ms,
              "results": results}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    label = f"_{args.label}" if args.label else ""
    path = out / f"grpc_hops_{dt.date.today().isoformat()}{label}.json"
    path.write_text(json.dumps(record, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
