"""Serving latency under load: the full stack (Redis, tokenizer, router, one engine) against the same engine
in-process, under Poisson arrivals at several rates, in one run. Prints a table; writes JSON to bench/results/.

    python bench/serving.py --shape llama-3-8b --rates 4 16 --requests 128 --runs 3      # on a GPU, ~8 min
    python bench/serving.py --shape llama-3-8b --rates 4 16 --requests 64 --runs 1 --max-wall-s 140 \
        --engine-variant 'si0.5=--switch-interval-ms 0.5'                                # bounded, one variant
    python bench/serving.py --model ~/.cache/folio/models/SmolLM2-135M-Instruct --device cpu --dtype float32 \
        --rates 4 16 --requests 64 --runs 5 --in-len 8 32 --out-len 4 12                # on CPU
    python bench/serving.py --shape tiny --device cpu --rates 4 --requests 16 --runs 1   # smoke test
    python bench/serving.py --shape llama-3-8b --rates 4 16 --requests 12 --runs 12 --in-len 32 255 --apis http \
        --max-mixed-graph-tokens 512 --max-num-seqs 32 --client-cpus 0-14 --max-wall-s 140   # the TTFT target, ~150 s

The model is a random-weight model of a real shape (load_format="dummy") whose vocabulary is the bundled
tokenizer's, so the stack's tokenizer can detokenize everything it generates; or, with --model, a real
model directory. Prompts are random token ids; each request asks for its own output length (ignore_eos).
Both paths see the same arrival schedule (seeded per run and rate), and each run measures the stack and
then the in-process engine at every rate, so slow drift of a shared machine falls on both.
`--detokenize both` also runs the stack with the router's old path (the tokenizer service's Detokenize
stream per engine message), so the in-process detokenizer's effect shows in the same run.

`--engine-variant NAME=FLAGS` runs the stack once more per variant with extra engine flags,
`--router-variant NAME=FLAGS` with extra router flags (or 'ENGINE FLAGS -- ROUTER FLAGS'; {tmp} in them is a
private directory, for unix sockets), and `--env-variant NAME=K=V,...` with extra environment for every
service (e.g. 'ee=GRPC_EXPERIMENTS=': gRPC's own defaults) (the in-process runs of the first serve them all;
a router variant of router flags alone runs on the default stack kept up, its router restarted: ~5 s, not a
stack's ~15);
`--max-mixed-graph-tokens N` caps both paths' mixed-step CUDA graphs and `--max-num-seqs N` their decode-step
graphs, for a shorter start; `--apis grpc http` drives each stack through its OpenAI-compatible HTTP API too (or
`--apis http` through it alone), in every run (rows NAME/http, either API first in turn), with the same hop
stamps (header x-folio-timing, docs/http.md);
`--apis ... grpc-folio` also drives the gRPC API from a client process with Folio's gRPC core settings (rows
NAME/grpc-folio; bench/serving_client.py), and `--side-router NAME=FLAGS` starts another router with extra flags
beside the stack's, on the same engine, driven in every run too (rows NAME+SIDE): A/Bs alternated within each run
(`--settle-s`: a pause after each side router's run, for what its router keeps up for a second after);
`--debug-gil-busy-ms` makes every engine step (both paths) hold the GIL first, as a GPU engine's kernel
launches do, to reproduce on a CPU what the stack's threads pay for it.

Reported per rate: time to first token (TTFT) and inter-token latency (ITL: gaps between a stream's
consecutive tokens) at p50 / p99, and what the hops add (stack minus in-process) per run, with the mean
over runs and its 95% confidence half-width (t distribution), so a difference can be told from noise; and the
statistic the TTFT target is judged by: p50 over every run's requests on the stack minus the same requests' p50
in-process, pooled, with a paired run-stratified bootstrap interval (bench/serving_stats.py; each run puts either
path first in turn);
and where the first token's time goes, hop by hop (Timing.first_token_path, docs/router.md), beside the
same engine hops of the in-process path.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import datetime as dt
import gc
import json
import math
import os
import platform
import shlex
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from serving_client import _drive, _until_due, add_path_stats, pct, summarize  # noqa: E402
from serving_stats import bootstrap_p50_diff, paired_runs  # noqa: E402
from throughput import SHAPES, write_config  # noqa: E402

ALL_CPUS = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
# Two-sided 95% t quantiles by degrees of freedom (runs - 1).
T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23}


def make_requests(n: int, rate: float, vocab: int, seed: int, in_len, out_len):
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, n))
    arrivals -= arrivals[0]
    ins = rng.integers(in_len[0], in_len[1] + 1, n)
    outs = rng.integers(out_len[0], out_len[1] + 1, n)
    return [(float(t), rng.integers(17, vocab, int(i)).tolist(), int(o)) for t, i, o in zip(arrivals, ins, outs)]



def engine_kwargs(args, model_dir) -> dict:
    kw = {"model": str(model_dir), "dtype": args.dtype, "device": args.device, "max_model_len": 1024,
          "max_num_seqs": args.max_num_seqs, "enable_prefix_caching": False}
    if args.device.startswith("cuda"):  # two engines share the GPU (the stack's and the in-process one)
        kw["num_kv_blocks"] = 4096
    if args.model is None:
        kw["load_format"] = "dummy"
    if args.max_mixed_graph_tokens is not None:  # fewer mixed-step graphs: a shorter start, on both paths alike
        kw["max_mixed_graph_tokens"] = args.max_mixed_graph_tokens
    return kw


class InProcess:
    """The same engine, stepped in this process: the baseline the hops are measured against."""

    def __init__(self, args, model_dir):
        from services.engine.engine import EngineConfig, LLMEngine

        self.engine = LLMEngine(EngineConfig(**engine_kwargs(args, model_dir), max_waiting_requests=None))
        if args.debug_gil_busy_ms:  # the same step as the stack's engine runs
            from services.engine.gil_debug import gil_busy_step

            self.engine.step = gil_busy_step(self.engine.step, args.debug_gil_busy_ms)
        self.run([(0.0, [20, 21, 22], 4)])  # warm-up

    def run(self, reqs) -> dict:
        from services.common.sampling_params import SamplingParams

        engine = self.engine
        times: dict[str, list[float]] = {}
        arrivals: dict[str, float] = {}
        late: dict[str, float] = {}  # how long after its arrival a request was added (the step boundary)
        paths: dict[str, dict[str, float]] = {}
        t0 = time.perf_counter()
        i = 0
        while i < len(reqs) or engine.has_unfinished_requests():
            now = time.perf_counter() - t0
            while i < len(reqs) and reqs[i][0] <= now:
                at, ids, out = reqs[i]
                rid = f"r{i}"
                engine.add_request(rid, None, SamplingParams(temperature=0, max_tokens=out, ignore_eos=True),
                                   prompt_token_ids=ids)
                arrivals[rid] = t0 + at
                late[rid] = now - at
                times[rid] = []
                i += 1
            if not engine.has_unfinished_requests():
                time.sleep(max(0.0, reqs[i][0] - (time.perf_counter() - t0)))
                continue
            outs = engine.step()
            stamp = time.perf_counter()
            for d in outs:  # token deltas: stamp each new token of the first sequence
                ts = times[d.request_id]
                if not ts and d.first_token_time is not None:
                    paths[d.request_id] = {"engine.admitted": d.arrival_time, "engine.scheduled": d.first_scheduled_time,
                                           "engine.first_token": d.first_token_time, "step_returned": time.monotonic()}
                ts.extend([stamp] * sum(len(s.token_ids) for s in d.sequences if s.index == 0))
        res = summarize(times, arrivals, time.perf_counter(), t0)
        # TTFT less the engine's own part (the wait for a step boundary, then admission to first token):
        # what is left is the delivery (here: the step's return), the part the stack adds hops to.
        res["outside_engine_ms_p50"] = pct([res["per_request"][r][0] - 1e3 * late[r]
                                            - 1e3 * (p["engine.first_token"] - p["engine.admitted"])
                                            for r, p in paths.items() if r in res["per_request"]], 0.5)
        # The same hops as the stack's where they exist: arrival -> added (the wait for a step boundary),
        # added -> first scheduled, -> first token out of its step, -> the step returned.
        order = ("engine.admitted", "engine.scheduled", "engine.first_token", "step_returned")
        hops = {"arrival->engine.admitted": pct([1e3 * late[r] for r in paths], 0.5)}
        for a, b in zip(order, order[1:]):
            hops[f"{a}->{b}"] = pct([1e3 * (p[b] - p[a]) for p in paths.values() if p[a] and p[b]], 0.5)
        res["hops_ms_p50"] = hops
        return res




class HttpStreams:
    """OpenAI-style streamed completions over keep-alive HTTP/1.1 connections (asyncio streams, no client
    library in the way): a pool of connections, one request at a time on each, as an HTTP client does.
    Each request asks for the router's first-token stamps (header x-folio-timing; docs/http.md)."""

    IDLE_S = 4.0
    """A pooled connection idle longer is replaced before use: uvicorn closes one idle for 5 s (its keep-alive
    timeout), and a request written to a connection the server is closing gets no answer."""

    def __init__(self, address: str):
        self.host, port = address.rsplit(":", 1)
        self.port = int(port)
        self.free: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []  # (..., last used)

    async def _connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        while self.free:
            r, w, used = self.free.pop()
            if time.monotonic() - used < self.IDLE_S and not r.at_eof():
                return r, w
            w.close()
        return await asyncio.open_connection(self.host, self.port)

    async def events(self, body: dict | bytes, sent: dict | None = None):
        """The stream's events (parsed JSON), until [DONE]. `sent["client.sent"]`: stamped as the request is
        written (a connection the pool lacked is opened first, as a client's pool does at its start). `body`:
        the request's JSON, or its bytes made ahead."""
        r, w = await self._connection()
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        if sent is not None:
            sent["client.sent"], sent["perf"] = time.monotonic_ns(), time.perf_counter()
        w.write(b"POST /v1/completions HTTP/1.1\r\nhost: %s\r\ncontent-type: application/json\r\n"
                b"x-folio-timing: 1\r\ncontent-length: %d\r\n\r\n" % (self.host.encode(), len(data)) + data)
        head = await r.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"HTTP: {head.decode(errors='replace').splitlines()[0]}")
        buf, done = b"", False
        while True:
            size = int((await r.readline()).split(b";")[0].strip(), 16)  # chunked transfer encoding
            if size == 0:
                await r.readline()
                break
            buf += (await r.readexactly(size + 2))[:-2]
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                payload = event.removeprefix(b"data: ")
                if payload == b"[DONE]":
                    done = True
                elif not done:
                    yield json.loads(payload)
        self.free.append((r, w, time.monotonic()))

    async def open(self, n: int) -> None:
        """Open `n` connections ahead (a client's pool, warm before the measured requests)."""
        for _ in range(n - len(self.free)):
            self.free.append((*await asyncio.open_connection(self.host, self.port), time.monotonic()))

    def close(self) -> None:
        for _, w, _ in self.free:
            w.close()


