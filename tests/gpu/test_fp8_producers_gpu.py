"""kernels/fp8_fused.py's one-launch SwiGLU + FP8 of whole rows per program (ROW; prefill's unscaled rows) compiled on
a GPU, bit for bit the split launches. Run: .venv/bin/python -m pytest -q tests/gpu/test_fp8_producers_gpu.py"""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from kernels import fp8_fused  # noqa: E402

DEVICE = torch.device("cuda")
SPLIT = dict(ROWS=4, BLOCK=512, num_warps=4)


def same(a, b):
    return torch.equal(a[0].view(torch.uint8), b[0].view(torch.uint8)) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("m", [8192, 5000])
@pytest.mark.parametrize("row", [dict(ROWS=1, num_warps=16, ROW=True),
                                 dict(ROWS=1, num_warps=16, ROW=True, PIECES=True),
                                 dict(ROWS=1, num_warps=16, ROW=True, PIECES=True, maxnreg=64)])
def test_gpu_swiglu_fp8_whole_rows_equal_the_split(m, row):
    g = torch.Generator(device=DEVICE).manual_seed(m)
    gate_up = (torch.randn(m, 2 * 14336, generator=g, device=DEVICE) * 0.4).to(torch.bfloat16)
    assert same(fp8_fused.silu_mul_fp8(gate_up, split=row), fp8_fused.silu_mul_fp8(gate_up, split=SPLIT))
