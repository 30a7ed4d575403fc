"""Programmatic dependent launch (PDL, Hopper and newer) for the kernels of a decode step: on unless FOLIO_PDL=0
(or `ENABLED` cleared before the CUDA graphs are captured). tests/gpu/test_pdl_gpu.py (tokens and logprobs the
same with it off, on, and on with EARLY) passed on an H200 (2026-11-29).

At batch 1 a decode step is ~350 small kernels, and the gap between one kernel's end and the next one's
start costs about as much as many of them run. A kernel launched with PDL may start while the previous
kernel is still finishing; it waits (`griddepcontrol.wait`) for that kernel's completion and memory before
it touches anything the previous kernels wrote, and it lets the next kernel launch as soon as it has
started (`griddepcontrol.launch_dependents`: the next kernel still waits for this one's completion). The
kernels here call `enter` first thing, so the only change is when launches happen. The W4A16 GEMVs
(kernels/w4a16.py) read their first weight tile before waiting: weights are not written by any kernel.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

ENABLED = os.environ.get("FOLIO_PDL", "1") != "0"
EARLY = os.environ.get("FOLIO_PDL_EARLY", "") == "1"


@functools.lru_cache(maxsize=None)
def _hopper(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def on(t: torch.Tensor) -> bool:
    """Launch this kernel with PDL: enabled, on a CUDA device of compute capability 9.0 or newer."""
    return ENABLED and t.is_cuda and _hopper(t.device.index if t.device.index is not None else torch.cuda.current_device())


def args(t: torch.Tensor) -> dict:
    """Keyword arguments for a kernel launch whose kernel calls `enter(PDL)`: {} when PDL is off."""
    return {"PDL": 2 if EARLY else 1, "launch_pdl": True} if on(t) else {}


@triton.jit
def enter(PDL: tl.constexpr):
    """A PDL kernel's first statement: wait for the previous kernel, then let the next one launch (PDL 1, or
    True), or the other way round (PDL 2: EARLY)."""
    if PDL == 2:
        gdc_launch_dependents()
        gdc_wait()
    elif PDL:
        gdc_wait()
        gdc_launch_dependents()


__all__ = ["ENABLED", "EARLY", "on", "args", "enter"]
