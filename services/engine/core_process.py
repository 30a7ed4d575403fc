"""The engine core in a process of its own: the step loop alone in its interpreter, so the gRPC server's
event loop never waits for the step thread's GIL (engine `--core-process`; docs/router.md).

A GPU engine's step thread is pure Python launching kernels; beside it in one process, the event loop
that receives requests and sends tokens gets the GIL only when that thread lets go long enough, and a
request that arrives during a long launch can miss the next step boundary. Here the core process runs
one thread: before each step it reads every command waiting on its pipe (so a request the server
received is admitted at the next boundary, as in an in-process engine), and after each step it writes
the step's deltas, its load snapshot and the ids it admitted, in one message. The server process keeps
`AsyncEngine`'s interface (`CoreProcessEngine`): add_request / abort / snapshot / take_admitted / fatal.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable
from types import SimpleNamespace

from services.common.engine_load import EngineLoad
from services.common.sampling_params import SamplingParams
from services.engine.async_engine import EngineFailure

log = logging.getLogger("folio.engine.core")


@dataclasses.dataclass
class _Info:
    """What the server asks of the engine object itself (Info, logprob token text), sent once at start."""

    model_dir: str
    max_model_len: int
    block_size: int
    num_blocks: int
    vocab_size: int
    device: str
    dtype: str
    attention_backend: str


# --- the core process ------------------------------------------------------------------------------
def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def core_main(engine_config, conn, debug_gil_busy_ms: float = 0.0, log_level: str = "INFO") -> None:
    """The core process: build the engine, then step it, reading commands between steps."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server drains on Ctrl-C and then stops the core
    from services.common.server import configure_logging

    configure_logging(log_level)
    from services.engine.engine import LLMEngine

    try:
        engine = LLMEngine(engine_config)
    except BaseException as e:  # noqa: BLE001 - reported to the server, which exits
        conn.send(("failed_to_start", f"{type(e).__name__}: {e}"))
        return
    if debug_gil_busy_ms > 0:
        from services.engine.gil_debug import gil_busy_step

        engine.step = gil_busy_step(engine.step, debug_gil_busy_ms)
    conn.send(("ready", _Info(str(engine.model_dir), engine.max_model_len, engine.config.block_size,
                              engine.blocks.num_blocks, engine.vocab_size, str(engine.device),
                              str(engine.dtype).removeprefix("torch."), engine.attention_backend),
               dataclasses.replace(engine.get_stats(), steps=0)))  # the first registry report needs the pool
    try:
        _CoreLoop(engine, conn).run()
    finally:
        engine.shutdown()


class _CoreLoop:
    def __init__(self, engine, conn):
        self.engine, self.conn = engine, conn
        self.live: set[str] = set()  # requests admitted and not yet finished
        self.steps = 0

    def snapshot(self) -> EngineLoad:
        return dataclasses.replace(self.engine.get_stats(), steps=self.steps)

    def read_commands(self, timeout: float) -> bool:
        """Apply every command waiting (waiting up to `timeout` for the first). False: stop."""
        if not self.conn.poll(timeout):
            return True
        admitted, replies, outs = [], [], []
        while self.conn.poll(0):
            cmd = self.conn.recv()
            kind = cmd[0]
            if kind == "add":
                _, rid, ids, params = cmd
                try:
                    self.engine.add_request(rid, None, params, prompt_token_ids=ids)
                except Exception as e:  # noqa: BLE001 - ValueError / QueueFullError go to the caller
                    replies.append((rid, e))
                    continue
                self.live.add(rid)
                admitted.append(rid)
                replies.append((rid, None))
            elif kind == "abort":
                rid = cmd[1]
                out = self.engine.abort_request(rid)
                if rid in self.live and out is not None:
                    self.live.discard(rid)
                    outs.append(out)
            elif kind == "stop":
                return False
        # the snapshot counts the requests just admitted before their ids go out (the registry's rule)
        self.conn.send(("step", outs, self.snapshot(), admitted, replies))
        return True

    def run(self) -> None:
        eng = self.engine
        while True:
            if not self.read_commands(0.0 if eng.has_unfinished_requests() else 0.1):
                break
            if not eng.has_unfinished_requests():
                continue
            try:
                outputs = eng.step()
            except Exception as e:  # noqa: BLE001 - a failed step must not kill the server
                log.exception("engine step failed; ending %d requests", len(self.live))
                for rid in list(self.live):
                    try:
                        eng.abort_request(rid)
                    except Exception:  # noqa: BLE001
                        log.exception("abort after failed step")
                failed = sorted(self.live)
                self.live.clear()
                fatal = bool(getattr(e, "fatal", False))
                self.conn.send(("failed", failed, f"engine step failed: {type(e).__name__}", fatal, str(e)))
                if fatal:
                    return
                continue
            self.steps += 1
            outs = [d for d in outputs if d.request_id in self.live]
            for d in outs:
                if d.finished:
                    self.live.discard(d.request_id)
            self.conn.send(("step", outs, self.snapshot(), [], []))
        for rid in list(self.live):  # shutting down: end every stream
            out = eng.abort_request(rid)
            if out is not None:
                self.conn.send(("step", [out], self.snapshot(), [], []))


