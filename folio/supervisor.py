"""Keeps the local stack up: a child that dies is started again, with backoff, until it dies too often.

`folio up` runs `Supervisor.run()` in the foreground. Every child comes back on its own port, so the
others' addresses stay valid: a restarted engine re-registers in Redis and the router routes to it
again; a restarted Redis is refilled by the engines' next reports; the router keeps routing on its
last view meanwhile. Requests on a dead engine fail over to the others (services/router).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from folio.stack import Proc, Stack


@dataclass
class RestartPolicy:
    max_restarts: int = 5
    """Restarts of one child allowed within `window_s`; one more and the stack stops."""
    window_s: float = 60.0
    first_backoff_s: float = 0.5
    """Wait before the first restart; doubled for each further restart within the window."""
    max_backoff_s: float = 10.0


@dataclass
class _History:
    deaths: list[float] = field(default_factory=list)
    restart_at: float | None = None


class GaveUp(RuntimeError):
    """A child died more often than the policy allows."""


class Supervisor:
    def __init__(self, stack: Stack, policy: RestartPolicy | None = None,
                 log: Callable[[str], None] | None = None, clock: Callable[[], float] = time.monotonic):
        self.stack = stack
        self.policy = policy or RestartPolicy()
        self.log = log or (lambda msg: print(f"folio: {msg}", file=sys.stderr, flush=True))
        self.clock = clock
        self.history: dict[str, _History] = {}
        self.restarts = 0

    def check(self) -> None:
        """One pass: notice children that exited, restart those whose backoff has passed.
        Raises GaveUp when one has died more than max_restarts times within window_s."""
        now = self.clock()
        for p in self.stack.procs:
            if p.popen.poll() is None:
                continue
            h = self.history.setdefault(p.name, _History())
            if h.restart_at is None:
                self._on_death(p, h, now)
            elif now >= h.restart_at:
                self.stack.respawn(p)
                h.restart_at = None
                self.restarts += 1
                self.log(f"{p.name} restarted (pid {p.popen.pid})")

    def _on_death(self, p: Proc, h: _History, now: float) -> None:
        pol = self.policy
        h.deaths = [t for t in h.deaths if now - t < pol.window_s] + [now]
        tail = self.stack.tail(p, 10)
        if len(h.deaths) > pol.max_restarts:
            raise GaveUp(f"{p.name} exited with code {p.popen.returncode}, its {len(h.deaths)}th exit within "
                         f"{pol.window_s:.0f}s; giving up. Last lines of {p.log}:\n{tail}")
        delay = min(pol.max_backoff_s, pol.first_backoff_s * 2 ** (len(h.deaths) - 1))
        h.restart_at = now + delay
        self.log(f"{p.name} exited with code {p.popen.returncode}; restarting in {delay:.1f}s "
                 f"(exit {len(h.deaths)} of at most {pol.max_restarts} within {pol.window_s:.0f}s). "
                 f"Last lines of {p.log}:\n{tail}")

    def run(self, interval_s: float = 0.25) -> None:
        """Supervise until interrupted (KeyboardInterrupt) or GaveUp."""
        while True:
            self.check()
            time.sleep(interval_s)
