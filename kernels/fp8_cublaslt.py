"""cuBLASLt's FP8 GEMM called directly (ctypes, the libcublasLt torch loaded), to measure the algorithms cuBLASLt
offers for a product beside the one torch._scaled_mm runs (always cublasLtMatmulAlgoGetHeuristic's first result):
bench/fp8_memset.py's probe asks the heuristic for its results, describes each by its configuration (algorithm id,
tile, stages, split-K and reduction scheme, swizzle, custom option, cluster shape), checks each against float64 and
times it. Session 9 (H200, docs/quantization.md): the heuristic offers 8 algorithms at decode's 256 rows and one at
prefill's 8,192, and its first pick was the fastest or within 3% in two rounds, so the engine keeps torch._scaled_mm
and nothing in the engine calls this module; re-measure with `python bench/fp8_step.py --sections lt` on a new
cuBLAS.

The products fp8.py runs: y = xq @ w.T with xq [M, K] and w [N, K] float8_e4m3fn row-major, y [M, N] bfloat16
row-major, either with unit scales (kind "unit": the deferred-scale layers) or row-wise, y = (xs * xq) @ (ws *
w).T with xs [M, 1] and ws [1, N] float32 (kind "row"; "row fast" with fast accumulation, as FAST_ACCUM_MIN_M asks).
In cuBLAS's column-major terms that is D [N, M] = op(A) [N, K] x B [K, M] with A = w (ld K, op T), B = xq (ld K, op
N): the "TN" form FP8 needs; row-wise scales are cuBLASLt's outer-vector scale mode (A's per row of op(A), i.e. ws;
B's per column, i.e. xs), the mode torch._scaled_mm's row-wise product runs. Calls can be captured in CUDA graphs
(the descriptors and the workspace outlive the capture).
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys

import torch

# cuBLAS / CUDA enum values (cublasLt.h, library_types.h, cublas_api.h)
_COMPUTE_32F = 68
_R_32F, _R_16BF, _R_8F_E4M3 = 0, 14, 28
_OP_N, _OP_T = 0, 1
_DESC_TRANSA, _DESC_TRANSB, _DESC_FAST_ACCUM = 3, 4, 25
_DESC_A_SCALE_POINTER, _DESC_B_SCALE_POINTER, _DESC_A_SCALE_MODE, _DESC_B_SCALE_MODE = 17, 18, 31, 32
_SCALE_OUTER_VEC_32F = 3  # cublasLtMatmulMatrixScale_t: one float32 per row of op(A) / per column of B
_PREF_MAX_WORKSPACE_BYTES, _PREF_REDUCTION_SCHEME_MASK = 1, 3
_CONFIG_FIELDS = (("algo", 0, ctypes.c_int32), ("tile", 1, ctypes.c_uint32), ("splitk", 2, ctypes.c_int32),
                  ("reduction", 3, ctypes.c_uint32), ("swizzle", 4, ctypes.c_uint32), ("custom", 5, ctypes.c_uint32),
                  ("stages", 6, ctypes.c_uint32), ("inner", 7, ctypes.c_uint16), ("cluster", 8, ctypes.c_uint16))
"""cublasLtMatmulAlgoConfigAttributes_t: (name, attribute, C type) of the fields that tell two algorithms apart."""

WORKSPACE_BYTES = 32 << 20
"""The workspace offered to cuBLASLt (per device, made once): room for any candidate's split-K or counters."""

KINDS = ("unit", "row", "row fast")
"""The products: unit scales (tensor-wise), row-wise scales, row-wise with fast accumulation."""


class _Algo(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64 * 8)]


class _Heuristic(ctypes.Structure):
    _fields_ = [("algo", _Algo), ("workspace", ctypes.c_size_t), ("state", ctypes.c_int), ("waves", ctypes.c_float),
                ("reserved", ctypes.c_int * 4)]


_LIB = None


def _candidates() -> list[str]:
    """Where libcublasLt lives: the copy this process already loaded (torch's, after its first GEMM), the nvidia-cublas
    wheel torch depends on (site-packages/nvidia/cublas/lib), else the loader's search path by soname."""
    found = []
    try:
        with open("/proc/self/maps") as f:
            found += sorted({ln.split()[-1] for ln in f if "libcublasLt.so" in ln and "/" in ln})
    except OSError:
        pass
    for base in sys.path:
        found += sorted(glob.glob(os.path.join(base, "nvidia", "cu*", "lib", "libcublasLt.so*")), reverse=True)
        found += sorted(glob.glob(os.path.join(base, "nvidia", "cublas", "lib", "libcublasLt.so*")), reverse=True)
    return found + ["libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so"]


