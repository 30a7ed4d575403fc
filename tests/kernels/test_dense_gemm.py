"""kernels/dense_gemm.py under the interpreter (compiled on a GPU): against a float64 reference, swapped and
plain tiles, with and without split-K and the prefetched first weight tile, row and column counts that do not
fill a tile, and bit-identical results across calls (no atomics)."""

import pytest
import torch

from kernels.dense_gemm import dense_gemm, dense_gemm_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m, n, k, cfg", [
    (1, 48, 96, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, SWAP=True, SPLIT_K=1)),
    (5, 70, 200, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, SWAP=True, SPLIT_K=3)),  # split that does not divide K
    (21, 64, 128, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, SWAP=False, SPLIT_K=2)),  # two M tiles
    (33, 40, 64, dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=64, SWAP=False, SPLIT_K=None)),  # split picked for the SMs
    # the first weight tile loaded before the PDL wait: split slices, K shorter than one block, a two-block split
    (5, 70, 200, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, SWAP=True, SPLIT_K=3, PREFETCH=True)),
    (21, 64, 24, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, SWAP=False, SPLIT_K=1, PREFETCH=True)),
    (3, 40, 96, dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=64, SWAP=True, SPLIT_K=4, PREFETCH=True)),
])
def test_dense_gemm_matches_float64(dtype, m, n, k, cfg):
    g = torch.Generator().manual_seed(m * 131 + n)
    x = torch.randn(m, k, generator=g).to(DEV, dtype)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(DEV, dtype)
    y = dense_gemm(x, w, dict(cfg, num_warps=4, num_stages=2))
    ref = dense_gemm_ref(x.cpu(), w.cpu())
    assert y.shape == (m, n) and y.dtype == dtype
    # float32 sums rounded once to the 16-bit dtype: within one ulp of the float64 result (plus a little for
    # float32 accumulation over k terms).
    ulp = 2.0 ** (-7 if dtype == torch.bfloat16 else -10)
    assert ((y.cpu().double() - ref).abs() <= ulp * ref.abs() + 1e-4).all()
    assert torch.equal(y, dense_gemm(x, w, dict(cfg, num_warps=4, num_stages=2)))  # deterministic


def test_dense_gemm_reads_a_strided_input_and_refuses_bad_arguments():
    x = torch.randn(4, 64).to(DEV, torch.bfloat16)
    w = torch.randn(32, 64).to(DEV, torch.bfloat16)
    wide = torch.randn(4, 128).to(DEV, torch.bfloat16)
    xs = wide[:, :64]  # row stride 128
    y = dense_gemm(xs, w, dict(BLOCK_N=32, BLOCK_K=32, SPLIT_K=1, num_stages=2))
    assert ((y.cpu().double() - dense_gemm_ref(xs.cpu(), w.cpu())).abs() <= 2 ** -7 * dense_gemm_ref(xs.cpu(), w.cpu()).abs() + 1e-4).all()
    with pytest.raises(ValueError, match="x must be"):
        dense_gemm(x, w[:, :32])
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        dense_gemm(x.float(), w.float())
    with pytest.raises(ValueError, match="BLOCK_N"):
        dense_gemm(x, w, dict(BLOCK_N=24))


def test_dispatch_table_picks_by_device_shape_and_row_count():
    from services.engine.model.layers import dense_dispatch as dd

    a, b = dict(BLOCK_M=16, BLOCK_N=64), dict(BLOCK_M=64, BLOCK_N=128)
    table = {("GPU X", 6144, 4096): ((16, a), (48, None), (128, b))}
    assert dd.config_for("GPU X", 1, 6144, 4096, table) == a
    assert dd.config_for("GPU X", 16, 6144, 4096, table) == a
    assert dd.config_for("GPU X", 17, 6144, 4096, table) is None  # cuBLAS between the two
    assert dd.config_for("GPU X", 100, 6144, 4096, table) == b
    assert dd.config_for("GPU X", 129, 6144, 4096, table) is None  # above the last entry
    assert dd.config_for("GPU Y", 1, 6144, 4096, table) is None  # another device
    assert dd.config_for("GPU X", 1, 4096, 4096, table) is None  # another shape
    lt = {("GPU X", 4096, 4096): ((16, None), (192, dd.CUBLASLT))}
    assert [dd.config_for("GPU X", m, 4096, 4096, lt) for m in (16, 17, 192, 193)] == [None, dd.CUBLASLT, dd.CUBLASLT, None]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuBLASLt needs CUDA (a CPU build refuses the setting)")
def test_cublaslt_choice_on_cuda_computes_f_linear_and_restores_the_preferred_library():
    from services.engine.model.layers import dense_dispatch as dd

    before = torch.backends.cuda.preferred_blas_library()
    x, w = torch.randn(24, 64, device=DEV).bfloat16(), torch.randn(32, 64, device=DEV).bfloat16()
    y = dd._cublaslt(x, w)
    assert torch.backends.cuda.preferred_blas_library() == before
    assert torch.allclose(y.float(), torch.nn.functional.linear(x, w).float(), atol=1e-2, rtol=1e-2)


def test_dispatch_linear_takes_the_table_only_where_it_applies(monkeypatch):
    """float32, a bias or the switch off: exactly F.linear; a listed 16-bit shape: dense_gemm."""
    from kernels import dense_gemm as dg
    from services.engine.model.layers import dense_dispatch as dd

    cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, SPLIT_K=1, num_stages=2)
    monkeypatch.setitem(dd.TABLE, (DEV if DEV == "cpu" else torch.cuda.get_device_name(), 32, 64), ((64, cfg),))
    calls = []
    real = dg.dense_gemm
    monkeypatch.setattr(dg, "dense_gemm", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, w, bias = torch.randn(4, 64, device=DEV), torch.randn(32, 64, device=DEV), torch.randn(32, device=DEV)
    assert torch.equal(dd.linear(x, w, None), torch.nn.functional.linear(x, w))
    xb, wb = x.bfloat16(), w.bfloat16()
    assert torch.equal(dd.linear(xb, wb, bias.bfloat16()), torch.nn.functional.linear(xb, wb, bias.bfloat16()))
    assert not calls
    y = dd.linear(xb, wb, None)
    assert calls == [1] and torch.equal(y, real(xb, wb, cfg))
    assert dd.linear(xb[:, :32], wb[:, :32], None).shape == (4, 32) and calls == [1]  # (32, 32): not listed
    monkeypatch.setattr(dd, "ENABLED", False)
    assert torch.equal(dd.linear(xb, wb, None), torch.nn.functional.linear(xb, wb)) and calls == [1]
    assert dd.warmup(torch.device("cpu"), torch.bfloat16) == 0
