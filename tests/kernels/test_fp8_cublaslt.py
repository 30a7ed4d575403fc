"""kernels/fp8_cublaslt.py on CPU: the ctypes structures have cublasLt.h's sizes (a wrong size would shift every
heuristic result read back), and a product of an unknown kind is refused before the library is touched (the GPU's
own checks: tests/gpu/test_fp8_cublaslt_gpu.py)."""

import ctypes

import pytest
import torch

from kernels import fp8_cublaslt as lt


def test_struct_sizes_match_the_header():
    assert ctypes.sizeof(lt._Algo) == 64  # cublasLtMatmulAlgo_t: uint64_t data[8]
    assert ctypes.sizeof(lt._Heuristic) == 96  # algo, size_t workspaceSize, status, float wavesCount, int reserved[4]


def test_plan_refuses_an_unknown_kind():
    with pytest.raises(ValueError, match="kind"):
        lt.Plan(4, 16, 32, torch.device("cpu"), kind="columns")
