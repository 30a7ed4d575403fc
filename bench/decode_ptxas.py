"""Compile decode-attention launch configs for sm_90a without a GPU: registers, spills, shared memory, and how
many shared-memory buffers the loop's K/V tiles get (1: the next tile's copy waits for this tile's math).

    python bench/decode_ptxas.py 64,4,2 64,4,5 32,4,7        # TILE_N,num_warps,num_stages (bf16, d 128, GQA 4)

To see what the GPU's Triton does, put that version first on the path (`pip install --target /tmp/t36
triton==3.6.0`, then PYTHONPATH=/tmp/t36). The strides and pointers are declared divisible by 16, as the JIT
specializes them at a real launch (without that the loads compile to 2-byte scalar loads and nothing is
staged). A hint; the GPU sweep (bench/decode_fixed.py) is the measure. Must run without TRITON_INTERPRET.
"""

from __future__ import annotations

import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from bench.prefill_ptxas import ptxas_report  # noqa: E402
from kernels import paged_decode as pd  # noqa: E402

DIVISIBLE = ("stride_qs", "stride_qh", "stride_os", "stride_oh", "stride_cb", "stride_cs", "stride_ch", "num_heads")


def compile_config(tile: int, warps: int, stages: int, splits: int = 1):
    """The decode kernel as paged_decode launches it over a bf16 pool (32 q / 8 kv heads, d 128, PDL)."""
    consts = dict(QUERIES_PER_KV=4, BLOCK_G=16, HEAD_DIM=128, HEAD_DIM_PAD=128, D_MASKED=False, BLOCK_SIZE=16,
                  TILE_N=tile, NUM_SPLITS=splits, USE_SOFTCAP=False, USE_ALIBI=False, USE_WINDOW=False,
                  USE_SINKS=False, DOT_PRECISION="tf32", EVICTION="", HEADS_FASTEST=True, KV_FP8=False,
                  F16_DOTS=False, CVT_BITS=False, PREFETCH=False, ROWS_FROM_QSL=False, PDL=1)
    names = pd._paged_decode_kernel.arg_names
    sig = {}
    for n in names:
        if n in consts:
            sig[n] = "constexpr"
        elif n in ("block_tables_ptr", "seq_lens_ptr", "query_start_loc_ptr"):
            sig[n] = "*i32"
        elif n in ("part_out_ptr", "part_m_ptr", "part_l_ptr", "slopes_ptr", "sinks_ptr"):
            sig[n] = "*fp32"
        elif n.endswith("_ptr"):
            sig[n] = "*bf16"
        elif n in ("qk_scale", "softcap_in", "softcap_out2", "v_scale"):
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names
             if n not in consts and (n.endswith("_ptr") or n in DIVISIBLE)}
    src = ASTSource(pd._paged_decode_kernel, sig, constexprs={(names.index(k),): v for k, v in consts.items()},
                    attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: this compiles for sm_90a")
    os.makedirs("/tmp/decode_ptxas", exist_ok=True)
    for spec in sys.argv[1:] or ["64,4,2"]:
        tile, warps, stages = (int(x) for x in spec.split(","))
        k = compile_config(tile, warps, stages)
        bufs = sorted(set(re.findall(rf"memdesc<(\d+)x{tile}x128xbf16", k.asm["ttgir"])))
        print(f"TILE_N={tile} warps={warps} stages={stages}: {ptxas_report(k, {}, f'/tmp/decode_ptxas/{spec}.ptx')}, "
              f"K/V buffers {'/'.join(bufs) or '0 (registers)'}")


if __name__ == "__main__":
    main()
