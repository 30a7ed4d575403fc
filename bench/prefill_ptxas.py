"""Compile prefill kernel configs for sm_90a without a GPU and report what ptxas says about each.

    python bench/prefill_ptxas.py '{}' '{"num_stages": 3, "maxnreg": null}' ... [--dump DIR]

Each argument is a JSON dict of keys over kernels/paged_prefill_configs.BASE (the bench shape: 32 q / 8 kv
heads, d 128, bf16, fresh prompts, the chunk's keys through TMA); with "GLUON": true, the Gluon kernel
(kernels/paged_prefill_gluon.py). To see what the GPU's Triton does, put that version first on the path
(`pip install --target /tmp/t36 triton==3.6.0`, then PYTHONPATH=/tmp/t36). Prints registers, spills, shared memory
and ptxas's "wgmma serialized" warnings (C751x), which no timing shows directly, and with --dump writes
the TTGIR, PTX and SASS (where the loop waits for its wgmmas: `warp_group_dot_wait`, `WARPGROUP.DEPBAR`).
The CPU machine's Triton may be newer than the GPU's; treat the output as a hint, the GPU sweep as the
measure. Must run without TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels import paged_prefill as pp  # noqa: E402
from kernels.paged_prefill_configs import BASE  # noqa: E402

D, GROUP = 128, 4
INT_PTRS = ("block_tables_ptr", "seq_lens_ptr", "query_start_loc_ptr")


def compile_config(cfg: dict):
    """The kernel as paged_prefill would launch it for `cfg` on the bench shape (sm_90a)."""
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    row_heads = GROUP if cfg["PACK_GQA"] else 1
    consts = dict(QUERIES_PER_KV=GROUP, ROW_HEADS=row_heads, BLOCK_M=bm, BLOCK_Q=bm // row_heads, BLOCK_N=bn,
                  BLOCK_N_PAGED=cfg["BLOCK_N_PAGED"] or bn, HEAD_DIM=D, HEAD_DIM_PAD=D, D_MASKED=False,
                  BLOCK_SIZE=16, NEW_KV=pp.NEW_KV_MODES[cfg["NEW_KV"]], BLOCKWISE=cfg["BLOCKWISE"],
                  REVERSE=cfg["REVERSE"], PAIR_TILES=int(cfg["PAIR_TILES"]), SEQ_VEC=cfg["SEQ_VEC"],
                  USE_SOFTCAP=False, USE_ALIBI=False, USE_WINDOW=False, USE_SINKS=False, DOT_PRECISION="tf32",
                  KV_FP8=False, LAZY_RESCALE=cfg["LAZY_RESCALE"], HAS_PREFIX=cfg["NEW_KV"] == "paged",
                  Q_SCALED=cfg["Q_SCALED"], LOOP_STAGES=cfg["LOOP_STAGES"], LOOP_UNROLL=cfg["LOOP_UNROLL"],
                  LOOP_WS=cfg["LOOP_WS"], OVERLAP_QK=cfg["OVERLAP_QK"], SKIP_SINGLE=False,
                  BLOCK_N_TAIL=min(cfg["BLOCK_N_TAIL"] or bn, bn), ONE_LOOP=cfg["ONE_LOOP"],
                  PERSISTENT=cfg["PERSISTENT"], NUM_HEAD_GROUPS=32 // row_heads,
                  HEAVY_FIRST=bool(cfg.get("HEAVY_FIRST")))
    names = pp._paged_prefill_kernel.arg_names
    sig = {}
    for n in names:
        if n in consts:
            sig[n] = "constexpr"
        elif n in ("k_new", "v_new", "k_tail", "v_tail"):
            rows = consts["BLOCK_N_TAIL"] if n.endswith("tail") else bn
            sig[n] = f"tensordesc<bf16[{rows}, {D}]>" if cfg["NEW_KV"] == "tma" else "*bf16"
        elif n in ("slopes_ptr", "sinks_ptr"):
            sig[n] = "*fp32"
        elif n.endswith("_ptr"):
            sig[n] = "*i32" if n in INT_PTRS else "*bf16"
        elif n in ("qk_scale", "softcap_in", "softcap_out2", "v_scale"):
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
    src = ASTSource(pp._paged_prefill_kernel, sig, constexprs={(names.index(k),): v for k, v in consts.items()})
    opts = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if cfg.get("maxnreg"):
        opts["maxnreg"] = cfg["maxnreg"]
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)


def compile_gluon(cfg: dict):
    """kernels/paged_prefill_gluon.py's kernel as paged_prefill would launch it for a GLUON `cfg` (sm_90a)."""
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from triton.runtime.jit import mangle_type

    import torch

    from kernels import paged_prefill_gluon as pg

    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    t = torch.empty(64, 8 * D, dtype=torch.bfloat16)
    desc = TensorDescriptor(t, [64, 8 * D], [t.stride(0), 1], [bn, D], pg._smem_layout(bn, D, True))
    qt = torch.empty(64, 32 * D, dtype=torch.bfloat16)
    q_desc = TensorDescriptor(qt, [64, 32 * D], [qt.stride(0), 1], [64 // GROUP, D], pg._smem_layout(64 // GROUP, D, True))
    if cfg.get("GLUON_WS"):
        kernel = pg._prefill_ws_kernel
        consts = dict(GROUP=GROUP, BLOCK_Q=128 // GROUP, BLOCK_N=bn, HEAD_DIM=D, STAGES=cfg["num_stages"],
                      SEQ_VEC=cfg["SEQ_VEC"], HEAVY=bool(cfg.get("HEAVY_FIRST")), SKIP_SINGLE=False,
                      MASK_BRANCH=cfg.get("ONE_LOOP") == 2, OVERLAP=int(cfg.get("OVERLAP_QK") or 0),
                      PINGPONG=bool(cfg.get("PINGPONG")), Q_BUFS=int(cfg.get("Q_BUFS") or 2),
                      DYNAMIC=bool(cfg.get("PERSISTENT") and cfg.get("DYNAMIC")),
                      AHEAD=bool(cfg.get("PERSISTENT") and cfg.get("AHEAD")),
                      TMA_STORE=bool(cfg.get("TMA_STORE")),
                      CONSUMER_REGS=int(cfg.get("WS_REGS") or 240), num_warps=4)
        cfg = dict(cfg, num_warps=4, maxnreg=None)
    else:
        kernel = pg._prefill_fresh_kernel
        consts = dict(GROUP=GROUP, BLOCK_M=bm, BLOCK_Q=bm // GROUP, BLOCK_N=bn, HEAD_DIM=D, STAGES=cfg["num_stages"],
                      SEQ_VEC=cfg["SEQ_VEC"], SKIP_SINGLE=False, PV_ASYNC=bool(cfg.get("PV_ASYNC")),
                      MASK_BRANCH=cfg.get("ONE_LOOP") == 2, num_warps=cfg["num_warps"])
    names = kernel.arg_names
    sig = {n: ("constexpr" if n in consts else mangle_type(desc) if n in ("k_desc", "v_desc") else
               mangle_type(q_desc) if n == "o_desc" else
               mangle_type(q_desc) if n == "q_desc" else
               "*i32" if n in ("query_start_loc_ptr", "counter_ptr") else "*bf16" if n.endswith("_ptr") else
               "fp32" if n == "qk_scale" else "i32") for n in names}
    src = GluonASTSource(kernel, sig, constexprs={(names.index(k),): v for k, v in consts.items()})
    opts = dict(num_warps=cfg["num_warps"], **({"maxnreg": cfg["maxnreg"]} if cfg.get("maxnreg") else {}))
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)


def ptxas_report(kernel, cfg: dict, path: str) -> str:
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with open(path, "w") as f:
        f.write(kernel.asm["ptx"])
    cap = [f"--maxrregcount={cfg['maxnreg']}"] if cfg.get("maxnreg") else []
    r = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", path, "-o", os.devnull, *cap], capture_output=True,
                       text=True)
    regs = re.search(r"Used (\d+) registers", r.stderr)
    spill = re.search(r"(\d+) bytes spill stores", r.stderr)
    warn = sorted(set(re.findall(r"\((C75\d\d)\)[^:]*: ([^']*?) (?:for|in) the", r.stderr)))
    return (f"regs {regs.group(1) if regs else '?'}, spill stores {spill.group(1) if spill else '?'} B, "
            f"shared {kernel.metadata.shared} B" + "".join(f"; {c}: {w}" for c, w in warn))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("configs", nargs="*", default=["{}"], help="JSON dicts over BASE")
    ap.add_argument("--dump", default=None, help="folder for ttgir / ptx / sass per config")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: this compiles for sm_90a")
    out = args.dump or os.path.join("/tmp", "prefill_ptxas")
    os.makedirs(out, exist_ok=True)
    for i, spec in enumerate(args.configs):
        cfg = dict(BASE, **json.loads(spec))
        k = compile_gluon(cfg) if cfg.get("GLUON") else compile_config(cfg)
        stem = os.path.join(out, f"cfg{i}")
        print(f"{spec}: {ptxas_report(k, cfg, stem + '.ptx')}")
        if args.dump:
            with open(stem + ".ttgir", "w") as f:
                f.write(k.asm["ttgir"])
            with open(stem + ".cubin", "wb") as f:
                f.write(k.asm["cubin"])


if __name__ == "__main__":
    main()