def lib():
    """The loaded libcublasLt (the one torch loaded, where the soname matches), with argument types declared."""
    global _LIB
    if _LIB is None:
        errors = []
        for path in _candidates():
            try:
                handle = ctypes.CDLL(path)
                break
            except OSError as e:
                errors.append(f"{path}: {e}")
        else:
            raise OSError("libcublasLt not found: " + "; ".join(errors[-3:]))
        vp, sz = ctypes.c_void_p, ctypes.c_size_t
        for name, args in {
            "cublasLtCreate": [ctypes.POINTER(vp)],
            "cublasLtMatmulDescCreate": [ctypes.POINTER(vp), ctypes.c_int, ctypes.c_int],
            "cublasLtMatmulDescSetAttribute": [vp, ctypes.c_int, vp, sz],
            "cublasLtMatrixLayoutCreate": [ctypes.POINTER(vp), ctypes.c_int, ctypes.c_uint64, ctypes.c_uint64,
                                           ctypes.c_int64],
            "cublasLtMatmulPreferenceCreate": [ctypes.POINTER(vp)],
            "cublasLtMatmulPreferenceSetAttribute": [vp, ctypes.c_int, vp, sz],
            "cublasLtMatmulAlgoGetHeuristic": [vp, vp, vp, vp, vp, vp, vp, ctypes.c_int, ctypes.POINTER(_Heuristic),
                                               ctypes.POINTER(ctypes.c_int)],
            "cublasLtMatmulAlgoConfigGetAttribute": [ctypes.POINTER(_Algo), ctypes.c_int, vp, sz, ctypes.POINTER(sz)],
            "cublasLtMatmul": [vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, ctypes.POINTER(_Algo), vp, sz, vp],
        }.items():
            fn = getattr(handle, name)
            fn.argtypes, fn.restype = args, ctypes.c_int
        _LIB = handle
    return _LIB


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"cuBLASLt {what} returned status {status}")


_HANDLES: dict = {}
_WORKSPACES: dict = {}


def _handle(device: torch.device):
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _HANDLES:
        h = ctypes.c_void_p()
        _check(lib().cublasLtCreate(ctypes.byref(h)), "Create")
        _HANDLES[key] = h
    return _HANDLES[key]


def workspace(device: torch.device) -> torch.Tensor:
    """The per-device workspace (reserved once, before any graph captures a call that points at it)."""
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _WORKSPACES:
        _WORKSPACES[key] = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
    return _WORKSPACES[key]


def describe(algo: _Algo) -> dict:
    """An algorithm's configuration, the fields that tell two of cuBLASLt's algorithms apart."""
    out = {}
    for name, attr, ctype in _CONFIG_FIELDS:
        v, written = ctype(0), ctypes.c_size_t(0)
        status = lib().cublasLtMatmulAlgoConfigGetAttribute(ctypes.byref(algo), attr, ctypes.byref(v),
                                                            ctypes.sizeof(v), ctypes.byref(written))
        out[name] = int(v.value) if status == 0 else None
    return out


