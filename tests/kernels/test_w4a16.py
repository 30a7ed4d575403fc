"""The Triton W4A16 GEMM against x @ ((q - zero) * scale) computed in float64 from the unpacked integers:
group boundaries inside and across tiles, act-order permutations, odd K and N, split-K, fp32 and fp16."""

import pytest
import torch

from kernels.w4a16 import pick_config, w4a16, w4a16_reference

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def pack(q: torch.Tensor) -> torch.Tensor:
    """[K, N] 0..15 -> [ceil(K/8), N] int32, row 8p+i in bits 4i (GPTQ's order), written out by hand."""
    k, n = q.shape
    out = torch.zeros(-(-k // 8), n, dtype=torch.int64)
    for row in range(k):
        out[row // 8] |= q[row].long() << (4 * (row % 8))
    return torch.where(out >= 2 ** 31, out - 2 ** 32, out).to(torch.int32)


def case(m, k, n, group, act_order, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    groups = -(-k // group)
    q = torch.randint(0, 16, (k, n), generator=g)
    scales = torch.rand(groups, n, generator=g) * 0.05 + 0.01
    zeros = torch.randint(0, 16, (groups, n), generator=g)
    x = torch.randn(m, k, generator=g)
    perm = torch.randperm(k, generator=g) if act_order else None
    # Row r of the stored matrix is input feature perm[r] (rows sorted by group at load).
    w = (q - zeros[torch.arange(k) // group]).double() * scales.to(dtype).double()[torch.arange(k) // group]
    xs = x.to(dtype).double()
    ref = (xs[:, perm] if perm is not None else xs) @ w
    args = (x.to(DEV, dtype), pack(q).to(DEV), scales.to(DEV, dtype), zeros.to(DEV, torch.uint8), group,
            perm.to(DEV, torch.int32) if perm is not None else None)
    return args, ref


TILE = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=1)


@pytest.mark.parametrize("m, k, n, group, act_order, split", [
    (3, 128, 64, 32, False, 1),   # one group per tile: a scale row per tile
    (3, 128, 64, 16, False, 2),   # two groups inside each tile: a group per row; split-K
    (5, 96, 40, 24, True, 2),     # act-order permutation, a group size that is no power of two, N % 32 != 0
    (17, 100, 37, 100, False, 1),  # odd K (a partly filled last word) and odd N, one group over all of K
    (1, 256, 48, 64, True, 4),    # decode: M = 1, split-K 4 with act-order
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_w4a16_matches_float64(m, k, n, group, act_order, split, dtype):
    args, ref = case(m, k, n, group, act_order, dtype, seed=m * k + n)
    out = w4a16(*args, config={**TILE, "SPLIT_K": split})
    assert out.dtype == dtype and out.shape == (m, n)
    tol = 1e-5 if dtype == torch.float32 else 3e-3  # fp16: the dequantized weight is rounded to fp16
    torch.testing.assert_close(out.double().cpu(), ref, rtol=tol, atol=tol * ref.abs().max().item())
    torch.testing.assert_close(w4a16_reference(*args).double().cpu(), ref, rtol=tol,
                               atol=tol * ref.abs().max().item())


def test_w4a16_default_config_splits_k_for_small_batches():
    cfg = pick_config(1, 64, 4096, 128, torch.device("cpu"))  # 1 x 1 tiles on a 4-SM stand-in
    assert cfg["SPLIT_K"] > 1
    assert pick_config(256, 4096, 4096, 128, torch.device("cpu"))["SPLIT_K"] == 1
    args, ref = case(2, 64, 32, 32, False, torch.float32)
    torch.testing.assert_close(w4a16(*args).double().cpu(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_w4a16_refuses_mismatched_shapes():
    args, _ = case(2, 64, 32, 32, False, torch.float32)
    x, qw, s, z, group, _ = args
    with pytest.raises(ValueError, match="qweight"):
        w4a16(x, qw[:-1], s, z, group)
    with pytest.raises(ValueError, match="scales and zeros"):
        w4a16(x, qw, s, z, 16)
