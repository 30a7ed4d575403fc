"""Batch-1 W4A16 weights read into L2 ahead of their GEMV, on a side stream (kernels/w4a16_l2.py), captured into the
decode CUDA graphs as a fork and a join: the prefetch of projection T starts when the projection `DIST[T]` calls
before it has finished (a fork from the main stream after that GEMV's launch) and T's own GEMV waits for it (the
join, before T's launch), so the main stream's chain gains one edge and no kernel.

Which projection comes next is learnt, not told: the first batch-1 forward records each W4A16 projection's
successor in call order (a plain attribute on the layer, `_ahead_next`); a projection met again starts a new forward,
so the last projection of a step never links to the first one (a fork whose join would fall outside the graph).
Targets: projections whose class is in `DIST` (by the model's layer classes: QKVParallelLinear = qkv,
RowParallelLinear = o and down) and whose qweight is at most `MAX_BYTES` (the 8B's qkv 12.6 MB and o 8.4 MB; not
down's 29 MB: L2 cannot hold it beside the stream).

Off by default (`DIST` empty; FOLIO_W4A16_AHEAD="RowParallelLinear:1,QKVParallelLinear:2" sets it) until it is
measured faster on the GPU (bench/w4a16.py's +pfo1 / +pfq1 / +pfq2 / +pfe).
"""

from __future__ import annotations

import os
import weakref
from typing import Callable

import torch


def _parse(spec: str) -> dict[str, int]:
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, d = part.partition(":")
        out[name] = int(d or 1)
    return out


DIST: dict[str, int] = _parse(os.environ.get("FOLIO_W4A16_AHEAD", ""))
"""Layer class name -> how many batch-1 W4A16 calls before it its prefetch is forked (1: right after the previous
projection's GEMV, i.e. while the kernels between them run)."""
MAX_BYTES = 16 << 20
EVICT_LAST = os.environ.get("FOLIO_W4A16_AHEAD_EVICT_LAST", "0") == "1"


class Ahead:
    """The learnt call order and the pending joins. `launch(layer)` runs the prefetch of `layer`'s weights on the
    current stream; `streams` gives (main stream, side stream) for the current device and forks / joins (injected
    so that the CPU tests can record the order of events)."""

    def __init__(self, launch: Callable | None = None, streams=None):
        self.prev = None  # weakref to the last projection seen
        self.launch = launch or _launch
        self.streams = streams or CudaStreams()

    def enabled(self) -> bool:
        return bool(DIST)

    def before(self, layer) -> None:
        """At a batch-1 call of `layer`, before its GEMV: learn the order; join its pending prefetch."""
        prev = self.prev() if self.prev is not None else None
        if getattr(layer, "_ahead_seen", False):
            pass  # met again: a new forward starts here (or the order is known)
        else:
            object.__setattr__(layer, "_ahead_seen", True)
            if prev is not None and getattr(prev, "_ahead_next", None) is None:
                object.__setattr__(prev, "_ahead_next", layer)
        self.prev = weakref.ref(layer)
        pending = getattr(layer, "_ahead_pending", None)
        if pending is not None:
            object.__setattr__(layer, "_ahead_pending", None)
            self.streams.join(pending)

    def after(self, layer) -> None:
        """After `layer`'s GEMV is launched: fork the prefetch of each target whose distance puts it here."""
        t, d = layer, 0
        while True:
            t, d = getattr(t, "_ahead_next", None), d + 1
            if t is None or d > max(DIST.values(), default=0):
                return
            if DIST.get(type(t).__name__) == d and _fits(t) and getattr(t, "_ahead_pending", None) is None:
                object.__setattr__(t, "_ahead_pending", self.streams.fork(lambda t=t: self.launch(t)))


def _fits(layer) -> bool:
    qw = getattr(layer, "qweight", None)
    return qw is not None and qw.numel() * qw.element_size() <= MAX_BYTES


def _launch(layer) -> None:
    from kernels.w4a16_l2 import prefetch

    prefetch([layer.qweight, layer.scales, layer.zeros], evict_last=EVICT_LAST)


class CudaStreams:
    """fork(fn): fn runs on a side stream after everything queued so far on the current stream; returns an event.
    join(event): the current stream waits for it. Both are legal inside CUDA graph capture."""

    def __init__(self):
        self.side: dict[int, torch.cuda.Stream] = {}

    def fork(self, fn: Callable[[], None]) -> torch.cuda.Event:
        main = torch.cuda.current_stream()
        side = self.side.get(main.device.index)
        if side is None:
            side = self.side[main.device.index] = torch.cuda.Stream(main.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            fn()
        done = torch.cuda.Event()
        done.record(side)
        return done

    def join(self, done: torch.cuda.Event) -> None:
        torch.cuda.current_stream().wait_event(done)


AHEAD = Ahead()
