"""Runs the synchronous LLMEngine in its own thread beside an asyncio server.

The engine thread owns the LLMEngine: nothing else touches it. Requests and aborts reach it as typed
commands (`AddCommand`, `AbortCommand`) on a queue drained before every step, so an abort takes
effect within one step. Each step's token deltas go back to per-request asyncio queues with one
`loop.call_soon_threadsafe` per step (one wake-up of the loop, whatever the batch); a request's first
token goes first, and the thread then steps back (blocked, the GIL released) until the loop has
handed that message to gRPC or `first_token_handoff_s` passed (`_hand_over`). After every step the
thread publishes an immutable `EngineLoad` snapshot (KV blocks, queue lengths) that Stats and the
Redis publisher read without locking. torch releases the GIL inside its kernels, so the event loop
stays responsive while a step runs.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import os
import threading
import time
from collections.abc import Callable
import dataclasses

from services.common.engine_load import EngineLoad
from services.engine.engine import LLMEngine
from services.common.sampling_params import SamplingParams

log = logging.getLogger("folio.engine.loop")


def _run_all(calls: list[Callable[[], None]]) -> None:
    """On the loop: the engine thread's deferred calls, in order."""
    for call in calls:
        call()


def _settle(fut: asyncio.Future, exc: BaseException | None) -> None:
    """On the loop: resolve an admission's future (unless its caller left)."""
    if fut.done():
        return
    if exc is None:
        fut.set_result(None)
    else:
        fut.set_exception(exc)


def _deliver(ready: list[tuple[asyncio.Queue, object]], handed: threading.Event | None = None,
             first: int = 0) -> None:
    """On the loop: put each item on its queue. `handed` is set once the readers of the first `first`
    items have run (their tasks wake in put order, before the callback scheduled after them)."""
    for i, (q, item) in enumerate(ready):
        if i == first and handed is not None:
            asyncio.get_running_loop().call_soon(handed.set)
        q.put_nowait(item)
    if handed is not None and first >= len(ready):
        asyncio.get_running_loop().call_soon(handed.set)


FIRST_SENT = object()
"""Put on a request's queue in place of its first delta when `AddCommand.first_token` sent it from the engine
thread (the handler then goes on with its later deltas)."""


class EngineFailure(RuntimeError):
    """The engine step raised; the requests in flight are ended with this error."""


@dataclasses.dataclass
class AddCommand:
    """Add a request; `done` resolves (or raises the engine's ValueError / QueueFullError) once it is in."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    done: asyncio.Future
    outputs: asyncio.Queue
    """Where the request's RequestDeltas (or an EngineFailure) arrive."""
    admitted: bool = False
    """Set by the engine thread once the engine took the request."""
    first_token: Callable[[object], bool] | None = None
    """Called on the engine thread with the request's first delta: True when it sent that delta's message itself
    (the fast lane's direct first token; FIRST_SENT then goes on the queue instead), False to hand it over."""


@dataclasses.dataclass
class AbortCommand:
    """Abort a request (no-op if unknown)."""

    request_id: str
    only_if: AddCommand | None = None
    """Abort only the request this command admitted (not an earlier one that holds the same id)."""


