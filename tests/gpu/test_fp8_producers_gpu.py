"""kernels/fp8_fused.py's one-launch SwiGLU + FP8 forms compiled on a GPU, bit for bit the split launches: whole rows
per program (ROW; prefill's unscaled rows) and tiles that wait for their row group's amax (ONE; a decode batch as one
group, with gate/up's deferred scales applied), the latter twice over a CUDA graph's replays (its counts are left at
zero). Run: .venv/bin/python -m pytest -q tests/gpu/test_fp8_producers_gpu.py"""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from kernels import fp8_fused, fp8_quant  # noqa: E402

DEVICE = torch.device("cuda")
SPLIT = dict(ROWS=4, BLOCK=512, num_warps=4)


def same(a, b):
    return torch.equal(a[0].view(torch.uint8), b[0].view(torch.uint8)) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("m", [8192, 5000])
def test_gpu_swiglu_fp8_whole_rows_equal_the_split(m):
    g = torch.Generator(device=DEVICE).manual_seed(m)
    gate_up = (torch.randn(m, 2 * 14336, generator=g, device=DEVICE) * 0.4).to(torch.bfloat16)
    assert same(fp8_fused.silu_mul_fp8(gate_up, split=dict(ROWS=1, num_warps=16, ROW=True)),
                fp8_fused.silu_mul_fp8(gate_up, split=SPLIT))


@pytest.mark.parametrize("m", [256, 200, 64])
@pytest.mark.parametrize("cfg", [dict(ROWS=256, BLOCK=128, num_warps=16, ONE=True),
                                 dict(ROWS=128, BLOCK=256, num_warps=16, ONE=True)], ids=["256x128", "128x256"])
def test_gpu_swiglu_fp8_row_group_launch_equals_the_split(m, cfg):
    g = torch.Generator(device=DEVICE).manual_seed(m)
    xs = [(torch.randn(m, 2 * 14336, generator=g, device=DEVICE) * 40).to(torch.bfloat16) for _ in range(3)]
    sc = (torch.rand(m, 1, generator=g, device=DEVICE) * 0.01, torch.rand(1, 2 * 14336, generator=g, device=DEVICE) * 0.01)
    out = [None] * 3

    def body():
        for i, x in enumerate(xs):
            out[i] = fp8_fused.silu_mul_fp8(x, scales=sc, split=cfg)

    body()  # compiled outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    for _ in range(3):
        for x in xs:
            x.mul_(-1.5)
        graph.replay()
        for x, got in zip(xs, out):
            assert same(got, fp8_fused.silu_mul_fp8(x, scales=sc, split=SPLIT))
    for name in ("swiglu_sync", "swiglu_amax"):
        assert not fp8_quant.zeroed(DEVICE, 1, name).any()
