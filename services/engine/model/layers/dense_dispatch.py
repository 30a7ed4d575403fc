"""Which GEMM computes a 16-bit dense projection x @ w.T: cuBLAS (F.linear), cuBLASLt, or kernels/dense_gemm.py,
where a table measured on the device says that one is faster for the weight's shape and the row count.

Decode steps multiply a few to a few hundred rows by each weight, and the library's heuristic pick for some of
those (M, N, K) is measurably slower than another available one (bench/chat_profile.py times every candidate
on the workloads' shapes and prints the table). A CUDA graph records whichever kernel its bucket's row count
picks, so the choice costs nothing per replay.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

Entry = tuple[tuple[int, dict | str | None], ...]

CUBLASLT = "cublaslt"

TABLE: dict[tuple[str, int, int], Entry] = {
    # Llama-3-8B's o_proj and down_proj on an H200 (bench/chat_profile.py round 1, 2026-11-29, one GEMM timed
    # alone with the L2 flushed, median of 20): cuBLASLt's pick beats cuBLAS's from 32 to 192 rows, by 5-13%
    # (o: 0.0184 vs 0.0211 ms at 96 rows; down: 0.0414 vs 0.0453), and loses at 16 and 256. cuBLAS on a
    # K-major copy of the weight won by at most 4% (not worth a second layout).
    ("NVIDIA H200", 4096, 4096): ((16, None), (192, CUBLASLT)),
    ("NVIDIA H200", 4096, 14336): ((16, None), (192, CUBLASLT)),
    # gate_up and the LM head, from bench/decode_fixed.py round 1 (2026-11-29; each launch timed from a CUDA
    # graph of 10 calls over rotating weights, which chat_profile's per-call timing was not: it also counted
    # dense_gemm's ~50 us of host work): gate_up at 1 row dense_gemm 0.0563 ms against cuBLAS 0.0623, at 64
    # rows cuBLASLt 0.0600 against 0.0626; the LM head (1 GB) at 1-64 rows dense_gemm 0.2358 / 0.2407 /
    # 0.2483 / 0.2610 ms against cuBLAS 0.2480 / 0.2525 / 0.2655 / 0.2824 at 1 / 16 / 32 / 64 rows. A
    # 32-sequence decode step with these (and the two above) replayed in 5.199 ms against 5.344.
    ("NVIDIA H200", 28672, 4096): ((1, dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SWAP=True, num_warps=4, num_stages=4)),
                                   (32, None), (64, CUBLASLT)),
    ("NVIDIA H200", 128256, 4096): (
        (16, dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, SWAP=True, num_warps=4, num_stages=3)),
        (32, dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, SWAP=True, num_warps=4, num_stages=4)),
        (64, dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, SWAP=False, num_warps=4, num_stages=4))),
}
"""(device name, N, K) -> ((largest M, choice), ...) by ascending M, the choice a dense_gemm config, CUBLASLT,
or None for cuBLAS; a row count above the last entry, a shape or device not listed: cuBLAS."""


ENABLED = os.environ.get("FOLIO_DENSE_GEMM", "1") != "0"
"""FOLIO_DENSE_GEMM=0 (read at import) sends every projection to cuBLAS, for comparisons."""


def enabled() -> bool:
    return ENABLED


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


def config_for(device_name: str, m: int, n: int, k: int, table: dict | None = None) -> dict | str | None:
    """The choice for an [m, k] x [n, k].T product on this device: a dense_gemm launch, CUBLASLT, or None (cuBLAS)."""
    entry = (TABLE if table is None else table).get((device_name, n, k))
    for top, cfg in entry or ():
        if m <= top:
            return cfg
    return None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias), through dense_gemm where the table picks it (2-D 16-bit input, no bias)."""
    if ENABLED and bias is None and x.dim() == 2 and x.dtype == weight.dtype and x.dtype in _SIXTEEN:
        cfg = config_for(_device_name(x), x.shape[0], weight.shape[0], weight.shape[1])
        if cfg == CUBLASLT:
            return _cublaslt(x, weight) if x.is_cuda else F.linear(x, weight)
        if cfg is not None:
            from kernels.dense_gemm import dense_gemm

            return dense_gemm(x, weight, cfg)
    return F.linear(x, weight, bias)


def _cublaslt(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear through cuBLASLt: torch's preferred BLAS library is process-wide state, set for this one call
    (a step's forward runs in one thread) and restored."""
    blas = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library(CUBLASLT)
    try:
        return F.linear(x, weight)
    finally:
        torch.backends.cuda.preferred_blas_library(blas)


def warmup(device: torch.device, dtype: torch.dtype) -> int:
    """Compile every dense_gemm build this device's table can pick (each config with and without split-K:
    the two builds), on small scratch operands: Triton's builds depend on the launch config and the operands'
    alignment, not their sizes. Without it the LM head, which runs eagerly on each step's own row count,
    would compile inside served steps. Returns the number of builds run."""
    if device.type != "cuda" or not ENABLED or dtype not in _SIXTEEN:
        return 0
    from kernels.dense_gemm import dense_gemm

    name = torch.cuda.get_device_name(device)
    configs = {repr(c): c for (dev, _, _), entry in TABLE.items() if dev == name for _, c in entry
               if isinstance(c, dict)}
    for cfg in configs.values():
        k = 4 * cfg["BLOCK_K"]  # room for two K-slices of two blocks each
        x = torch.zeros(16, k, device=device, dtype=dtype)
        w = torch.zeros(64, k, device=device, dtype=dtype)
        for split in (1, 2):
            dense_gemm(x, w, dict(cfg, SPLIT_K=split))
    return 2 * len(configs)