class Plan:
    """The descriptors of one product (m rows, n outputs, k inputs; bf16 output; `kind` of KINDS) on one device, and
    the heuristic's candidates for it."""

    def __init__(self, m: int, n: int, k: int, device: torch.device, kind: str = "unit"):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        L, vp = lib(), ctypes.c_void_p
        self.m, self.n, self.k, self.device, self.kind = m, n, k, device, kind
        self.handle = _handle(device)
        self.desc = vp()
        _check(L.cublasLtMatmulDescCreate(ctypes.byref(self.desc), _COMPUTE_32F, _R_32F), "MatmulDescCreate")
        attrs = [(_DESC_TRANSA, ctypes.c_int32(_OP_T)), (_DESC_TRANSB, ctypes.c_int32(_OP_N))]
        if kind != "unit":
            attrs += [(_DESC_A_SCALE_MODE, ctypes.c_int32(_SCALE_OUTER_VEC_32F)),
                      (_DESC_B_SCALE_MODE, ctypes.c_int32(_SCALE_OUTER_VEC_32F))]
        if kind == "row fast":
            attrs.append((_DESC_FAST_ACCUM, ctypes.c_int8(1)))
        for attr, value in attrs:
            _check(L.cublasLtMatmulDescSetAttribute(self.desc, attr, ctypes.byref(value), ctypes.sizeof(value)),
                   f"MatmulDescSetAttribute {attr}")
        self.a, self.b, self.d = vp(), vp(), vp()
        _check(L.cublasLtMatrixLayoutCreate(ctypes.byref(self.a), _R_8F_E4M3, k, n, k), "LayoutCreate A")
        _check(L.cublasLtMatrixLayoutCreate(ctypes.byref(self.b), _R_8F_E4M3, k, m, k), "LayoutCreate B")
        _check(L.cublasLtMatrixLayoutCreate(ctypes.byref(self.d), _R_16BF, n, m, n), "LayoutCreate D")
        self.alpha, self.beta = ctypes.c_float(1.0), ctypes.c_float(0.0)

    def candidates(self, count: int = 32, workspace_bytes: int = WORKSPACE_BYTES,
                   reduction_mask: int | None = None) -> list[dict]:
        """Up to `count` of the heuristic's results, in its order: {"algo": _Algo, "workspace": bytes, "waves",
        "config": describe()}. `reduction_mask`: only algorithms with these split-K reduction schemes (1 in place,
        2 compute type, 4 output type; 0 is no split-K and always allowed)."""
        L, vp = lib(), ctypes.c_void_p
        pref = vp()
        _check(L.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "PreferenceCreate")
        ws = ctypes.c_uint64(workspace_bytes)
        _check(L.cublasLtMatmulPreferenceSetAttribute(pref, _PREF_MAX_WORKSPACE_BYTES, ctypes.byref(ws), 8),
               "MAX_WORKSPACE_BYTES")
        if reduction_mask is not None:
            mask = ctypes.c_uint32(reduction_mask)
            _check(L.cublasLtMatmulPreferenceSetAttribute(pref, _PREF_REDUCTION_SCHEME_MASK, ctypes.byref(mask), 4),
                   "REDUCTION_SCHEME_MASK")
        results = (_Heuristic * count)()
        got = ctypes.c_int(0)
        _check(L.cublasLtMatmulAlgoGetHeuristic(self.handle, self.desc, self.a, self.b, self.d, self.d, pref, count,
                                                results, ctypes.byref(got)), "AlgoGetHeuristic")
        out = []
        for i in range(got.value):
            r = results[i]
            if r.state == 0:
                algo = _Algo()
                ctypes.memmove(ctypes.byref(algo), ctypes.byref(r.algo), ctypes.sizeof(_Algo))
                out.append({"algo": algo, "workspace": int(r.workspace), "waves": float(r.waves),
                            "config": describe(algo)})
        return out

    def set_scales(self, xs: torch.Tensor | None, ws: torch.Tensor | None) -> None:
        """The row-wise kinds' scale pointers (xs [m] per token, ws [n] per output channel, float32, contiguous); also
        before asking for candidates, whose alignment checks read them."""
        if self.kind == "unit":
            return
        if xs is None or ws is None or xs.numel() != self.m or ws.numel() != self.n:
            raise ValueError(f"row-wise scales must be float32 [{self.m}] and [{self.n}]")
        for attr, t in ((_DESC_A_SCALE_POINTER, ws), (_DESC_B_SCALE_POINTER, xs)):
            if t.dtype != torch.float32 or not t.is_contiguous():
                raise ValueError("row-wise scales must be contiguous float32")
            ptr = ctypes.c_void_p(t.data_ptr())
            _check(lib().cublasLtMatmulDescSetAttribute(self.desc, attr, ctypes.byref(ptr), ctypes.sizeof(ptr)),
                   "scale pointer")

    def run(self, xq: torch.Tensor, w: torch.Tensor, algo: _Algo, xs: torch.Tensor | None = None,
            ws: torch.Tensor | None = None) -> torch.Tensor:
        """y [m, n] bf16 = xq [m, k] @ w [n, k].T (row-wise kinds: times xs [m, 1] and ws [1, n]) with `algo` (one of
        `candidates`), on the current stream."""
        self.set_scales(xs, ws)
        y = torch.empty((self.m, self.n), dtype=torch.bfloat16, device=xq.device)
        space = workspace(xq.device)
        stream = torch.cuda.current_stream(xq.device).cuda_stream
        _check(lib().cublasLtMatmul(self.handle, self.desc, ctypes.byref(self.alpha), w.data_ptr(), self.a,
                                    xq.data_ptr(), self.b, ctypes.byref(self.beta), y.data_ptr(), self.d,
                                    y.data_ptr(), self.d, ctypes.byref(algo), space.data_ptr(), space.numel(), stream),
               "Matmul")
        return y