class AsyncEngine:
    direct_first_token = True
    """`add_request(first_token=...)` is honoured (the core-process engine's is not)."""

    def __init__(self, engine: LLMEngine, on_change: Callable[[EngineLoad], None] | None = None,
                 change_fraction: float = 0.05, step_deadline_s: float = 5.0,
                 on_fatal: Callable[[BaseException], None] | None = None, first_token_handoff_s: float = 0.001,
                 step_cpus: set[int] | None = None):
        """`on_fatal` is called (on the event loop) when a step fails in a way the engine cannot go on
        from (an exception with `fatal = True`, e.g. a broken tensor-parallel group); the loop stops.
        `first_token_handoff_s`: after a step that produced a request's first token, how long at most the
        engine thread waits (the GIL released) for the event loop to hand that token's message to gRPC
        before it goes on to the next step (0: it does not wait; docs/router.md). `step_cpus`: the engine thread
        runs on these CPUs (engine --step-cpus; services/common/cpu_affinity.py)."""
        self.engine = engine
        self.step_cpus = step_cpus
        self.first_token_handoff_s = first_token_handoff_s
        self._no_token_yet: set[str] = set()  # engine thread only: admitted, first token not yet out
        self._direct: dict[str, Callable[[object], bool]] = {}  # engine thread only: AddCommand.first_token
        self._on_fatal = on_fatal
        self.fatal: BaseException | None = None
        """The error that ended the engine loop, if any."""
        self.step_deadline_s = step_deadline_s
        self._step_started: float | None = None  # set by the engine thread while a step runs
        self._watchdog: asyncio.Task | None = None
        self.slow_steps = 0
        """Steps that ran past `step_deadline_s` (each logged once, with what it was doing)."""
        self._cmds: collections.deque = collections.deque()
        self._wake = threading.Event()
        self._stop = False
        self._queues: dict[str, asyncio.Queue] = {}  # engine thread only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._steps = 0
        self._on_change = on_change
        self._change_blocks = max(1, int(engine.blocks.num_blocks * change_fraction))
        self._last_notified: EngineLoad | None = None
        self.admitted: collections.deque[str] = collections.deque()
        """Ids of requests already reflected in `snapshot`, not yet taken by the publisher."""
        self._admitted_pending: list[str] = []
        self._later: list[Callable[[], None]] = []  # engine thread only
        """Loop work that admissions made (their callers' futures, a registry report), handed to the loop
        in one wake-up once the step that follows is launched (`_flush_later`), not while it is prepared."""
        self.snapshot = self._take_snapshot()

    # --- asyncio side ------------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.engine.after_launch = self._flush_later
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()
        self._watchdog = asyncio.get_running_loop().create_task(self._watch_steps(), name="engine-step-watchdog")

    async def _watch_steps(self) -> None:
        """Log a step that runs past its deadline while it still runs (a wedged step never returns to
        report itself), once per step, with its phase and batch. The heartbeat's step counter does
        not move meanwhile, which is what the router's hung-engine detection reads."""
        logged = -1
        while not self._stop:
            await asyncio.sleep(min(1.0, self.step_deadline_s / 4))
            started, step = self._step_started, self._steps
            if started is None or step == logged:
                continue
            ran = time.monotonic() - started
            if ran > self.step_deadline_s:
                logged = step
                self.slow_steps += 1
                seqs, tokens = self.engine.step_batch
                log.warning("engine step %d has run %.1f s, past its %.1f s deadline: phase %s, %d sequences, "
                            "%d tokens, %d running / %d waiting", step + 1, ran, self.step_deadline_s,
                            self.engine.step_phase, seqs, tokens, self.snapshot.running, self.snapshot.waiting)

    async def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                          prompt: str | None = None, first_token: Callable[[object], bool] | None = None
                          ) -> asyncio.Queue:
        """Queue a request; returns the queue its deltas (RequestDelta, or an exception) arrive on.
        Raises ValueError (bad input, naming the field) or QueueFullError like LLMEngine.add_request.
        `first_token`: see AddCommand."""
        cmd = AddCommand(request_id, prompt, prompt_token_ids, params, self._loop.create_future(), asyncio.Queue(),
                         first_token=first_token)
        self._cmds.append(cmd)
        self._wake.set()
        try:
            await cmd.done
        except asyncio.CancelledError:
            # The caller left (deadline, disconnect) while the admission waited behind a step: the
            # engine thread may admit it yet, so an abort follows it down the same ordered queue.
            self._cmds.append(AbortCommand(request_id, only_if=cmd))
            self._wake.set()
            raise
        return cmd.outputs

    def abort(self, request_id: str) -> None:
        """Abort a request (no-op if unknown); its blocks are freed before the next step."""
        self._cmds.append(AbortCommand(request_id))
        self._wake.set()

    async def stop(self) -> None:
        self._stop = True
        self._wake.set()
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)

    # --- engine thread -----------------------------------------------------------------------------
    def _send(self, q: asyncio.Queue, item) -> None:
        self._loop.call_soon_threadsafe(q.put_nowait, item)

    def _resolve(self, fut: asyncio.Future, exc: BaseException | None) -> None:
        self._loop.call_soon_threadsafe(_settle, fut, exc)

    def _flush_later(self) -> None:
        """Hand the loop what admissions deferred (`_later`), in one wake-up. Called by the engine once the
        step is launched (LLMEngine.after_launch), while the thread then waits for the device with the GIL
        released; and after every step, for a step that launched nothing. Nothing of a first token's way
        waits for it: the admitted request's first token comes from the step launched here, and its
        handler reads it only after this call's wake-up has resumed it."""
        if self._later:
            calls, self._later = self._later, []
            self._loop.call_soon_threadsafe(_run_all, calls)

    def _drain_commands(self) -> None:
        if not self._cmds:
            return
        self._drain_commands_now()
        # New requests and aborts show in Stats at once; the registry report they may call for is deferred
        # with the admissions' replies (`_flush_later`).
        self._publish_snapshot(defer=True)

    def _drain_commands_now(self) -> None:
        eng = self.engine
        while self._cmds:
            cmd = self._cmds.popleft()
            if isinstance(cmd, AddCommand):
                if cmd.done.cancelled():  # its caller is gone already: never admit it
                    continue
                try:
                    eng.add_request(cmd.request_id, cmd.prompt, cmd.params, prompt_token_ids=cmd.prompt_token_ids)
                except Exception as e:  # noqa: BLE001 - ValueError / QueueFullError go to the caller
                    self._resolve(cmd.done, e)
                    continue
                cmd.admitted = True
                self._queues[cmd.request_id] = cmd.outputs
                self._no_token_yet.add(cmd.request_id)
                if cmd.first_token is not None:
                    self._direct[cmd.request_id] = cmd.first_token
                self._admitted_pending.append(cmd.request_id)
                self._later.append(functools.partial(_settle, cmd.done, None))
            elif isinstance(cmd, AbortCommand):
                if cmd.only_if is not None and not cmd.only_if.admitted:
                    continue
                out = eng.abort_request(cmd.request_id)
                q = self._queues.pop(cmd.request_id, None)
                self._no_token_yet.discard(cmd.request_id)
                self._direct.pop(cmd.request_id, None)
                if q is not None and out is not None:
                    self._send(q, out)
            else:
                raise TypeError(f"unknown engine command {cmd!r}")

    def _run(self) -> None:
        if self.step_cpus:
            os.sched_setaffinity(0, self.step_cpus)  # (0: this thread only, on Linux)
        eng = self.engine
        while not self._stop:
            self._drain_commands()
            if not eng.has_unfinished_requests():
                self._flush_later()
                self._publish_snapshot()
                self._wake.wait(0.1)
                self._wake.clear()
                continue
            self._step_started = time.monotonic()
            try:
                outputs = eng.step()
            except Exception as e:  # noqa: BLE001 - a failed step must not kill the server
                log.exception("engine step failed; ending %d requests", len(self._queues))
                self._fail_all(EngineFailure(f"engine step failed: {type(e).__name__}"))
                if getattr(e, "fatal", False):  # nothing more can run here: stop and let the server end
                    self.fatal = e
                    if self._on_fatal is not None:
                        self._loop.call_soon_threadsafe(self._on_fatal, e)
                    return
                continue
            finally:
                self._step_started = None
                eng.step_phase = "idle"
                self._flush_later()  # (no-op when the step launched and flushed already)
            self._steps += 1
            self._hand_over(outputs)
            self._publish_snapshot()
        self._flush_later()
        for rid in list(self._queues):  # shutting down: end every stream
            out = eng.abort_request(rid)
            q = self._queues.pop(rid)
            if out is not None:
                self._send(q, out)

    def _hand_over(self, outputs: list) -> None:
        """Give a step's deltas to their queues in one wake-up of the event loop, first tokens first.
        When there are first tokens, wait until their readers have run (each has then handed its message
        to gRPC) or `first_token_handoff_s` passed: with asynchronous scheduling the next step is already
        running on the device, and this thread's next host work (scheduling, input preparation, holding
        the GIL) would otherwise make the loop wait for the GIL before it can send the token."""
        first, rest = [], []
        for out in outputs:
            rid = out.request_id
            q = self._queues.get(rid)
            if q is None:
                continue
            if out.finished:
                del self._queues[rid]
            if rid in self._no_token_yet and (out.finished or any(s.token_ids for s in out.sequences)):
                self._no_token_yet.discard(rid)
                send = self._direct.pop(rid, None)
                if send is not None and out.error is None and self._send_direct(send, out):
                    rest.insert(0, (q, FIRST_SENT))  # out already: nothing to wait for
                else:
                    first.append((q, out))
            else:
                rest.append((q, out))
        if not first and not rest:
            return
        if not first or self.first_token_handoff_s <= 0:
            self._loop.call_soon_threadsafe(_deliver, first + rest)
            return
        handed = threading.Event()
        self._loop.call_soon_threadsafe(_deliver, first + rest, handed, len(first))
        handed.wait(self.first_token_handoff_s)

    @staticmethod
    def _send_direct(send: Callable[[object], bool], out) -> bool:
        try:
            return send(out)
        except Exception:  # noqa: BLE001 - the loop hands it over instead
            log.exception("sending a first token from the engine thread failed; handing it over")
            return False

    def _fail_all(self, exc: Exception) -> None:
        for rid, q in list(self._queues.items()):
            try:
                self.engine.abort_request(rid)
            except Exception:  # noqa: BLE001
                log.exception("abort after failed step")
            self._send(q, exc)
        self._queues.clear()
        self._no_token_yet.clear()
        self._direct.clear()

    def _take_snapshot(self) -> EngineLoad:
        return dataclasses.replace(self.engine.get_stats(), steps=self._steps)

    def _publish_snapshot(self, defer: bool = False) -> None:
        """`defer`: a registry report this calls for waits in `_later` (with the admissions)."""
        snap = self._take_snapshot()
        self.snapshot = snap
        if self._admitted_pending:
            self.admitted.extend(self._admitted_pending)
            self._admitted_pending = []
        last = self._last_notified
        big = (last is None or abs(snap.available_blocks - last.available_blocks) >= self._change_blocks
               or (snap.waiting > 0) != (last.waiting > 0) or (snap.running > 0) != (last.running > 0))
        if big and self._on_change is not None and self._loop is not None:
            self._last_notified = snap
            if defer:
                self._later.append(functools.partial(self._on_change, snap))
            else:
                self._loop.call_soon_threadsafe(self._on_change, snap)

    def take_admitted(self) -> list[str]:
        """Request ids admitted and reflected in `snapshot` since the last call (publisher only)."""
        ids = []
        while self.admitted:  # deque pops are thread-safe; `snapshot` was set before these ids arrived
            ids.append(self.admitted.popleft())
        return ids
