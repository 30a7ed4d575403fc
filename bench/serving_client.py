"""The serving bench's client side without torch: the gRPC API driven on a schedule (one request per arrival, each
first token's hop stamps collected), and the per-run summary both paths share (bench/serving.py). Run as a program
it is a client worker: `python bench/serving_client.py ADDRESS` reads one schedule per line on stdin (JSON: a list of
[arrival_s, prompt_ids, output_len]) and writes each run's result as one JSON line, so that bench/serving.py can
drive the gRPC API from a process with other gRPC core settings than its own (--apis grpc-folio: Folio's, from
services/common/grpc_env.py) on the same schedule in the same run.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def pct(xs, q):
    return float(np.percentile(xs, q * 100)) if len(xs) else float("nan")


def summarize(times: dict[str, list[float]], arrivals: dict[str, float], t_end: float, t0: float) -> dict:
    ttft = [ts[0] - arrivals[r] for r, ts in times.items() if ts]
    itl = [b - a for ts in times.values() for a, b in zip(ts, ts[1:])]
    ntok = sum(len(ts) for ts in times.values())
    wall = t_end - t0
    return {"requests": len(times), "output_tokens": ntok, "wall_s": wall, "req_per_s": len(times) / wall,
            "tok_per_s": ntok / wall,
            "ttft_ms": {"p50": 1e3 * pct(ttft, 0.5), "p99": 1e3 * pct(ttft, 0.99)},
            "itl_ms": {"p50": 1e3 * pct(itl, 0.5), "p99": 1e3 * pct(itl, 0.99)},
            # per request, for paired differences (the same request on both paths)
            "per_request": {r: (1e3 * (ts[0] - arrivals[r]),) for r, ts in times.items() if ts}}



# The first token's way through the stack, hop by hop (docs/router.md): client stamps, then the router's
# and engine's (Timing.first_token_path), all on CLOCK_MONOTONIC. Each interval is named by its end.
HOPS = ("client.arrival", "client.sent", "router.handler", "router.endpoint", "router.received", "router.engine_call", "engine.received", "engine.admitted",
        "engine.scheduled", "engine.first_token", "engine.dequeued", "engine.sent", "router.engine_msg",
        "router.chunk_ready", "router.head", "router.sent", "client.received")


def hop_intervals(path: dict[str, int]) -> dict[str, float]:
    """ms between consecutive hops of one request's first-token path (those present), plus two off the
    token's path: the engine thread's admission -> add_request's return to the handler (the event loop's
    wake-up), and the engine call's start -> Redis's choice (choose-and-reserve, which runs beside the call)."""
    got = [h for h in HOPS if h in path]
    out = {f"{a}->{b}": (path[b] - path[a]) / 1e6 for a, b in zip(got, got[1:])}
    for a, b in (("engine.admitted", "engine.add_returned"), ("router.received", "router.chosen")):
        if a in path and b in path:
            out[f"{a}->{b}"] = (path[b] - path[a]) / 1e6
    return out


def hop_p50(paths: list[dict[str, int]]) -> dict[str, float]:
    per = [hop_intervals(p) for p in paths]
    keys = [k for k in dict.fromkeys(k for d in per for k in d)]
    return {k: pct([d[k] for d in per if k in d], 0.5) for k in keys}


async def _until_due(due: float) -> None:
    """Return at perf_counter() == due, on time: asyncio's timers wake on epoll's millisecond ticks (late by
    ~0.5 ms on average), so sleep to 2 ms before it, then yield until it."""
    if due - time.perf_counter() > 0.002:
        await asyncio.sleep(due - time.perf_counter() - 0.002)
    while time.perf_counter() < due:
        await asyncio.sleep(0)


def grpc_request(pb, common_pb2, rid: str, ids: list[int], out: int):
    return pb.GenerateRequest(request_id=rid, token_ids=pb.TokenIds(ids=ids),
                              params=common_pb2.SamplingParams(temperature=0, max_tokens=out, ignore_eos=True))


async def _one(stub, pb, common_pb2, rid, ids, out, times, router_timing=None, paths=None, due=None):
    """One request; `due`: its scheduled arrival (perf_counter), stamped as client.arrival. `ids` may be the
    request message itself, made before its arrival time (the client's own encoding is not the serving path's)."""
    req = ids if isinstance(ids, pb.GenerateRequest) else grpc_request(pb, common_pb2, rid, ids, out)
    ts = times[rid]
    path = {"client.sent": time.monotonic_ns()}
    if due is not None:  # perf_counter and monotonic are one clock on Linux; this keeps it exact elsewhere too
        path["client.arrival"] = path["client.sent"] - int((time.perf_counter() - due) * 1e9)
    async for m in stub.Generate(req, timeout=900):
        now = time.perf_counter()
        if not ts and any(c.token_ids for c in m.choices):
            path["client.received"] = time.monotonic_ns()
        for c in m.choices:
            ts.extend([now] * len(c.token_ids))
        if m.finished and router_timing is not None:  # as the router saw it: its TTFT, the engine's queue wait
            router_timing[rid] = (m.timing.time_to_first_token_ns / 1e6, m.timing.queue_ns / 1e6)
            path.update((s.hop, s.monotonic_ns) for s in m.timing.first_token_path)
    if paths is not None:
        path["rid"] = rid
        paths.append(path)


async def _drive(address, reqs) -> dict:
    import grpc

    from protos.gen.folio.v1 import common_pb2, router_pb2 as pb, router_pb2_grpc

    async with grpc.aio.insecure_channel(address) as ch:
        stub = router_pb2_grpc.RouterStub(ch)
        await _one(stub, pb, common_pb2, "warmup", [20, 21, 22], 4, {"warmup": []})
        times = {f"r{i}": [] for i in range(len(reqs))}
        router_timing: dict[str, tuple[float, float]] = {}
        paths: list[dict[str, int]] = []
        t0 = time.perf_counter()
        arrivals = {f"r{i}": t0 + at for i, (at, _, _) in enumerate(reqs)}

        async def later(i, at, ids, out):
            req = grpc_request(pb, common_pb2, f"r{i}", ids, out)
            await _until_due(t0 + at)
            await _one(stub, pb, common_pb2, f"r{i}", req, out, times, router_timing, paths, due=t0 + at)

        await asyncio.gather(*[later(i, *r) for i, r in enumerate(reqs)])
        res = summarize(times, arrivals, time.perf_counter(), t0)
        # Where a first token's time goes: client -> router and back (client TTFT less the router's), and the
        # router's own TTFT less the engine's queue wait (choose-and-reserve, the engine call, the step in
        # flight and the prefill, the way back).
        mine = {r: v[0] for r, v in res["per_request"].items()}
        res["ttft_split_ms_p50"] = {
            "client_router": pct([mine[r] - t[0] for r, t in router_timing.items() if r in mine], 0.5),
            "router_ttft": pct([t[0] for t in router_timing.values()], 0.5),
            "engine_queue": pct([t[1] for t in router_timing.values()], 0.5)}
        add_path_stats(res, paths)
        return res


def add_path_stats(res: dict, paths: list[dict[str, int]]) -> None:
    """The first token's way, hop by hop, and the "outside engine" share, from the requests' stamps; and the
    hops of the three slowest first tokens (where an outlier's time went)."""
    res["hops_ms_p50"] = hop_p50(paths)
    full = [p for p in paths if "client.received" in p and "client.arrival" in p]
    slow = sorted(full, key=lambda p: p["client.received"] - p["client.arrival"])[-3:]
    res["slowest_hops_ms"] = {p["rid"]: {k: round(v, 3) for k, v in hop_intervals(p).items()} for p in slow}
    # TTFT less the engine's own part (engine.received -> engine.first_token: the wait for a step
    # boundary, then admission to first token, which the in-process path has too): the hops' share,
    # per request, without the step-phase noise that the difference of two TTFT p50s carries.
    need = ("client.arrival", "client.received", "engine.received", "engine.first_token")
    res["outside_engine_ms_p50"] = pct([((p["client.received"] - p["client.arrival"])
                                         - (p["engine.first_token"] - p["engine.received"])) / 1e6
                                        for p in paths if all(k in p for k in need)], 0.5)


def worker(address: str) -> None:
    """Drive `address` with each schedule read from stdin; one JSON result line each on stdout."""
    sys.path.insert(0, str(ROOT))
    for line in sys.stdin:
        reqs = [tuple(r) for r in json.loads(line)]
        print(json.dumps(asyncio.run(_drive(address, reqs))), flush=True)


if __name__ == "__main__":
    worker(sys.argv[1])