# --- the server side -------------------------------------------------------------------------------
class CoreProcessEngine:
    """AsyncEngine's interface over an engine core in its own process."""

    def __init__(self, engine_config, on_change: Callable[[EngineLoad], None] | None = None,
                 change_fraction: float = 0.05, on_fatal: Callable[[BaseException], None] | None = None,
                 debug_gil_busy_ms: float = 0.0, log_level: str = "INFO"):
        self._config = engine_config
        self._on_change = on_change
        self._change_fraction = change_fraction
        self._on_fatal = on_fatal
        self._debug_gil_busy_ms = debug_gil_busy_ms
        self._log_level = log_level
        self.fatal: BaseException | None = None
        self.snapshot = EngineLoad()
        self.admitted: collections.deque[str] = collections.deque()
        self._queues: dict[str, asyncio.Queue] = {}
        self._pending_adds: dict[str, asyncio.Future] = {}
        self._last_notified: EngineLoad | None = None
        self._proc = None
        self._conn = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.engine: SimpleNamespace | None = None
        """What the servicer reads of the engine: Info's fields, the tokenizer (logprob text), live ids."""

    async def start(self) -> None:
        """Start the core process and wait until its engine is built."""
        self._loop = asyncio.get_running_loop()
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe(duplex=True)
        self._proc = ctx.Process(target=core_main, args=(self._config, child, self._debug_gil_busy_ms, self._log_level),
                                 name="folio-engine-core", daemon=False)  # it may start tensor-parallel workers
        self._proc.start()
        child.close()
        self._conn = parent
        msg = await asyncio.to_thread(self._first_message)
        if msg[0] != "ready":
            raise RuntimeError(f"the engine core failed to start: {msg[1]}")
        info: _Info = msg[1]
        self.snapshot = msg[2]
        from pathlib import Path

        from services.common.tokenizer import Tokenizer

        model_dir = Path(info.model_dir)
        tok = Tokenizer(model_dir) if (model_dir / "tokenizer.json").exists() else None
        self.engine = SimpleNamespace(
            model_dir=model_dir, max_model_len=info.max_model_len, config=SimpleNamespace(block_size=info.block_size),
            blocks=SimpleNamespace(num_blocks=info.num_blocks), vocab_size=info.vocab_size, device=info.device,
            dtype=info.dtype, attention_backend=info.attention_backend, tokenizer=tok, requests=self._queues)
        self._change_blocks = max(1, int(info.num_blocks * self._change_fraction))
        self._loop.add_reader(self._conn.fileno(), self._on_readable)

    def _first_message(self):
        while not self._conn.poll(1.0):
            if not self._proc.is_alive():
                return ("failed_to_start", f"the process exited with status {self._proc.exitcode}")
        return self._conn.recv()

    async def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                          prompt: str | None = None) -> asyncio.Queue:
        if prompt is not None:
            raise ValueError("prompt: the engine core takes token ids")
        if self.fatal is not None or self._conn is None:
            raise EngineFailure("the engine core is not running")
        fut = self._loop.create_future()
        q: asyncio.Queue = asyncio.Queue()
        self._pending_adds[request_id] = fut
        self._queues[request_id] = q
        self._conn.send(("add", request_id, list(prompt_token_ids), params))
        try:
            await fut
        except asyncio.CancelledError:
            self.abort(request_id)  # ordered after the add on the same pipe
            self._queues.pop(request_id, None)
            raise
        except BaseException:
            self._queues.pop(request_id, None)
            raise
        finally:
            self._pending_adds.pop(request_id, None)
        return q

    def abort(self, request_id: str) -> None:
        if self._conn is not None and self.fatal is None:
            try:
                self._conn.send(("abort", request_id))
            except OSError:
                pass

    def take_admitted(self) -> list[str]:
        ids = list(self.admitted)
        self.admitted.clear()
        return ids

    def _on_readable(self) -> None:
        try:
            while self._conn.poll():
                self._handle(self._conn.recv())
        except (EOFError, OSError):
            self._loop.remove_reader(self._conn.fileno())
            if self.fatal is None:
                self._end_all(EngineFailure("the engine core exited"), fatal=True)

    def _handle(self, msg) -> None:
        kind = msg[0]
        if kind == "step":
            _, outs, snap, admitted, replies = msg
            for rid, err in replies:
                fut = self._pending_adds.get(rid)
                if err is not None:
                    self._queues.pop(rid, None)
                if fut is not None and not fut.done():
                    fut.set_result(None) if err is None else fut.set_exception(err)
            for d in outs:
                q = self._queues.pop(d.request_id, None) if d.finished else self._queues.get(d.request_id)
                if q is not None:
                    q.put_nowait(d)
            self._set_snapshot(snap, admitted)
        elif kind == "failed":
            _, rids, text, fatal, detail = msg
            exc = EngineFailure(text)
            for rid in rids:
                q = self._queues.pop(rid, None)
                if q is not None:
                    q.put_nowait(exc)
            if fatal:
                self._end_all(RuntimeError(detail), fatal=True)

    def _end_all(self, exc: BaseException, fatal: bool) -> None:
        failure = EngineFailure(str(exc))
        for q in self._queues.values():
            q.put_nowait(failure)
        self._queues.clear()
        for fut in self._pending_adds.values():
            if not fut.done():
                fut.set_exception(failure)
        if fatal:
            self.fatal = exc
            log.critical("the engine core stopped: %s", exc)
            if self._on_fatal is not None:
                self._on_fatal(exc)

    def _set_snapshot(self, snap: EngineLoad, admitted: list[str]) -> None:
        self.snapshot = snap
        self.admitted.extend(admitted)
        last = self._last_notified
        big = (last is None or abs(snap.available_blocks - last.available_blocks) >= self._change_blocks
               or (snap.waiting > 0) != (last.waiting > 0) or (snap.running > 0) != (last.running > 0))
        if big and self._on_change is not None:
            self._last_notified = snap
            self._on_change(snap)

    async def stop(self) -> None:
        if self._conn is not None:
            try:
                self._loop.remove_reader(self._conn.fileno())
            except (ValueError, OSError):
                pass
            try:
                self._conn.send(("stop",))
            except OSError:
                pass
        if self._proc is not None:
            await asyncio.to_thread(self._proc.join, 15)
            if self._proc.is_alive():
                os.kill(self._proc.pid, signal.SIGKILL)
                await asyncio.to_thread(self._proc.join, 5)
