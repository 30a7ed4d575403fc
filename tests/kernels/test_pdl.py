"""kernels/pdl.py: programmatic dependent launch is GPU-only (Hopper and newer); switched on where it cannot
run (CPU, the interpreter) the kernels launch as before and give the same results."""

import torch

from kernels import pdl
from kernels.silu_mul import silu_mul, silu_mul_ref


def test_pdl_is_off_on_cpu_even_when_enabled(monkeypatch):
    monkeypatch.setattr(pdl, "ENABLED", True)
    x = torch.randn(3, 64)
    assert not pdl.on(x) and pdl.args(x) == {}
    torch.testing.assert_close(silu_mul(x), silu_mul_ref(x), rtol=1e-5, atol=1e-5)
