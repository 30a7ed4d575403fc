"""Batch-1 W4A16 weights read into L2 ahead of their GEMV, on a side stream (kernels/w4a16_l2.py), captured into the
decode CUDA graphs as a fork and a join: the prefetch of projection T starts when the projection `dist` calls
before it has finished (a fork from the main stream after that GEMV's launch) and T's own GEMV waits for it (the
join, before T's launch; with `JOIN_LATE` the projection after T waits instead), so the main stream's chain gains
one edge and no kernel.

Which projection comes next is learnt, not told: the first batch-1 forward records each W4A16 projection's
successor in call order (a plain attribute on the layer, `_ahead_next`); a projection met again starts a new forward,
so the last projection of a step never links to the first one (a fork whose join would fall outside the graph).
Targets by role (`role`: qkv, o, gate_up, down, from the model's layer classes and the shape): `AHEAD[role] =
(dist, frac)`; frac < 1 reads only the first frac of each K slice of a split-K `gemv3` (the tiles its one wave
waits for first), else the whole weight; scales and zero points whole. A target whose prefetch would pass
`MAX_BYTES` is left alone (L2 is ~50-60 MB).

Off by default (`AHEAD` empty; FOLIO_W4A16_AHEAD="o:1,qkv:2,gate_up:2@0.25" sets it) until it is measured faster on
the GPU (bench/w4a16.py's +pfo1 / +pfq2 / +pfg2h25 / +pfe tags).
"""

from __future__ import annotations

import os
import weakref
from typing import Callable

import torch


def _parse(spec: str) -> dict[str, tuple[int, float]]:
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, rest = part.partition(":")
        d, _, f = (rest or "1").partition("@")
        out[name] = (int(d), float(f or 1.0))
    return out


DIST: dict[str, tuple[int, float]] = _parse(os.environ.get("FOLIO_W4A16_AHEAD", ""))
"""Role -> (how many batch-1 W4A16 calls before it its prefetch is forked: 1 = right after the previous projection's
GEMV, while the kernels between them run; the share of its weight read ahead)."""
MAX_BYTES = 32 << 20
EVICT_LAST = os.environ.get("FOLIO_W4A16_AHEAD_EVICT_LAST", "0") == "1"
JOIN_LATE = os.environ.get("FOLIO_W4A16_AHEAD_JOIN_LATE", "0") == "1"
"""Join a target's prefetch before the projection after it (where it has one in the forward) rather than before the
target itself: the target's GEMV then has no edge from the side stream (its PDL early start cannot wait on it)."""


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
        joins = getattr(layer, "_ahead_joins", None)
        if joins:
            object.__setattr__(layer, "_ahead_joins", [])
            for done in joins:
                self.streams.join(done)

    def after(self, layer) -> None:
        """After `layer`'s GEMV is launched: fork the prefetch of each target whose distance puts it here."""
        t, d = layer, 0
        while True:
            t, d = getattr(t, "_ahead_next", None), d + 1
            if t is None or d > max((v[0] for v in DIST.values()), default=0):
                return
            spec = DIST.get(role(t))
            if spec is not None and spec[0] == d and _fits(t, spec[1]):
                done = self.streams.fork(lambda t=t, f=spec[1]: self.launch(t, f))
                at = (getattr(t, "_ahead_next", None) or t) if JOIN_LATE else t
                object.__setattr__(at, "_ahead_joins", [*(getattr(at, "_ahead_joins", None) or []), done])


def role(layer) -> str | None:
    """qkv, o, gate_up or down (the Llama-family projections), by the model's layer class and the weight's shape."""
    name = type(layer).__name__
    if name == "QKVParallelLinear":
        return "qkv"
    if name == "MergedColumnParallelLinear":
        return "gate_up"
    if name == "RowParallelLinear":
        qw = getattr(layer, "qweight", None)
        return "down" if qw is not None and getattr(layer, "in_k", 0) > qw.shape[1] else "o"
    return None


def _fits(layer, frac: float) -> bool:
    qw = getattr(layer, "qweight", None)
    return qw is not None and qw.numel() * qw.element_size() * min(frac, 1.0) <= MAX_BYTES


def head_rows(layer, frac: float) -> tuple[int, int] | None:
    """(rows per K slice, rows read ahead) of the qweight when its batch-1 config is a split-K `gemv3` and frac < 1,
    else None (the whole weight)."""
    from kernels import w4a16

    qw = layer.qweight
    if frac >= 1.0:
        return None
    cfg = w4a16.pick_config(1, qw.shape[1], layer.in_k, layer.group_size, qw.device)
    if cfg.get("KERNEL") != "gemv3":
        return None
    s = w4a16.block_rows(layer.in_k) // 8
    blocks = qw.shape[0] // s
    per = -(-blocks // max(1, cfg.get("SPLIT_K") or 1)) * s
    return per, max(1, min(per, round(per * frac)))


def _launch(layer, frac: float = 1.0) -> None:
    from kernels.w4a16_l2 import prefetch

    prefetch([layer.qweight, layer.scales, layer.zeros], evict_last=EVICT_LAST, head=head_rows(layer, frac))


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
