"""kernels/fp8_tma.py (the TMA FP8 GEMM) under the interpreter: the unscaled product of e4m3 operands against
float64, with ragged M, N and K tiles, several tiles per program and split-K; and its refusals."""

import pytest
import torch

from kernels.fp8_tma import fp8_tma


@pytest.mark.parametrize("m, k, n, split, programs", [(20, 96, 48, 1, 3), (33, 160, 40, 2, 5), (16, 64, 32, 3, 2)])
def test_fp8_tma_matches_float64(m, k, n, split, programs):
    g = torch.Generator().manual_seed(m)
    a = (torch.randn(m, k, generator=g) * 20).to(torch.float8_e4m3fn)
    w = (torch.randn(n, k, generator=g) * 20).to(torch.float8_e4m3fn)
    cfg = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, SPLIT_K=split, PROMOTE=32 if split == 2 else 0)
    out = fp8_tma(a, w, cfg, out_dtype=torch.float32, programs=programs)
    ref = a.double() @ w.double().T
    assert out.shape == (m, n) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())
    # again (the split-K workspace is zero again), in bfloat16: the interpreter's cast truncates (2^-7, not 2^-8)
    again = fp8_tma(a, w, cfg, out_dtype=torch.bfloat16, programs=programs)
    torch.testing.assert_close(again.double(), ref, rtol=2 ** -7, atol=1e-6 * ref.abs().max().item())


def test_fp8_tma_refuses_bad_operands():
    a, w = torch.zeros(4, 32, dtype=torch.float8_e4m3fn), torch.zeros(8, 32, dtype=torch.float8_e4m3fn)
    cfg = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32)
    with pytest.raises(ValueError, match="a must be"):
        fp8_tma(a, torch.zeros(8, 16, dtype=torch.float8_e4m3fn), cfg)
    with pytest.raises(ValueError, match="weight must be a contiguous float8_e4m3fn"):
        fp8_tma(a, torch.zeros(8, 32), cfg)
    with pytest.raises(ValueError, match="multiple of 16"):
        fp8_tma(torch.zeros(4, 24, dtype=torch.float8_e4m3fn), torch.zeros(8, 24, dtype=torch.float8_e4m3fn), cfg)
