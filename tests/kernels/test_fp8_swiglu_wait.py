"""kernels/fp8_swiglu_wait.py under the interpreter: its two-launch form (the interpreter runs programs one after
another, so the one-launch wait runs on the GPU only: bench/fp8_step.py checks it there) gives the split launches'
bits (kernels/fp8_fused.py) with and without gate_up's scales and the activation bound, part-full row groups and
column blocks; FP8_LAUNCH's WAIT entry routes silu_mul_fp8 through it; the one launch is refused off the GPU."""

import pytest
import torch

from kernels import fp8_fused, fp8_swiglu_wait as sw

SPLIT = {"ROWS": 4, "BLOCK": 64, "num_warps": 4}


def same_bits(a, b):
    return torch.equal(a[0].view(torch.uint8), b[0].view(torch.uint8)) and torch.equal(a[1], b[1])


def _case(t, inter, scaled, seed=0):
    g = torch.Generator().manual_seed(seed)
    gate_up = (torch.randn(t, 2 * inter, generator=g) * (40 if scaled else 2)).to(torch.bfloat16)
    gate_up[0, :3] = torch.tensor([0.0, -0.0, 1e-30])
    scales = (torch.rand(t, 1, generator=g) * 0.01 + 1e-3, torch.rand(1, 2 * inter, generator=g) * 0.01) \
        if scaled else None
    return gate_up, scales


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("ub", [None, 0.5])
@pytest.mark.parametrize("cfg", [{"ROWS": 4, "BLOCK": 64, "num_warps": 4}, {"ROWS": 8, "BLOCK": 128, "CHUNK": 32, "num_warps": 4}])
def test_two_launch_form_equals_the_split(scaled, ub, cfg):
    gate_up, scales = _case(13, 200, scaled)  # 13 rows, 200 columns: part-full groups and blocks
    got = sw.silu_mul_fp8_wait(gate_up, ub, scales, cfg)
    want = fp8_fused.silu_mul_fp8(gate_up, ub, scales=scales, split=SPLIT)
    assert same_bits(got, want)


def test_launch_table_routes_through_it(monkeypatch):
    gate_up, scales = _case(9, 96, True, seed=1)
    calls = []
    real = sw.silu_mul_fp8_wait
    monkeypatch.setattr(sw, "silu_mul_fp8_wait", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(fp8_fused, "FP8_LAUNCH", [(64, {"ROWS": 4, "BLOCK": 32, "num_warps": 4, "WAIT": True})])
    got = fp8_fused.silu_mul_fp8(gate_up, None, scales=scales)
    assert calls and same_bits(got, fp8_fused.silu_mul_fp8(gate_up, None, scales=scales, split=SPLIT))


def test_one_launch_needs_cuda():
    gate_up, _ = _case(4, 32, False)
    with pytest.raises(ValueError, match="needs CUDA"):
        sw.silu_mul_fp8_wait(gate_up, None, None, {"ROWS": 4, "BLOCK": 32}, phases=1)
