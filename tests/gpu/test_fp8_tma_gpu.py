"""kernels/fp8_tma.py compiled on a Hopper GPU: the Llama-3-8B decode GEMMs at 256 rows (and a ragged 200) against
the float64 product of the same e4m3 operands, as exact as cuBLAS's tensor-wise GEMM (within 1.5x of its error
relative to the largest output), with and without split-K, twice (the split-K workspace is left at zero); and
FP8 SwiGLU's whole-row launch bit for bit the split launches. Run: .venv/bin/python -m pytest -q
tests/gpu/test_fp8_tma_gpu.py"""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available()
                                                  or torch.cuda.get_device_capability() < (9, 0),
                                                  reason="needs a Hopper GPU (TMA)")]

from kernels import fp8_fused  # noqa: E402
from kernels.fp8_tma import fp8_tma  # noqa: E402

DEVICE = torch.device("cuda")
CONFIGS = [dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=4, PROMOTE=128),
           dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=128, SPLIT_K=2, num_warps=4, num_stages=5, PROMOTE=128)]


def rel_err(got, ref):
    return ((got.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("n, k", [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)])
@pytest.mark.parametrize("m", [256, 200])
@pytest.mark.parametrize("cfg", CONFIGS, ids=["128x128", "128x64_split2"])
def test_gpu_fp8_tma_as_exact_as_cublas(n, k, m, cfg):
    g = torch.Generator(device=DEVICE).manual_seed(n + k + m)
    x = (torch.randn(m, k, generator=g, device=DEVICE) * 50).to(torch.float8_e4m3fn)
    w = (torch.randn(n, k, generator=g, device=DEVICE) * 0.05).to(torch.float8_e4m3fn)
    ref = x.double() @ w.double().T
    unit = torch.ones((), device=DEVICE)
    cublas = rel_err(torch._scaled_mm(x, w.t(), scale_a=unit, scale_b=unit, out_dtype=torch.bfloat16), ref)
    for _ in range(2):
        got = fp8_tma(x, w, cfg)
        assert got.shape == (m, n) and got.dtype == torch.bfloat16
        assert rel_err(got, ref) <= 1.5 * cublas + 1e-4


@pytest.mark.parametrize("m", [8192, 5000])
def test_gpu_swiglu_fp8_whole_rows_equal_the_split(m):
    g = torch.Generator(device=DEVICE).manual_seed(m)
    gate_up = (torch.randn(m, 2 * 14336, generator=g, device=DEVICE) * 0.4).to(torch.bfloat16)
    row = fp8_fused.silu_mul_fp8(gate_up, split=dict(ROWS=1, num_warps=16, ROW=True))
    split = fp8_fused.silu_mul_fp8(gate_up, split=dict(ROWS=4, BLOCK=512, num_warps=4))
    assert torch.equal(row[0].view(torch.uint8), split[0].view(torch.uint8)) and torch.equal(row[1], split[1])
