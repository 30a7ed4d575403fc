"""Compile the kernels of the default batch-1 W4A16 decode for sm_90a without a GPU and write their SASS, so that
two trees can be compared instruction for instruction (a removal or refactor that must leave the default path as it
was): the M = 1 `TUNED` configs of the four 8B GEMMs (gemv3 qkv, gate/up with SwiGLU, down; gemv4 o), the untuned
gemv3 default, and the fused residual add + RMSNorm at hidden 4,096.

    PYTHONPATH=/tmp/t36 python bench/w4a16_sass.py TREE OUT    # once per tree, then: diff -r OUT_A OUT_B

TREE: a checkout whose kernels/ is compiled; OUT: a folder for one `.sass` per kernel (addresses dropped, parameter
offsets and branch labels normalised, so that parameters removed or reordered do not show) and its `.cubin`.
Use the GPU's Triton (`pip install --target /tmp/t36 triton==3.6.0`; bench/decode_ptxas.py says why). Pointers and
multiples of 16 are declared divisible by 16, as the JIT specializes them at a real launch. Must run without
TRITON_INTERPRET.
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys

TREE, OUT = (sys.argv[1:3] + [None, None])[:2]
if TREE is None or OUT is None:
    sys.exit(__doc__)
if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("unset TRITON_INTERPRET: this compiles for sm_90a")
sys.path.insert(0, os.path.abspath(TREE))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels import fused_norm, w4a16, w4a16_stream  # noqa: E402

TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
GEMV_PTRS = dict(x_ptr="*bf16", qw_ptr="*i32", s_ptr="*bf16", z_ptr="*u8", perm_ptr="*i32", out_ptr="*bf16",
                 ws_ptr="*fp32", cnt_ptr="*i32")


def compile_kernel(jit, values: dict, consts: dict, ptrs: dict, warps: int, floats=()):
    """`jit` compiled as a launch with these run-time `values` (ints, or floats named in `floats`), constexprs and
    pointer types would compile it; parameters the launch leaves out keep their defaults."""
    params = inspect.signature(jit.fn).parameters
    sig, cx, attrs = {}, {}, {}
    for i, n in enumerate(jit.arg_names):
        default = params[n].default
        if n not in consts and n not in ptrs and n not in values:  # left at its default by the launch
            runtime_int = type(default) is int and "constexpr" not in str(params[n].annotation)
            values, consts = (dict(values, **{n: default}), consts) if runtime_int else (values, dict(consts, **{n: default}))
        if n in consts:
            sig[n] = "constexpr"
            cx[(i,)] = consts[n]
        elif n in ptrs:
            sig[n], attrs[(i,)] = ptrs[n], [["tt.divisibility", 16]]
        elif n in floats:
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
            if values[n] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(jit, sig, constexprs=cx, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=warps, num_stages=1, launch_pdl=True))


def write_sass(kernel, name: str) -> str:
    path = os.path.join(OUT, name)
    with open(path + ".cubin", "wb") as f:
        f.write(kernel.asm["cubin"])
    dump = subprocess.run([os.path.join(TOOLS, "cuobjdump"), "-sass", path + ".cubin"], capture_output=True,
                          text=True, check=True).stdout
    lines = []
    for line in dump.splitlines():
        m = re.match(r"\s+/\*[0-9a-f]{4}\*/\s+(.*?);", line)
        if m:
            ins = re.sub(r"c\[0x0\]\[0x[0-9a-f]+\]", "c[0x0][PARAM]", m.group(1))
            lines.append(re.sub(r"`\(\.L_x_\d+\)", "`(LABEL)", ins))
    with open(path + ".sass", "w") as f:
        f.write("\n".join(lines) + "\n")
    usage = subprocess.run([os.path.join(TOOLS, "cuobjdump"), "-res-usage", path + ".cubin"], capture_output=True,
                           text=True, check=True).stdout
    regs = re.search(r"REG:(\d+)", usage)
    return f"{name}: {len(lines)} instructions, {regs.group(1) if regs else '?'} registers"


def gemv3(name: str, n: int, k: int, cfg: dict, gated: bool = False) -> str:
    """As kernels/w4a16.py launches gemv3 for bf16 x [1, K], group 128, no act-order."""
    blocks = k // 128
    per = -(-blocks // cfg.get("SPLIT_K", 16))
    split = -(-blocks // per)
    consts = dict(ROWS=128, BLOCK_N=cfg["BLOCK_N"], T=cfg["T"], JG=8, HAS_PERM=False, SPLIT=split > 1, ATOMIC=True,
                  PDL=2, EVEN=True, XPAIR=True, FOLD=False, GATED=gated, H2=cfg.get("H2", 0), ASM=True)
    values = dict(N=n, K=k, group_size=128, blocks_per_split=per, split_k=split, stride_qk=n, stride_sg=n,
                  stride_os=0, exp0=150 << 23, hi_shift=20, inter=n // 2 if gated else n)
    return write_sass(compile_kernel(w4a16._w4a16_gemv3_kernel, values, consts, GEMV_PTRS, cfg["num_warps"]), name)


def gemv4(name: str, n: int, k: int, cfg: dict) -> str:
    """As kernels/w4a16_stream.py launches gemv4 (132 SMs) for bf16 x [1, K], group 128, no act-order."""
    tpc = (k // 128) * 16 // cfg["T"]
    total = (n // cfg["BLOCK_N"]) * tpc
    per = -(-total // min(total, 132 * cfg["PER_SM"]))
    consts = dict(ROWS=128, BLOCK_N=cfg["BLOCK_N"], T=cfg["T"], JG=8, HAS_PERM=False, PDL=2, EVEN=True, XPAIR=True,
                  GATED=False, FOLD=False, H2=cfg.get("H2", 0), ASM=True)
    values = dict(N=n, K=k, group_size=128, tpc=tpc, per_prog=per, total=total, stride_qk=n, stride_sg=n,
                  exp0=150 << 23, hi_shift=20, inter=n)
    jit = w4a16_stream._w4a16_gemv4_kernel
    for extra, v in (("L2", False), ("L2_DIST", 0)):  # older trees (before session 11) had the L2 prefetches
        if extra in jit.arg_names:
            consts[extra] = v
    if "l2_pre" in jit.arg_names:
        values["l2_pre"] = 0
    return write_sass(compile_kernel(jit, values, consts, GEMV_PTRS, cfg["num_warps"]), name)


def norm() -> str:
    """kernels/fused_norm.py's add + RMSNorm as RMSNorm.forward launches it at batch 1 (bf16, Llama, PDL)."""
    consts = dict(HAS_RESIDUAL=True, LAYER_NORM=False, SCALE_IN_FP32=False, HAS_WEIGHT=True, HAS_BIAS=False,
                  QUANT=False, HAS_UB=False, X_SCALED=False, BLOCK=4096, PDL=1)
    ptrs = {p: "*bf16" for p in ("x_ptr", "residual_ptr", "weight_ptr", "bias_ptr", "out_ptr", "s_ptr", "xr_ptr",
                                 "xc_ptr")}
    values = dict(stride_x=4096, stride_r=4096, stride_o=4096, hidden=4096, eps=1e-5, weight_offset=0.0, ub=0.0)
    return write_sass(compile_kernel(fused_norm._add_norm_kernel, values, consts, ptrs, 16,
                                     floats=("eps", "weight_offset", "ub")), "norm")


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    t = w4a16.TUNED
    print(f"triton {triton.__version__}, {TREE}")
    for line in (gemv3("gemv3_qkv", 6144, 4096, t[(1, 6144, 4096)]),
                 gemv3("gemv3_gate_up", 28672, 4096, t[(1, 28672, 4096)], gated=True),
                 gemv3("gemv3_down", 4096, 14336, t[(1, 4096, 14336)]),
                 gemv3("gemv3_untuned", 6144, 4096, dict(T=8, BLOCK_N=128, num_warps=1, SPLIT_K=16)),
                 gemv4("gemv4_o", 4096, 4096, t[(1, 4096, 4096)]),
                 norm()):
        print(line)


if __name__ == "__main__":
    main()
