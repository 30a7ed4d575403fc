"""FP8 x FP8 GEMM through TMA (tensor descriptors) for decode's row counts: raw = a @ w.T with a [M, K] and w [N, K]
e4m3, float32 accumulation, the product left unscaled in 16 bits -- what cuBLAS's tensor-wise GEMM with unit
scales returns for a deferred-scale FP8 layer (quantization/fp8.py's FP8Output). A fixed number of programs
(persistent) take output tiles, or K-slices of them (split-K through kernels/splitk.py's workspace), in an order
that keeps the M tiles sharing a weight tile together, so each weight tile is read from HBM once.

Why: at 256 rows cuBLAS runs the Llama-3-8B FP8 GEMMs at 0.8-1.2 PFLOP/s against 1.4 at 8,192 rows
(docs/quantization.md): its tiles leave part of the last wave idle (gate_up: 2 x 112 tiles of 128 x 256 on 132
SMs) or too few tiles for the SMs (down: 64 of 128 x 128). bench/fp8_step.py times this kernel's configs against
cuBLAS per shape; TUNED holds the winners, and only those run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import splitk
from kernels.splitk import splitk_store


@triton.jit
def _fp8_tma_kernel(
    a_desc, w_desc, out_ptr, ws_ptr, cnt_ptr, M, N, K, k_per_split, split_k, stride_om, programs,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
    PROMOTE: tl.constexpr = 0, FLATTEN: tl.constexpr = False, WS: tl.constexpr = False,
):
    """Work unit u (the `programs` programs take u, u + programs, ...): output tile u // split_k, K-slice u % split_k;
    tile t covers rows (t % num_m) * BLOCK_M and columns (t // num_m) * BLOCK_N."""
    num_m = tl.cdiv(M, BLOCK_M)
    units = num_m * tl.cdiv(N, BLOCK_N) * split_k
    k_blocks = tl.cdiv(K, BLOCK_K)
    # FLATTEN: Triton pipelines the next unit's first loads under this one's last K blocks; WS: warp-specialized
    # (a producer warp group issues the TMA loads) where this Triton builds it
    for u in tl.range(tl.program_id(0), units, programs, flatten=FLATTEN, warp_specialize=WS):
        tile = u // split_k
        pid_m, pid_n = tile % num_m, tile // num_m
        k0 = (u % split_k) * k_per_split
        k1 = tl.minimum(k_blocks, k0 + k_per_split)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(k0, k1):
            a = a_desc.load([pid_m * BLOCK_M, kb * BLOCK_K])
            w = w_desc.load([pid_n * BLOCK_N, kb * BLOCK_K])
            # e4m3 x e4m3 -> float32; w [N, K] is the K-major operand wgmma wants. PROMOTE: the tensor cores' partial
            # sums are added into float32 every PROMOTE products (cuBLAS's default); 0: Triton's default on sm_90,
            # never (cuBLAS's fast accumulation, which quantization/fp8.py keeps off at decode: docs/quantization.md)
            if PROMOTE:
                acc = tl.dot(a, w.T, acc, max_num_imprecise_acc=PROMOTE)
            else:
                acc = tl.dot(a, w.T, acc)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        splitk_store(acc, offs_m, offs_n, M, N, out_ptr, stride_om, 0, ws_ptr, cnt_ptr, tile, split_k, SPLIT, True)


TUNED: dict[tuple[int, int, int], dict] = {}
"""(M bucket, N, K) -> the config bench/fp8_step.py measured faster than cuBLAS's tensor-wise GEMM (by 3%);
shapes not listed run cuBLAS (quantization/fp8.py)."""


def m_bucket(m: int) -> int:
    """TUNED's row buckets: decode's graph batch sizes up to 512."""
    for b in (64, 128, 256, 512):
        if m <= b:
            return b
    return 1 << 30


def reserve_workspace(device: torch.device, n: int, k: int) -> None:
    """The split-K sums TUNED's configs for an [N, K] weight need, reserved at load (before graph capture)."""
    rows = [b for (b, nn, kk), cfg in TUNED.items() if nn == n and kk == k and cfg.get("SPLIT_K", 1) > 1]
    if rows:
        splitk.reserve(device, max(rows) * n)


def fp8_tma(a: torch.Tensor, weight: torch.Tensor, config: dict, out_dtype: torch.dtype = torch.bfloat16,
            programs: int | None = None, warmup: bool = False) -> torch.Tensor | None:
    """a [M, K] float8_e4m3fn @ weight [N, K] float8_e4m3fn .T -> [M, N] in out_dtype, unscaled. `config`:
    BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K (default 1), PER_SM (programs per SM, default 1), PROMOTE (<= BLOCK_K),
    FLATTEN, WS (the kernel's), num_warps, num_stages.
    `programs`: the program count instead of PER_SM x the SMs (tests); `warmup`: compile only (benches)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    if a.dim() != 2 or weight.dim() != 2 or a.shape[1] != weight.shape[1]:
        raise ValueError(f"a must be [M, K] and weight [N, K], got {tuple(a.shape)} and {tuple(weight.shape)}")
    for name, t in (("a", a), ("weight", weight)):
        if t.dtype != torch.float8_e4m3fn or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous float8_e4m3fn tensor, got {t.dtype} strides {t.stride()}")
    m, k = a.shape
    n = weight.shape[0]
    if k % 16:
        raise ValueError(f"K must be a multiple of 16 (TMA's 16-byte row alignment), got {k}")
    cfg = dict(config)
    bm, bn, bk = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N"), cfg.pop("BLOCK_K")
    split, per_sm = cfg.pop("SPLIT_K", 1), cfg.pop("PER_SM", 1)
    k_blocks = triton.cdiv(k, bk)
    k_per_split = triton.cdiv(k_blocks, split)
    split = triton.cdiv(k_blocks, k_per_split)
    out, ws, cnt = splitk.outputs(torch.empty(0, dtype=out_dtype, device=a.device), m, n, split, True)
    if m == 0:
        return out
    units = triton.cdiv(m, bm) * triton.cdiv(n, bn) * split
    progs = min(units, programs or per_sm * splitk.sm_count(a.device))
    a_desc = TensorDescriptor.from_tensor(a, [bm, bk])
    w_desc = TensorDescriptor.from_tensor(weight, [bn, bk])
    args = (a_desc, w_desc, out, ws, cnt, m, n, k, k_per_split, split, out.stride(0), progs)
    consts = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT=split > 1, **cfg)
    if warmup:
        _fp8_tma_kernel.warmup(*args, grid=(progs,), **consts)
        return None
    _fp8_tma_kernel[(progs,)](*args, **consts)
    return out