def http_body(model: str, ids: list[int], out: int) -> bytes:
    """A streamed completion's request body (made before its arrival time, as `_one`'s message is: the client's
    own encoding is not the serving path's)."""
    return json.dumps({"model": model, "prompt": ids, "max_tokens": out, "temperature": 0, "ignore_eos": True,
                       "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}).encode()


async def _one_http(http: HttpStreams, body: bytes, rid, times, paths=None, due=None):
    """One request over the HTTP API (`body`: `http_body`'s); each event's new tokens are counted from its usage
    (continuous usage stats), so a merged event counts as the tokens it carries. Stamps as `_one` does."""
    ts, seen = times[rid], 0
    path: dict = {}
    async for ev in http.events(body, path):
        now = time.perf_counter()
        n = (ev.get("usage") or {}).get("completion_tokens", seen)
        if n > seen and not ts:
            path["client.received"] = time.monotonic_ns()
        ts.extend([now] * (n - seen))
        seen = max(seen, n)
        if "folio_timing" in ev:
            path.update((h, ns) for h, ns in ev["folio_timing"]["first_token_path"])
    perf = path.pop("perf")
    if due is not None:  # as in _one: the scheduled arrival on the monotonic clock
        path["client.arrival"] = path["client.sent"] - int((perf - due) * 1e9)
    if paths is not None:
        path["rid"] = rid
        paths.append(path)


async def _drive_http(address: str, model: str, reqs) -> dict:
    """The same schedule as _drive, through the router's OpenAI-compatible HTTP API."""
    http = HttpStreams(address)
    try:
        await _one_http(http, http_body(model, [20, 21, 22], 4), "warmup", {"warmup": []})
        await http.open(32)
        times = {f"r{i}": [] for i in range(len(reqs))}
        paths: list[dict[str, int]] = []
        t0 = time.perf_counter()
        arrivals = {f"r{i}": t0 + at for i, (at, _, _) in enumerate(reqs)}

        async def later(i, at, ids, out):
            body = http_body(model, ids, out)
            await _until_due(t0 + at)
            await _one_http(http, body, f"r{i}", times, paths, due=t0 + at)

        await asyncio.gather(*[later(i, *r) for i, r in enumerate(reqs)])
        res = summarize(times, arrivals, time.perf_counter(), t0)
        res["ttft_split_ms_p50"] = {"client_router": float("nan"), "router_ttft": float("nan"), "engine_queue": float("nan")}
        add_path_stats(res, paths)
        return res
    finally:
        http.close()


def _cpu_s(pid: int) -> float:
    """CPU time (user + system) of a process and its live children, e.g. an engine's core process."""
    tick = os.sysconf("SC_CLK_TCK")
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    total = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            kids = (task / "children").read_text().split()
        except OSError:
            continue
        for k in kids:
            try:
                total += _cpu_s(int(k))
            except OSError:
                pass
    return total


def _migrations(pid: int) -> int | None:
    """How many times the threads of a process moved to another CPU (/proc/PID/task/*/sched, se.nr_migrations;
    None where the kernel does not show it): a thread woken on a CPU other than its last finds cold caches."""
    total, seen = 0, False
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            for line in (task / "sched").read_text().splitlines():
                if line.startswith("se.nr_migrations"):
                    total += int(line.split(":")[1])
                    seen = True
                    break
        except (OSError, ValueError):
            continue
    return total if seen else None


def migrations(stack) -> dict[str, int]:
    out = {}
    for p in stack.procs:
        try:
            if (m := _migrations(p.popen.pid)) is not None:
                out[p.name] = m
        except OSError:
            continue
    return out


def placement(stack) -> dict[str, str]:
    """Each stack process's threads and the CPUs they may run on (/proc): a process pinned to fewer CPUs
    than it has busy threads makes its threads wait for each other, whatever the GIL does."""
    out = {}
    for p in stack.procs:
        try:
            tasks = list(Path(f"/proc/{p.popen.pid}/task").iterdir())
            cpus = set()
            for t in tasks:
                line = next(x for x in (t / "status").read_text().splitlines() if x.startswith("Cpus_allowed_list"))
                cpus.add(line.split(":", 1)[1].strip())
            out[p.name] = f"{len(tasks)} threads on CPUs {' / '.join(sorted(cpus))}"
        except (OSError, StopIteration):
            continue
    return out


def cpu_seconds(stack) -> dict[str, float]:
    """CPU time (user + system) each of the stack's processes (with its children) has used so far (Linux /proc)."""
    out = {}
    for p in stack.procs:
        try:
            out[p.name] = _cpu_s(p.popen.pid)
        except OSError:
            continue
    return out


def drive_stack(stack, reqs, api: str = "grpc") -> dict:
    """One schedule through the stack, by its gRPC API, ("http") its OpenAI-compatible HTTP API, ("grpc-folio") its
    gRPC API from a client process with Folio's gRPC core settings, or ("@NAME") the gRPC API of the side router
    NAME; with each process's CPU time per output token, which shows what a process spends per token and so how
    near to a full core it runs at this rate."""
    before, moved = cpu_seconds(stack), migrations(stack)
    if api == "http":
        res = asyncio.run(_drive_http(f"{stack.c.host}:{stack.c.http_port}", stack.bench_model, reqs))
    elif api == "grpc-folio":
        res = stack.folio_client.drive(reqs)
    elif api.startswith("@"):
        res = asyncio.run(_drive(stack.proc(f"router-{api[1:]}").address, reqs))
    else:
        res = asyncio.run(_drive(stack.client_address, reqs))
    after = cpu_seconds(stack)
    res["cpu_ms_per_token"] = {k: 1e3 * (after[k] - before[k]) / max(1, res["output_tokens"])
                               for k in after if k in before}
    res["cpu_busy_fraction"] = {k: (after[k] - before[k]) / res["wall_s"] for k in after if k in before}
    moved_after = migrations(stack)
    res["migrations_per_request"] = {k: (moved_after[k] - moved[k]) / max(1, res["requests"])
                                     for k in moved_after if k in moved}
    return res


def start_stack(args, model_dir, detokenize: str, engine_extra: list[str] = (), router_extra: list[str] = (),
                extra_env: dict[str, str] | None = None, http: bool = False):
    from folio.stack import Stack, StackConfig, free_port
    from protos.generate import ensure_generated

    ensure_generated()
    flags = []
    for k, v in engine_kwargs(args, model_dir).items():
        if k == "model":
            continue
        if isinstance(v, bool):
            flags.append(("--" + k if v else "--no-" + k).replace("_", "-"))
        else:
            flags += ["--" + k.replace("_", "-"), str(v)]
    flags += list(engine_extra)
    if args.debug_gil_busy_ms:
        flags += ["--debug-gil-busy-ms", str(args.debug_gil_busy_ms)]
    router_args = ([] if detokenize == "default" else ["--detokenize", detokenize]) + list(router_extra)
    env = dict(extra_env or {})
    if args.device == "cpu":
        env["OMP_NUM_THREADS"] = str(args.threads)
        # A shared CPU can stall a process for seconds: not what is measured here, so the engine is
        # not dropped from the registry (heartbeat TTL) or judged hung for it.
        flags += ["--heartbeat-ttl-s", "60"]
        router_args += ["--hung-after-s", "120", "--stale-ms", "60000"]
    stack = Stack(StackConfig(engines=1, router_port=0, model=str(model_dir), engine_args=flags, env=env,
                              router_args=router_args, log_level="WARNING", startup_timeout_s=600,
                              http_port=free_port() if http else None))
    with spawning_unpinned():
        stack.start()
    stack.bench_model = Path(model_dir).name  # the served name (the model directory's)
    # A router variant that also serves a unix-domain socket (--unix-socket) is driven through it.
    uds = [b for a, b in zip(router_args, router_args[1:]) if a == "--unix-socket"]
    stack.client_address = f"unix:{uds[-1]}" if uds else stack.router_address
    return stack


CLIENT_CPUS: set[int] | None = None
"""--client-cpus: the CPUs this process is pinned to (the stack's processes are not)."""


@contextlib.contextmanager
def spawning_unpinned():
    """Spawn the stack's processes from a thread allowed on every CPU: a child inherits its spawning thread's
    CPU mask, and --client-cpus is this process's, not the services' (they take theirs from --cpus)."""
    if CLIENT_CPUS is None:
        yield
        return
    os.sched_setaffinity(0, ALL_CPUS)  # (0: the calling thread only, on Linux)
    try:
        yield
    finally:
        os.sched_setaffinity(0, CLIENT_CPUS)


class ClientWorker:
    """bench/serving_client.py in a process of its own with Folio's gRPC core settings (services/common/grpc_env.py:
    EventEngine experiments off), driving the stack's gRPC API on the schedules it is given (--apis grpc-folio), so
    a client with those settings runs beside the bench's own (gRPC's defaults) in every run."""

    def __init__(self, address: str):
        import subprocess

        from services.common.grpc_env import GRPC_EXPERIMENTS

        env = {**os.environ, "GRPC_EXPERIMENTS": GRPC_EXPERIMENTS}
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "serving_client.py"), address],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)

    def drive(self, reqs) -> dict:
        self.proc.stdin.write(json.dumps(reqs) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the grpc-folio client exited (code {self.proc.wait()})")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except Exception:  # noqa: BLE001
            self.proc.kill()


def add_paths(stack, apis: list[str], side: dict[str, list[str]]) -> None:
    """What the APIs beyond the stack's own need: the grpc-folio client's process, and each side router ("@NAME":
    another router on the same Redis, tokenizer and engine, with the first router's flags plus its own, on a port
    of its own; its HTTP API off), started once per stack and measured once quiet."""
    if "grpc-folio" in apis and getattr(stack, "folio_client", None) is None:
        stack.folio_client = ClientWorker(stack.client_address)
    from folio.stack import free_port

    for name, extra in side.items():
        if any(p.name == f"router-{name}" for p in stack.procs):
            continue
        base = stack.proc("router").argv
        rargs = base[base.index("services.router") + 1:]
        keep, skip = [], False
        for a in rargs:  # drop the first router's --port and --http-port (and their values)
            if skip:
                skip = False
            elif a in ("--port", "--http-port"):
                skip = True
            else:
                keep.append(a)
        port = free_port(stack.c.host)
        with spawning_unpinned():
            p = stack._spawn(f"router-{name}", stack._py("services.router", *keep, "--port", str(port), *extra),
                             f"{stack.c.host}:{port}")
        stack.wait_serving([p])
        stack.wait_routable()
        print(f"[side router {name}] up with {' '.join(extra)} (quiet {wait_quiet(p):.1f} s later)", flush=True)


def stop_stack(stack) -> None:
    if getattr(stack, "folio_client", None) is not None:
        stack.folio_client.close()
        stack.folio_client = None
    stack.stop()


def restart_router(stack, extra: list[str]) -> None:
    """Start the stack's router again with the first router's flags plus `extra` (its engine, tokenizer and Redis
    stay up and warm, on the same ports): a router variant without a whole stack's start (~15 s on the H200)."""
    import signal

    p = stack.proc("router")
    if not hasattr(stack, "router_argv"):
        stack.router_argv = list(p.argv)
    p.popen.send_signal(signal.SIGTERM)
    p.popen.wait(30)
    p.argv = stack.router_argv + list(extra)
    with spawning_unpinned():
        stack.respawn(p)
    stack.wait_serving([p])
    stack.wait_routable()
    wait_quiet(p)


def wait_quiet(p, interval_s: float = 0.25, busy: float = 0.1, max_s: float = 20.0) -> float:
    """Wait until a stack process is idle (under `busy` of a core over `interval_s`): a router serves before its
    start-up warm-up (structured outputs' imports, a full garbage collection, in a thread) is done, and requests
    measured meanwhile wait for that thread's GIL (H200 round 2 of session 9: first tokens 13-55 ms late).
    Returns the seconds waited."""
    t0 = time.perf_counter()
    last = _cpu_s(p.popen.pid)
    while time.perf_counter() - t0 < max_s:
        time.sleep(interval_s)
        now = _cpu_s(p.popen.pid)
        if now - last < busy * interval_s:
            break
        last = now
    return time.perf_counter() - t0


def mean_ci(xs: list[float]) -> tuple[float, float]:
    """Mean and the 95% confidence half-width of the mean (nan with one run)."""
    m = float(np.mean(xs))
    if len(xs) < 2:
        return m, float("nan")
    return m, T95.get(len(xs) - 1, 1.96) * float(np.std(xs, ddof=1)) / math.sqrt(len(xs))


def hops_add(s: dict, p: dict) -> dict:
    """Stack minus in-process: of the percentiles (as the issue states its targets), and for TTFT also the
    median over requests of each request's own difference (paired: same arrival, prompt and length on
    both paths, so much of the noise cancels)."""
    add = {f"{k}_ms_{q}": s[f"{k}_ms"][q] - p[f"{k}_ms"][q] for k in ("ttft", "itl") for q in ("p50", "p99")}
    both = [(s["per_request"][r], p["per_request"][r]) for r in s["per_request"] if r in p["per_request"]]
    add["ttft_ms_paired_median"] = pct([a[0] - b[0] for a, b in both], 0.5)
    add["outside_engine_ms_p50"] = s["outside_engine_ms_p50"] - p["outside_engine_ms_p50"]
    return add


def prepare_model(args, tmp: Path) -> tuple[Path, int]:
    """The model directory both paths serve, and the vocabulary size prompts are drawn from."""
    if args.model is not None:
        model_dir = Path(args.model).expanduser()
        return model_dir, json.loads((model_dir / "config.json").read_text())["vocab_size"]
    tok_dir = Path(args.tokenizer_dir) if args.tokenizer_dir else None
    if tok_dir is None:
        from services.common.bundled_model import ensure_bundled_model

        tok_dir = ensure_bundled_model(quiet=True)
    vocab = json.loads((tok_dir / "tokenizer.json").read_text())["model"]["vocab"]
    model_dir = write_config(args.shape, tmp)
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["vocab_size"] = min(cfg["vocab_size"], len(vocab))  # generate only ids the tokenizer can decode
    (model_dir / "config.json").write_text(json.dumps(cfg))
    for f in TOKENIZER_FILES:
        if (tok_dir / f).exists():
            shutil.copy(tok_dir / f, model_dir / f)
    return model_dir, cfg["vocab_size"]


def _load_in_process(args, model_dir, box: dict) -> None:
    try:
        box["engine"] = InProcess(args, model_dir)
    except BaseException as e:  # noqa: BLE001 - reported by the main thread
        box["error"] = e


def _commit() -> str | None:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3-8b", choices=list(SHAPES))
    ap.add_argument("--model", default=None, help="a real HF model directory instead of --shape's dummy weights")
    ap.add_argument("--rates", type=float, nargs="+", default=[4.0, 16.0], help="requests per second")
    ap.add_argument("--requests", type=int, default=128, help="requests per rate and run")
    ap.add_argument("--runs", type=int, default=3, help="runs (each: stack then in-process, at every rate)")
    ap.add_argument("--in-len", type=int, nargs=2, default=[32, 511], metavar=("MIN", "MAX"))
    ap.add_argument("--out-len", type=int, nargs=2, default=[32, 159], metavar=("MIN", "MAX"))
    ap.add_argument("--max-wall-s", type=float, default=None,
                    help="start no further run once another would likely end past this many seconds")
    ap.add_argument("--detokenize", default="default", choices=["default", "local", "service", "both"],
                    help="the router's --detokenize (default: its own default; both: local and service)")
    ap.add_argument("--engine-variant", action="append", default=[], metavar="NAME=FLAGS",
                    help="also run the stack with these extra engine flags, e.g. 'si0.5=--switch-interval-ms 0.5' "
                         "(repeatable; each variant is one more stack start)")
    ap.add_argument("--router-variant", action="append", default=[], metavar="NAME=FLAGS",
                    help="also run the stack with these extra router flags, e.g. 'plain=--no-engine-calls-ahead', "
                         "or 'NAME=ENGINE FLAGS -- ROUTER FLAGS' for both; {tmp} in flags is a private directory "
                         "(unix sockets: 'uds=--unix-socket {tmp}e.sock -- --unix-socket {tmp}r.sock'; the client "
                         "then dials the router's socket) (repeatable; each variant is one more stack start)")
    ap.add_argument("--env-variant", action="append", default=[], metavar="NAME=K=V[,K=V]",
                    help="also run the stack with this environment for every service, e.g. 'ee=GRPC_EXPERIMENTS=' "
                         "(gRPC's own defaults instead of services/common/grpc_env.py's) (repeatable)")
    ap.add_argument("--settle-s", type=float, default=0.0,
                    help="pause this long after each side router's run, so that what its router keeps up after its "
                         "last request (its polling loop, CPU spinners: a second) does not reach the next path's run")
    ap.add_argument("--max-mixed-graph-tokens", type=int, default=None,
                    help="the engines' (both paths') largest mixed-step CUDA graph: fewer graphs, a shorter start")
    ap.add_argument("--apis", nargs="+", choices=["grpc", "http", "grpc-folio"], default=["grpc"],
                    help="drive each stack through these of its APIs in every run (each first in turn): grpc, "
                         "http (the OpenAI-compatible API, streamed /v1/completions over keep-alive connections: "
                         "rows named NAME/http), grpc-folio (the gRPC API from a client process with Folio's gRPC "
                         "core settings: rows NAME/grpc-folio)")
    ap.add_argument("--side-router", action="append", default=[], metavar="NAME=FLAGS",
                    help="run another router beside the stack's (same Redis, tokenizer, engine) with these extra "
                         "router flags, driven through its gRPC API in every run with the APIs (rows NAME+SIDE): an "
                         "A/B of router flags alternated within each run (repeatable)")
    ap.add_argument("--max-num-seqs", type=int, default=256,
                    help="the engines' (both paths') max_num_seqs: fewer decode-step graphs, a shorter start")
    ap.add_argument("--debug-gil-busy-ms", type=float, default=0.0,
                    help="debug, on CPU: each engine step (both paths) first holds the GIL this many ms, as a GPU "
                         "engine's kernel launches do (services/engine/server.py: gil_busy_step)")
    ap.add_argument("--stack-start-s", type=float, default=None,
                    help="how long a later variant's stack takes to start, for --max-wall-s (default: as long as "
                         "the first's, which on a fresh machine also compiled every kernel)")
    ap.add_argument("--client-cpus", default=None, metavar="LIST",
                    help="run this process (the client and the in-process engine) on these CPUs only (e.g. '0-13', "
                         "to keep it off a router pinned with --cpus)")
    ap.add_argument("--client-grpc-env", choices=["default", "folio"], default="default",
                    help="the bench client's gRPC core settings: gRPC's own (default, as every earlier session), or "
                         "Folio's services' (services/common/grpc_env.py: EventEngine experiments off, one thread wake "
                         "fewer per message on the client's side too)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=1, help="on CPU: torch threads of each engine (both paths)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tokenizer-dir", default=None, help="where tokenizer.json is (default: the bundled model)")
    ap.add_argument("--label", default="", help="added to the result file's name")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    if args.client_grpc_env == "folio":  # before grpc is imported (the stack's services set the same by themselves)
        from services.common import grpc_env

        grpc_env.set_defaults()
    if args.client_cpus is not None:  # before torch's threads start: they inherit it
        from services.common.cpu_affinity import parse_cpus, pin_process

        global CLIENT_CPUS
        CLIENT_CPUS = parse_cpus(args.client_cpus, "--client-cpus")
        pin_process(CLIENT_CPUS)
    import torch

    import logging

    # The in-process engine's start, step by step (weights, KV pool, graphs, ready), on this process's clock:
    # where the bench's start-up goes (the stack's engine does the same work at the same time).
    logging.basicConfig(format="[%(relativeCreated)6.0f ms] %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("folio.engine").setLevel(logging.INFO)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    # (name, router --detokenize, extra engine flags, extra router flags): one stack each
    variants = ([("local", "local", [], []), ("service", "service", [], [])] if args.detokenize == "both"
                else [(args.detokenize, args.detokenize, [], [])])
    detok = "local" if args.detokenize == "both" else args.detokenize
    sockets = tempfile.mkdtemp(prefix="folio-bench-")  # {tmp} in a variant's flags: unix-domain socket paths
    atexit.register(shutil.rmtree, sockets, True)
    for spec in args.engine_variant:
        name, _, flags = spec.partition("=")
        variants.append((name, detok, shlex.split(flags.replace("{tmp}", f"{sockets}/{name}")), []))
    for spec in args.router_variant:
        name, _, flags = spec.partition("=")
        eflags, _, rflags = flags.partition(" -- ") if " -- " in flags else ("", "", flags)
        variants.append((name, detok, shlex.split(eflags.replace("{tmp}", f"{sockets}/{name}")),
                         shlex.split(rflags.replace("{tmp}", f"{sockets}/{name}"))))
    specs = {name: (detok, extra, rextra, None) for name, detok, extra, rextra in variants}
    for spec in args.env_variant:
        name, _, pairs = spec.partition("=")
        specs[name] = (detok, [], [], dict(p.split("=", 1) for p in pairs.split(",") if p))
    variants = list(specs)
    side = {}
    for spec in args.side_router:
        name, _, flags = spec.partition("=")
        side[name] = shlex.split(flags)
    apis = list(dict.fromkeys(args.apis)) + [f"@{n}" for n in side]

    def row(v: str, api: str) -> str:  # a result row: a variant's stack driven through one API (or side router)
        return v if api == "grpc" else f"{v}+{api[1:]}" if api.startswith("@") else f"{v}/{api}"
    t_start = time.perf_counter()
    host = {"cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "python": platform.python_version(), "kernel": platform.release(), "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None}
    import importlib.util

    host["uvicorn_http"] = "httptools" if importlib.util.find_spec("httptools") else "h11"
    # How this host's idle CPUs wait (a halted vCPU is slow to wake), and whether a service may hold them awake
    # (--cpu-wake-latency-us: /dev/cpu_dma_latency).
    idle = Path("/sys/devices/system/cpu/cpuidle")
    host["cpuidle"] = "/".join(p.read_text().strip() for p in (idle / "current_driver", idle / "current_governor_ro")
                               if p.exists()) or None
    host["cpu_dma_latency_writable"] = os.access("/dev/cpu_dma_latency", os.W_OK)
    # Which CPUs share a core (hyperthreads): a service pinned to a CPU (--cpus) shares its caches with its siblings.
    sib = sorted({p.read_text().strip() for p in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/topology/thread_siblings_list")})
    host["cpu_siblings"] = " ".join(sib) or None
    host["client_cpus"] = args.client_cpus
    host["client_grpc_experiments"] = os.environ.get("GRPC_EXPERIMENTS")
    print("host: " + ", ".join(f"{k} {v}" for k, v in host.items()), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, vocab = prepare_model(args, Path(tmp))
        schedules = [[make_requests(args.requests, rate, vocab, 1000 * run + k, args.in_len, args.out_len)
                      for k, rate in enumerate(args.rates)] for run in range(args.runs)]
        # The in-process engine loads in a thread while the first stack starts (the stack's children are
        # spawned from the main thread: their parent-death signal follows the thread that spawned them).
        box: dict = {}
        loader = threading.Thread(target=_load_in_process, args=(args, model_dir, box))
        loader.start()
        # runs[variant][run][rate] = {"stack": ..., "in_process": ...}
        runs: dict[str, list[list[dict]]] = {row(v, a): [] for v in variants for a in apis}
        baseline: dict[tuple[int, int], dict] = {}
        one_variant_s = None  # a later variant: a stack start, its warm-up and one run of the stack alone
        started_s = 0.0  # the last stack's start
        router_variant_s = None  # a router variant on the kept stack: a router's start, the stack's warm-up and one run
        ROUTER_RESTART_S = 5.0  # (a router's start, estimated: 1.5-4 s measured)

        def router_only(name: str) -> bool:  # the default's engine: a variant of router flags alone runs on a kept stack
            detok, eflags, _, env = specs[name]
            return not eflags and env is None and detok == specs[variants[0]][0]
        kept = None
        for i, v in enumerate(variants):
            if kept is not None and not router_only(v):  # (the router variant it was kept for was skipped)
                stop_stack(kept)
                kept = None
            took = time.perf_counter() - t_start
            need = router_variant_s if kept is not None else one_variant_s
            if args.max_wall_s and need and took + need > args.max_wall_s:
                print(f"[{v}] skipped: --max-wall-s {args.max_wall_s:g} (a stack start and a run would not fit)")
                continue
            t_variant = time.perf_counter()
            reused, kept = kept, None
            try:
                if reused is not None:
                    stack = reused
                    restart_router(stack, specs[v][2])
                    print(f"[{v}] router restarted with {' '.join(specs[v][2])} (engine, tokenizer, Redis kept) in "
                          f"{time.perf_counter() - t_variant:.1f} s", flush=True)
                else:
                    stack = start_stack(args, model_dir, *specs[v], http="http" in apis)
                    started_s = time.perf_counter() - t_variant
                    quiet_s = wait_quiet(stack.proc("router"))
                    print(f"[{v}] stack up in {started_s:.1f} s (its router quiet {quiet_s:.1f} s later)", flush=True)
                add_paths(stack, apis, side)
            except Exception as e:  # noqa: BLE001 - a variant that cannot start must not lose the others' results
                if v == variants[0]:
                    raise
                print(f"[{v}] failed to start: {type(e).__name__}: {e}")
                if reused is not None:
                    stop_stack(reused)
                continue
            where = placement(stack)
            print(f"[{v}] " + "; ".join(f"{n}: {x}" for n, x in where.items()), flush=True)
            host.setdefault("placement", {})[v] = where
            if loader.is_alive() or "engine" not in box:
                loader.join()
                print(f"in-process engine loaded at {time.perf_counter() - t_start:.1f} s", flush=True)
                if "engine" not in box:
                    stop_stack(stack)
                    raise RuntimeError("the in-process engine failed to load") from box.get("error")
            inproc = box["engine"]
            gc.collect()  # this process (the client's) has torch and an engine: keep full collections short
            gc.freeze()
            try:
                # Warm both paths on the workload's own sizes first (first-time shapes, compiles, caches).
                warm = make_requests(8, max(args.rates), vocab, 999_999, args.in_len, args.out_len)
                t_warm = time.perf_counter()
                for api in apis:
                    drive_stack(stack, warm, api)
                stack_warm_s = time.perf_counter() - t_warm
                if v == variants[0]:
                    inproc.run(warm)
                # And before every measured run, a few short requests: a path left idle while the other
                # ran (the first variant's stack behind each in-process run, the in-process engine behind
                # each stack run) otherwise meets its first requests cold, which later variants, run back
                # to back, would not (on the CPU machine the first variant's TTFT came out ~1-4 ms worse).
                rewarm = make_requests(4, max(args.rates), vocab, 999_998, args.in_len, (4, 4))
                run_s = 0.0  # the longest run of this variant so far: what the next one is expected to take
                for run in range(args.runs):
                    took = time.perf_counter() - t_start
                    done_runs = len(runs[row(v, apis[0])])
                    if args.max_wall_s and done_runs and took + run_s > args.max_wall_s:
                        print(f"[{v}] stopping after {done_runs} run(s): --max-wall-s {args.max_wall_s:g}")
                        break
                    rows = {a: [] for a in apis}
                    inproc_s = 0.0
                    t_run = time.perf_counter()
                    for k, rate in enumerate(args.rates):
                        def in_process() -> None:  # the same schedule's in-process run serves every variant
                            nonlocal inproc_s
                            t_in = time.perf_counter()
                            if (run, k) not in baseline:
                                inproc.run(rewarm)
                                baseline[run, k] = inproc.run(schedules[run][k])
                            inproc_s += time.perf_counter() - t_in
                        # Either path first in turn (odd runs: the in-process engine first), so drift within a
                        # run and a path's cold start after the other ran fall on both alike.
                        if run % 2:
                            in_process()
                        turn = (apis if run % 2 == 0 else apis[::-1]) if len(apis) < 3 else (
                            apis[run % len(apis):] + apis[:run % len(apis)])
                        for api in turn:  # each API (and side router) first in turn
                            drive_stack(stack, rewarm, api)
                            rows[api].append({"stack": drive_stack(stack, schedules[run][k], api)})
                            if api.startswith("@") and args.settle_s:  # its router's polling (and spinners) linger
                                time.sleep(args.settle_s)
                        in_process()
                        p = baseline[run, k]
                        for api in apis:
                            r = rows[api][-1]
                            s = r["stack"]
                            r.update(in_process=p, hops_add=hops_add(s, p))
                            a = r["hops_add"]
                            print(f"[{row(v, api)} run {run + 1}/{args.runs} rate {rate:g}] stack TTFT/ITL p50 "
                                  f"{s['ttft_ms']['p50']:.2f}/{s['itl_ms']['p50']:.3f} ms, in-process "
                                  f"{p['ttft_ms']['p50']:.2f}/{p['itl_ms']['p50']:.3f} ms, hops add "
                                  f"{a['ttft_ms_p50']:+.2f}/{a['itl_ms_p50']:+.3f} ms (outside engine "
                                  f"{a['outside_engine_ms_p50']:+.2f}); TTFT p50 split "
                                  + ", ".join(f"{n} {x:.2f}" for n, x in s["ttft_split_ms_p50"].items())
                                  + "; CPU ms/token "
                                  + ", ".join(f"{n} {c:.3f}" for n, c in s["cpu_ms_per_token"].items())
                                  + "; CPU migrations/request "
                                  + ", ".join(f"{n} {c:.1f}" for n, c in s.get("migrations_per_request", {}).items()),
                                  flush=True)
                    for api in apis:
                        runs[row(v, api)].append(rows[api])
                    run_s = max(run_s, time.perf_counter() - t_run)
                    if one_variant_s is None:
                        one_variant_s = time.perf_counter() - t_variant - inproc_s
                        if args.stack_start_s is not None:  # a later stack starts warm (compiles cached)
                            one_variant_s += min(0.0, args.stack_start_s - started_s)
                        router_variant_s = ROUTER_RESTART_S + stack_warm_s + (time.perf_counter() - t_run - inproc_s)
            finally:
                if router_only(v) and i + 1 < len(variants) and router_only(variants[i + 1]):
                    kept = stack  # the next variant restarts its router alone, on this stack's (default) engine
                else:
                    stop_stack(stack)
        if kept is not None:
            stop_stack(kept)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu ({platform.machine()})"
    summary = {}
    variants = [n for n in runs if runs[n]]
    print("\nWhat the hops add over the in-process engine (stack minus in-process), mean over runs ± 95% CI, ms.")
    print("p50/p99: difference of the percentiles; TTFT paired: median over requests of each request's own difference.")
    print("outside engine: p50 over requests of TTFT less the engine's own part (received -> first token; "
          "in-process: arrival -> first token), stack minus in-process.")
    keys = ("ttft_ms_p50", "itl_ms_p50", "ttft_ms_paired_median", "outside_engine_ms_p50", "ttft_ms_p99", "itl_ms_p99")
    print(f"{'router detok':<13}{'rate':>5}{'runs':>5}" + "".join(f"{h:>17}" for h in (
        "TTFT p50", "ITL p50", "TTFT paired", "outside engine", "TTFT p99", "ITL p99")))
    for v in variants:
        for k, rate in enumerate(args.rates):
            cells = {}
            for key in keys:
                cells[key] = mean_ci([r[k]["hops_add"][key] for r in runs[v]])
            summary.setdefault(v, {})[f"{rate:g}"] = {key: {"mean": m, "ci95": c} for key, (m, c) in cells.items()}
            print(f"{v:<13}{rate:>5g}{len(runs[v]):>5}" + "".join(f"{m:>9.2f} ±{c:>6.2f}" for m, c in cells.values()))
    print("\nTTFT p50 added, pooled: p50 over every run's requests on the stack minus the same requests' p50 "
          "in-process,\nwith a paired bootstrap 95% interval (request indices resampled within each run, the same "
          "on both paths; bench/serving_stats.py):")
    for v in variants:
        for k, rate in enumerate(args.rates):
            b = bootstrap_p50_diff(paired_runs([(r[k]["stack"]["per_request"], r[k]["in_process"]["per_request"])
                                                for r in runs[v]]))
            summary[v][f"{rate:g}"]["ttft_ms_p50_pooled"] = b
            print(f"{v:<13}{rate:>5g}  {b['diff']:+.2f} ms [{b['lo']:+.2f}, {b['hi']:+.2f}] (se {b['se']:.2f}; "
                  f"{b['requests']} requests, {b['runs']} runs)")
    if len(variants) > 1:
        print("\nEach variant against the first, pooled: its TTFT p50 minus the first variant's over the same requests "
              "(paired bootstrap 95% interval):")
        for v in variants[1:]:
            for k, rate in enumerate(args.rates):
                pairs = [(a[k]["stack"]["per_request"], b[k]["stack"]["per_request"])
                         for a, b in zip(runs[v], runs[variants[0]])]
                b = bootstrap_p50_diff(paired_runs(pairs))
                summary[v][f"{rate:g}"][f"ttft_ms_p50_vs_{variants[0]}"] = b
                print(f"{v:<13}{rate:>5g}  {b['diff']:+.2f} ms [{b['lo']:+.2f}, {b['hi']:+.2f}] against {variants[0]} "
                      f"({b['requests']} requests, {b['runs']} runs)")
    print("\nCPU time per output token of each stack process (mean over runs), ms, and its busy fraction; and where")
    print("the stack's first token goes (client_router: client TTFT less the router's; router_ttft: the router's own,")
    print("engine_queue: the engine's queue wait inside it):")
    for v in variants:
        for k, rate in enumerate(args.rates):
            names = runs[v][0][k]["stack"]["cpu_ms_per_token"]
            cpu = {n: float(np.mean([r[k]["stack"]["cpu_ms_per_token"][n] for r in runs[v]])) for n in names}
            busy = {n: float(np.mean([r[k]["stack"]["cpu_busy_fraction"][n] for r in runs[v]])) for n in names}
            split = {n: float(np.mean([r[k]["stack"]["ttft_split_ms_p50"][n] for r in runs[v]]))
                     for n in ("client_router", "router_ttft", "engine_queue")}
            summary[v][f"{rate:g}"]["ttft_split_ms_p50"] = split
            summary[v][f"{rate:g}"]["cpu_ms_per_token"] = cpu
            summary[v][f"{rate:g}"]["cpu_busy_fraction"] = busy
            print(f"{v:<13}{rate:>5g}  " + ", ".join(f"{n} {cpu[n]:.3f} ({busy[n]:.0%})" for n in names)
                  + "; stack TTFT p50 split, ms: " + ", ".join(f"{n} {x:.2f}" for n, x in split.items()))
    print("\nThe first token's way, p50 of each interval (ms; mean over runs), named by the hops it lies between "
          "(docs/router.md); in-process: the same engine stepped in this process:")
    for v in variants:
        for k, rate in enumerate(args.rates):
            for path_name in ("stack", "in_process"):
                if path_name == "in_process" and v != variants[0]:
                    continue
                names = list(dict.fromkeys(n for r in runs[v] for n in r[k][path_name]["hops_ms_p50"]))
                hop = {n: float(np.nanmean([r[k][path_name]["hops_ms_p50"].get(n, float("nan")) for r in runs[v]]))
                       for n in names}
                summary[v][f"{rate:g}"][f"{path_name}_hops_ms_p50"] = hop
                print(f"{v:<13}{rate:>5g} {path_name:<10} " + ", ".join(f"{n} {x:.2f}" for n, x in hop.items()))
    print("Targets (H200, 8B shape): TTFT p50 added <= 2 ms and ITL p50 added <= 0.5 ms at each rate.")
    record = {"device": name, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "command": "python bench/serving.py " + " ".join(sys.argv[1:]), "code_commit": _commit(),
              "model": args.model or f"{args.shape} (dummy weights)", "vocab_size": vocab, "dtype": args.dtype,
              "requests_per_rate": args.requests, "runs": args.runs, "in_len": args.in_len, "out_len": args.out_len,
              "rates": args.rates, "wall_s": time.perf_counter() - t_start, "host": host,
              "hops_add_summary": summary, "per_run": runs}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    what = "model" if args.model else args.shape
    label = f"_{args.label}" if args.label else ""
    path = out / f"serving_{dt.date.today().isoformat()}_{what}_{args.device.split(':')[0]}{label}.json"
    path.write_text(json.dumps(record, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
