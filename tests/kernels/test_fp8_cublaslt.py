"""kernels/fp8_cublaslt.py on CPU: the ctypes structures have cublasLt.h's sizes (a wrong size would shift every
heuristic result read back), and the fall-back to torch._scaled_mm wherever TUNED names no
algorithm or the operands are not on a GPU (the GPU's own checks: tests/gpu/test_fp8_cublaslt_gpu.py)."""

import ctypes

import torch

from kernels import fp8_cublaslt as lt


def test_struct_sizes_match_the_header():
    assert ctypes.sizeof(lt._Algo) == 64  # cublasLtMatmulAlgo_t: uint64_t data[8]
    assert ctypes.sizeof(lt._Heuristic) == 96  # algo, size_t workspaceSize, status, float wavesCount, int reserved[4]


def test_falls_back_off_the_gpu_and_without_a_table(monkeypatch):
    xq = torch.zeros(4, 32).to(torch.float8_e4m3fn)
    w = torch.zeros(16, 32).to(torch.float8_e4m3fn)
    xs, ws = torch.ones(4, 1), torch.ones(1, 16)
    monkeypatch.setattr(lt, "TUNED", {(4, 16, 32, kind): {"algo": 1} for kind in lt.KINDS})
    assert lt.scaled_mm_unit(xq, w) is None  # CPU tensors: never the library
    assert lt.scaled_mm_rowwise(xq, xs, w, ws, fast_accum=True) is None
    monkeypatch.setattr(lt, "TUNED", {})
    assert lt.scaled_mm_unit(xq, w) is None


def test_plan_refuses_an_unknown_kind():
    try:
        lt.Plan(4, 16, 32, torch.device("cpu"), kind="columns")
    except ValueError as e:
        assert "kind" in str(e)
    else:
        raise AssertionError("no ValueError")
