"""Which GEMM computes a 16-bit dense projection x @ w.T: cuBLAS (F.linear), or kernels/dense_gemm.py where a
table measured on the device says its launch is faster for that weight shape and row count.

Decode steps multiply a few to a few hundred rows by each weight; cuBLAS's heuristic pick for some of those
(M, N, K) reads the weight well below the copy rate (bench/chat_profile.py measures every candidate against
cuBLAS on the workloads' shapes and prints the table). A CUDA graph records whichever kernel its bucket's
row count picks, so the choice costs nothing per replay.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

Entry = tuple[tuple[int, dict | None], ...]

TABLE: dict[tuple[str, int, int], Entry] = {}
"""(device name, N, K) -> ((largest M, dense_gemm config, or None for cuBLAS), ...) by ascending M; a row
count above the last entry, a shape or device not listed: cuBLAS."""


def enabled() -> bool:
    """FOLIO_DENSE_GEMM=0 sends every projection to cuBLAS (for comparisons)."""
    return os.environ.get("FOLIO_DENSE_GEMM", "1") != "0"


_device_names: dict[int, str] = {}
_SIXTEEN = (torch.float16, torch.bfloat16)


def _device_name(x: torch.Tensor) -> str:
    """The CUDA device's name ("NVIDIA H200"); "cpu" on CPU (only tests list it: the kernel runs there under
    the Triton interpreter)."""
    if not x.is_cuda:
        return x.device.type
    i = x.device.index if x.device.index is not None else torch.cuda.current_device()
    if i not in _device_names:
        _device_names[i] = torch.cuda.get_device_name(i)
    return _device_names[i]


def config_for(device_name: str, m: int, n: int, k: int, table: dict | None = None) -> dict | None:
    """The dense_gemm launch for an [m, k] x [n, k].T product on this device, or None for cuBLAS."""
    entry = (TABLE if table is None else table).get((device_name, n, k))
    for top, cfg in entry or ():
        if m <= top:
            return cfg
    return None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias), through dense_gemm where the table picks it (2-D 16-bit input, no bias)."""
    if bias is None and TABLE and x.dim() == 2 and x.dtype == weight.dtype and x.dtype in _SIXTEEN and enabled():
        cfg = config_for(_device_name(x), x.shape[0], weight.shape[0], weight.shape[1])
        if cfg is not None:
            from kernels.dense_gemm import dense_gemm

            return dense_gemm(x, weight, cfg)
    return F.linear(x, weight, bias)


def warmup(device: torch.device, dtype: torch.dtype) -> int:
    """Compile every dense_gemm build this device's table can pick (each config with and without split-K:
    the two builds), on small scratch operands: Triton's builds depend on the launch config and the operands'
    alignment, not their sizes. Without it the LM head, which runs eagerly on each step's own row count,
    would compile inside served steps. Returns the number of builds run."""
    if device.type != "cuda" or not TABLE or not enabled() or dtype not in (torch.float16, torch.bfloat16):
        return 0
    from kernels.dense_gemm import dense_gemm

    name = torch.cuda.get_device_name(device)
    configs = {repr(c): c for (dev, _, _), entry in TABLE.items() if dev == name for _, c in entry if c is not None}
    for cfg in configs.values():
        k = 4 * cfg["BLOCK_K"]  # room for two K-slices of two blocks each
        x = torch.zeros(16, k, device=device, dtype=dtype)
        w = torch.zeros(64, k, device=device, dtype=dtype)
        for split in (1, 2):
            dense_gemm(x, w, dict(cfg, SPLIT_K=split))
    return 2 * len(configs)
