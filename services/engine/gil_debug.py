"""Debug only: a GPU engine's hold on the GIL, reproduced on a CPU (engine --debug-gil-busy-ms)."""

from __future__ import annotations

import time
from collections.abc import Callable


def gil_busy_step(step: Callable[[], list], busy_ms: float) -> Callable[[], list]:
    """`step`, preceded by `busy_ms` of GIL-holding pure Python interleaved with tiny torch ops that
    release and retake the GIL (as kernel launches do): a GPU engine's host side, on a CPU. Debug only
    (EngineServerConfig.debug_gil_busy_ms)."""
    import torch

    t = torch.zeros(1)

    def busy_then_step() -> list:
        end = time.perf_counter() + busy_ms / 1e3
        while time.perf_counter() < end:
            x = 0
            for i in range(50):  # ~2-5 us of bytecode, then a "launch"
                x += i
            t.add_(1)
        return step()

    return busy_then_step
