"""kernels/fp8_cublaslt.py on a GPU (Hopper): every candidate cuBLASLt offers for a decode GEMM, run through the
direct binding, against the float64 product (within twice torch._scaled_mm's own error), and one replayed from a CUDA
graph equal to its eager call. Run: .venv/bin/python -m pytest -q tests/gpu/test_fp8_cublaslt_gpu.py"""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from kernels import fp8_cublaslt as lt  # noqa: E402

DEVICE = torch.device("cuda")


def _operands(m, n, k, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    w = (torch.randn(n, k, generator=g, device=DEVICE) * 0.02).to(torch.float8_e4m3fn)
    xq = (torch.randn(m, k, generator=g, device=DEVICE) * 20).to(torch.float8_e4m3fn)
    return xq, w


@pytest.mark.parametrize("kind", lt.KINDS)
@pytest.mark.parametrize("m,n,k", [(256, 4096, 4096), (256, 6144, 4096), (96, 4096, 14336), (200, 2048, 512)])
def test_every_candidate_matches_float64(m, n, k, kind):
    xq, w = _operands(m, n, k)
    g = torch.Generator(device=DEVICE).manual_seed(2)
    if kind == "unit":
        xs = ws = torch.ones((), device=DEVICE)
        scales = {}
    else:
        xs = torch.rand(m, 1, generator=g, device=DEVICE) * 0.01 + 1e-3
        ws = torch.rand(1, n, generator=g, device=DEVICE) * 1e-3 + 1e-4
        scales = {"xs": xs, "ws": ws}
    ref = (xq.double() @ w.double().t()) * xs.double() * ws.double()
    fast = {"use_fast_accum": True} if kind == "row fast" else {}
    torch_err = (torch._scaled_mm(xq, w.t(), scale_a=xs, scale_b=ws, out_dtype=torch.bfloat16, **fast).double()
                 - ref).abs().max().item()
    plan = lt.Plan(m, n, k, DEVICE, kind)
    plan.set_scales(scales.get("xs"), scales.get("ws"))
    cands = plan.candidates(16)
    assert cands, "cuBLASLt offered no FP8 algorithm"
    for c in cands:
        y = plan.run(xq, w, c["algo"], **scales)
        assert y.shape == (m, n) and y.dtype == torch.bfloat16
        assert (y.double() - ref).abs().max().item() <= 2 * torch_err + 1e-6 * ref.abs().max().item(), c["config"]


def test_a_candidate_replays_in_a_cuda_graph():
    m, n, k = 256, 4096, 4096
    xq, w = _operands(m, n, k, seed=1)
    plan = lt.Plan(m, n, k, DEVICE)
    algo = plan.candidates(8)[-1]["algo"]  # not the heuristic's first pick
    eager = plan.run(xq, w, algo)
    out = {}
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out["y"] = plan.run(xq, w, algo)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out["y"], eager)
