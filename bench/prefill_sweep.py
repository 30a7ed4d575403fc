"""Paged prefill kernel variants against torch SDPA on one GPU, in one run (issue 15's >= 90% of SDPA).

    python bench/prefill_sweep.py [--json bench/results/prefill_sweep_<date>.json] [--quick]

Shapes (32 q / 8 kv heads, d 128, block 16, bf16, cache blocks a random permutation of the pool):
  prefill  8 x 2048 causal, no cached prefix (bench/kernels.py's prefill shape)
  long     1 x 8192 causal, no cached prefix
  chunked  8 x (2048 cached + 512 new): a chunked prefill / prefix-cache extend
Each variant of kernels/paged_prefill.py (a config dict: key source NEW_KV, tiles, warps, stages,
BLOCK_N_PAGED, PACK_GQA, BLOCKWISE, REVERSE, PAIR_TILES, LAZY_RESCALE, SEQ_VEC, maxnreg) is first checked
on a mixed batch (a prompt, extends after cached prefixes, decodes, odd lengths, padding) against the torch
reference and against SDPA on every shape it is timed on, then timed (median of triton.testing.do_bench);
"best" counts only variants that passed every check. The default config is also checked on the mixed batch
in fp16, GQA groups 1 / 2 / 3 and head sizes 64 / 256. SDPA runs on the same K/V laid out contiguously (its
own backend choice for the causal squares; the chunked shape's bottom-right causal mask through torch's
causal_lower_right).
The new tokens' K/V are views of one fused qkv buffer, as the model passes them, and are also written
into the cache by reshape_and_cache, so every key source reads the same values.

Compiling ~25 variants serially takes most of a minute, so worker processes compile them first into
Triton's on-disk cache (--jobs); the timed process then loads them from there.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "kernels"))  # paged_cases.make_batch, shared with the tests

import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from kernels.paged_prefill import paged_prefill, paged_prefill_ref  # noqa: E402
from kernels.reshape_and_cache import reshape_and_cache  # noqa: E402

HQ, HKV, D, BLOCK = 32, 8, 128, 16
DTYPE = torch.bfloat16
SHAPES = {  # name: (sequences, cached prefix, new tokens)
    "prefill": (8, 0, 2048),
    "long": (1, 0, 8192),
    "chunked": (8, 2048, 512),
}


def _cfg(new_kv, m, n, w, s, pack=True, blockwise=False, reverse=False, lazy=False, maxnreg=None, seq_vec=0,
         n_paged=None, pair=False, fresh=False):
    """A config for paged_prefill; fresh=True (not a kernel key) also passes has_prefix=False on the shapes
    without a cached prefix, as the triton backend does for a step of fresh prompts."""
    return dict(NEW_KV=new_kv, BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s, PACK_GQA=pack,
                BLOCKWISE=blockwise, REVERSE=reverse, LAZY_RESCALE=lazy, maxnreg=maxnreg, SEQ_VEC=seq_vec,
                BLOCK_N_PAGED=n_paged, PAIR_TILES=pair, fresh_path=fresh)


def _name(c: dict) -> str:
    flags = "".join(f" {f}" for f, on in ((f"Np{c['BLOCK_N_PAGED']}", c["BLOCK_N_PAGED"]), ("pair", c["PAIR_TILES"]),
                                          ("fresh", c["fresh_path"]),
                                          ("nopack", not c["PACK_GQA"]), ("blockwise", c["BLOCKWISE"]),
                                          ("rev", c["REVERSE"]), ("lazy", c["LAZY_RESCALE"]),
                                          (f"maxnreg{c['maxnreg']}", c["maxnreg"]),
                                          (f"seqvec{c['SEQ_VEC']}", c["SEQ_VEC"])) if on)
    return f"{c['NEW_KV']} M{c['BLOCK_M']} N{c['BLOCK_N']} w{c['num_warps']} s{c['num_stages']}{flags}"


# Round 1 (bench/results/prefill_sweep_2026-11-29_h200_round1.json): TMA for the chunk's own keys, 128 rows,
# 64-key tiles, 8 warps, 3 stages, reversed tiles was the best on every shape together; one block-table lookup
# per block and lazy rescaling lost badly. The 8 x 2048 shape runs at ~80% of the 8192-token one, so a fixed
# cost per program (the chain of dependent loads before the first tile, the pipeline fill, the epilogue) is
# ~1/3 of an average program's work: this round tries cutting it (SEQ_VEC, PAIR_TILES, two programs per SM,
# a build without the block-table path for steps of fresh prompts) and wider tiles for the cached prefix
# (BLOCK_N_PAGED).
VARIANTS = [
    None,  # the kernel's own default (round 1's winner)
    _cfg("paged", 128, 32, 4, 3),  # the default before issue 15's work
    _cfg("tma", 128, 64, 8, 3, reverse=True),  # = the default, again for noise
    _cfg("tma", 128, 64, 8, 3, blockwise=True, reverse=True),  # round 1's best on 8 x 2048 (noise?)
    _cfg("tma", 128, 64, 8, 3),
    _cfg("tma", 128, 64, 8, 4, reverse=True),
    _cfg("tma", 128, 64, 8, 3, reverse=True, seq_vec=32),
    _cfg("tma", 128, 64, 8, 4, reverse=True, seq_vec=32),
    _cfg("tma", 128, 64, 8, 3, reverse=True, seq_vec=256),
    _cfg("tma", 128, 64, 8, 3, reverse=True, fresh=True),
    _cfg("tma", 128, 64, 8, 3, reverse=True, seq_vec=32, fresh=True),
    _cfg("tma", 128, 64, 8, 4, reverse=True, seq_vec=32, fresh=True),
    _cfg("tma", 128, 64, 8, 3, pair=True, seq_vec=32, fresh=True),
    _cfg("tma", 128, 64, 8, 2, reverse=True, maxnreg=128, seq_vec=32, fresh=True),
    _cfg("tma", 128, 64, 8, 2, reverse=True, maxnreg=128, fresh=True),
    _cfg("tma", 128, 64, 8, 2, pair=True, maxnreg=128, seq_vec=32, fresh=True),
    _cfg("tma", 128, 32, 8, 3, reverse=True, maxnreg=128, seq_vec=32, fresh=True),
    _cfg("tma", 128, 64, 8, 3, pair=True),
    _cfg("tma", 128, 64, 8, 3, pair=True, seq_vec=32),
    _cfg("tma", 128, 64, 8, 4, pair=True, seq_vec=32),
    _cfg("tma", 128, 64, 8, 3, reverse=True, n_paged=128),
    _cfg("tma", 128, 64, 8, 3, reverse=True, n_paged=128, seq_vec=32),
    _cfg("tma", 128, 64, 8, 3, pair=True, n_paged=128, seq_vec=32),
    _cfg("tma", 128, 64, 8, 3, pack=False, reverse=True, n_paged=128, seq_vec=32),
    _cfg("tma", 128, 64, 8, 2, reverse=True, maxnreg=128, seq_vec=32),
    _cfg("tma", 128, 32, 8, 3, reverse=True, maxnreg=128, seq_vec=32),
    _cfg("tma", 128, 32, 8, 3, pair=True, maxnreg=128, seq_vec=32),
    _cfg("tma", 128, 32, 4, 3, reverse=True),
    _cfg("tma", 128, 32, 4, 3, pair=True, seq_vec=32),
    _cfg("tma", 128, 128, 8, 3, reverse=True, seq_vec=32),
    _cfg("tma", 128, 128, 8, 3, pair=True, seq_vec=32),
    _cfg("tma", 128, 128, 8, 3, pack=False, reverse=True, seq_vec=32),
    _cfg("tma", 64, 64, 4, 3, reverse=True),
    _cfg("tma", 64, 64, 4, 3, reverse=True, seq_vec=32),
    _cfg("tma", 64, 64, 4, 3, pair=True, seq_vec=32),
    _cfg("tma", 64, 32, 4, 3, reverse=True, seq_vec=32),
    _cfg("tma", 64, 32, 4, 3, pair=True, seq_vec=32),
    _cfg("tma", 64, 64, 4, 2, pair=True, seq_vec=32),
    _cfg("ptr", 128, 64, 8, 3, reverse=True),
    _cfg("paged", 128, 32, 4, 3, reverse=True, seq_vec=32),
    _cfg("paged", 128, 32, 4, 3, pair=True, seq_vec=32),
]


def make_problem(name: str, dev: torch.device, seed: int = 0):
    """q, the fused-qkv views k/v, the cache (prefix random, new tokens written by reshape_and_cache),
    tables, seq_lens, query_start_loc, the FLOP count, and SDPA's inputs [B, H, L, D]."""
    nseq, ctx, new = SHAPES[name]
    g = torch.Generator(device=dev).manual_seed(seed)
    L = ctx + new
    nb = triton.cdiv(L, BLOCK)
    kv_cache = torch.randn(2, nseq * nb, BLOCK, HKV, D, device=dev, dtype=DTYPE, generator=g)
    tables = torch.randperm(nseq * nb, device=dev, generator=g).to(torch.int32).view(nseq, nb)
    qkv = torch.randn(nseq * new, (HQ + 2 * HKV) * D, device=dev, dtype=DTYPE, generator=g)
    q = qkv[:, : HQ * D].view(-1, HQ, D)
    k = qkv[:, HQ * D: (HQ + HKV) * D].view(-1, HKV, D)
    v = qkv[:, (HQ + HKV) * D:].view(-1, HKV, D)
    pos = torch.arange(ctx, L, device=dev)
    slots = (tables[:, pos // BLOCK].long() * BLOCK + pos % BLOCK).reshape(-1)
    reshape_and_cache(k, v, kv_cache, slots)
    seq_lens = torch.full((nseq,), L, dtype=torch.int32, device=dev)
    qsl = torch.arange(0, nseq * new + 1, new, dtype=torch.int32, device=dev)
    flops = 4 * D * HQ * nseq * sum(ctx + i + 1 for i in range(new))  # only the keys each query sees
    kc = kv_cache[0][tables.long()].reshape(nseq, nb * BLOCK, HKV, D)[:, :L].transpose(1, 2).contiguous()
    vc = kv_cache[1][tables.long()].reshape(nseq, nb * BLOCK, HKV, D)[:, :L].transpose(1, 2).contiguous()
    qc = q.reshape(nseq, new, HQ, D).transpose(1, 2).contiguous()
    return dict(q=q, k=k, v=v, kv_cache=kv_cache, tables=tables, seq_lens=seq_lens, qsl=qsl, flops=flops,
                qc=qc, kc=kc, vc=vc, nseq=nseq, ctx=ctx, new=new)


def sdpa_fn(p):
    """SDPA over the contiguous copies; the chunked shape needs the bottom-right causal mask. Returns the
    first form that runs, and how it was called."""
    scale = D ** -0.5
    qc, kc, vc = p["qc"], p["kc"], p["vc"]
    if p["ctx"] == 0:
        return lambda: F.scaled_dot_product_attention(qc, kc, vc, scale=scale, is_causal=True,
                                                      enable_gqa=True), "is_causal"
    from torch.nn.attention.bias import causal_lower_right

    lq, lk = p["new"], p["ctx"] + p["new"]
    bias = causal_lower_right(lq, lk)
    kr, vr = (t.repeat_interleave(HQ // HKV, dim=1) for t in (kc, vc))
    dense = torch.ones(lq, lk, dtype=torch.bool, device=qc.device).tril(lk - lq)
    candidates = [
        ("causal_lower_right, gqa", lambda: F.scaled_dot_product_attention(qc, kc, vc, attn_mask=bias, scale=scale,
                                                                          enable_gqa=True)),
        ("causal_lower_right, kv heads repeated",
         lambda: F.scaled_dot_product_attention(qc, kr, vr, attn_mask=bias, scale=scale)),
        ("boolean mask, kv heads repeated",
         lambda: F.scaled_dot_product_attention(qc, kr, vr, attn_mask=dense, scale=scale)),
    ]
    for how, fn in candidates:
        try:
            fn()
            return fn, how
        except Exception as e:  # noqa: PERF203 - the next form is the fallback
            print(f"  SDPA {how}: {type(e).__name__}: {str(e)[:120]}")
    raise RuntimeError("no SDPA form ran on the chunked shape")


def run_kernel(p, cfg):
    cfg = dict(cfg or {})
    has_prefix = not (cfg.pop("fresh_path", False) and p["ctx"] == 0)
    return lambda: paged_prefill(p["q"], p["kv_cache"], p["tables"], p["seq_lens"], p["qsl"], D ** -0.5,
                                 config=cfg, k=p["k"], v=p["v"], has_prefix=has_prefix)


# A whole prompt, extends after cached prefixes, decodes, lengths off the block and tile grids, padding rows.
MIXED_STEPS = [(1500, 1500), (900, 257), (2100, 64), (333, 1), (1, 1), (4000, 1), (129, 129)]


def check_mixed(dev: torch.device) -> dict:
    """Every variant on one mixed batch against the float32 torch reference (max abs error <= 2e-2, the
    bf16 tolerance of tests/kernels); the rows after the batch's tokens must stay untouched."""
    from paged_cases import make_batch

    steps = MIXED_STEPS if not SMOKE else [(40, 40), (30, 9), (21, 1), (1, 1)]
    b = make_batch([s for s, _ in steps], [q for _, q in steps], HQ, HKV, D, BLOCK, DTYPE, dev, num_padding_tokens=5)
    n = int(b.query_start_loc[-1])
    ref = paged_prefill_ref(b.q[:n], b.kv_cache, b.block_tables, b.seq_lens, b.query_start_loc, D ** -0.5).float()
    results = {}
    for cfg in VARIANTS:
        name = "default" if cfg is None else _name(cfg)
        try:
            out = torch.full_like(b.q, float("nan"))
            kw = {k: x for k, x in (cfg or {}).items() if k != "fresh_path"}  # the batch has cached prefixes
            paged_prefill(b.q, b.kv_cache, b.block_tables, b.seq_lens, b.query_start_loc, D ** -0.5, out=out,
                          config=kw, k=b.k, v=b.v)
            err = (out[:n].float() - ref).abs().max().item()
            ok = err <= 2e-2 and bool(out[n:].isnan().all())
            results[name] = dict(max_abs_err=err, ok=ok)
        except Exception as e:
            results[name] = dict(error=f"{type(e).__name__}: {str(e)[:200]}", ok=False)
        if not results[name]["ok"]:
            print(f"  mixed batch: {name} FAILED {results[name]}")
    print(f"  mixed batch {steps}: {sum(r['ok'] for r in results.values())} of {len(results)} variants correct")
    return results


def check_default_layouts(dev: torch.device) -> dict:
    """The default config on other dtypes, GQA groups and head sizes than the timed shapes (each its own
    compiled kernel): the mixed batch against the torch reference, at the dtype's test tolerance."""
    from paged_cases import TOLERANCE, make_batch

    steps = MIXED_STEPS if not SMOKE else [(40, 40), (30, 9), (1, 1)]
    layouts = [(torch.float16, 4, 128), (torch.bfloat16, 3, 64), (torch.bfloat16, 1, 128), (torch.float16, 2, 256)]
    results = {}
    for dtype, group, d in layouts[: 2 if SMOKE else None]:
        if SMOKE:
            dtype = torch.float32
        name = f"{str(dtype).split('.')[-1]} group {group} d {d}"
        hkv = 8 // min(group, 4)
        b = make_batch([s for s, _ in steps], [q for _, q in steps], group * hkv, hkv, d, BLOCK, dtype, dev,
                       num_padding_tokens=5)
        n = int(b.query_start_loc[-1])
        ref = paged_prefill_ref(b.q[:n], b.kv_cache, b.block_tables, b.seq_lens, b.query_start_loc, d ** -0.5)
        try:
            out = torch.full_like(b.q, float("nan"))
            paged_prefill(b.q, b.kv_cache, b.block_tables, b.seq_lens, b.query_start_loc, d ** -0.5, out=out,
                          k=b.k, v=b.v)
            torch.testing.assert_close(out[:n].float(), ref.float(), **TOLERANCE[dtype])
            assert out[n:].isnan().all(), "padding rows written"
            results[name] = "ok"
        except Exception as e:
            results[name] = f"FAILED {type(e).__name__}: {str(e)[:300]}"
        print(f"  default config, mixed batch, {name}: {results[name]}")
    return results


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    a, b = out.float(), ref.float()
    if a.isnan().any():
        return float("nan")
    return ((a - b).norm() / b.norm()).item()


def _warm(cfgs: list, smoke: bool = False) -> list[str]:
    """Worker: compile each variant into Triton's cache by running it once on a small problem with the
    same head layout (so the same specialization)."""
    if smoke:
        smoke_setup()
    dev = torch.device("cpu" if smoke else "cuda")
    SHAPES["warm"] = (2, 48, 80) if not smoke else (1, 5, 9)
    p = make_problem("warm", dev)
    SHAPES["warm0"] = (2, 0, 80)
    p0 = make_problem("warm0", dev)  # no cached prefix: the has_prefix=False build of fresh=True variants
    errors = []
    for cfg in cfgs:
        try:
            run_kernel(p, cfg)()
            if cfg and cfg.get("fresh_path"):
                run_kernel(p0, cfg)()
        except Exception as e:  # reported again, with its name, by the timed process
            errors.append(f"{cfg}: {type(e).__name__}")
    if not smoke:
        torch.cuda.synchronize()
    return errors


def precompile(jobs: int) -> None:
    if jobs <= 1:
        return
    t0 = time.time()
    chunks = [VARIANTS[i::jobs] for i in range(jobs)]
    try:
        import multiprocessing

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as ex:
            errors = sum(ex.map(_warm, [c for c in chunks if c], [SMOKE] * jobs), [])
        for e in errors:
            print(f"  precompile: {e}")
    except Exception as e:  # compiling in this process instead is only slower
        print(f"  precompile failed ({type(e).__name__}: {e}); compiling serially")
    print(f"  precompiled {len(VARIANTS)} variants in {time.time() - t0:.0f} s with {jobs} processes")


def bench(fn, quick: bool) -> float:
    """Median milliseconds (one plain call under --smoke, where there is no GPU)."""
    if SMOKE:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    return do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 120, return_mode="median")


SMOKE = False


def smoke_setup() -> torch.device:
    """--smoke: the script's own logic on the CPU under TRITON_INTERPRET, tiny shapes, fp32, a few variants."""
    global SMOKE, DTYPE, VARIANTS
    SMOKE, DTYPE = True, torch.float32
    SHAPES.update(prefill=(2, 0, 40), long=(1, 0, 72), chunked=(2, 35, 20))
    VARIANTS = [VARIANTS[0], VARIANTS[1], _cfg("paged", 16, 16, 4, 1, blockwise=True, reverse=True),
                _cfg("ptr", 32, 16, 4, 1, pack=False, n_paged=32),
                _cfg("tma", 32, 32, 4, 1, pair=True, seq_vec=8, fresh=True)]
    return torch.device("cpu")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1), help="compile processes")
    ap.add_argument("--quick", action="store_true", help="shorter timings (a smoke run)")
    ap.add_argument("--top", type=int, default=6, help="variants (by the prefill shape) also timed on 'long'")
    ap.add_argument("--smoke", action="store_true", help="check this script on the CPU (TRITON_INTERPRET=1)")
    ap.add_argument("--budget", type=float, default=105.0,
                    help="seconds; past this the remaining variants are skipped (and listed) so the run ends")
    args = ap.parse_args()
    t_start = time.time()
    if args.smoke:
        dev = smoke_setup()
        props = argparse.Namespace(name="cpu (interpreter smoke run)", multi_processor_count=0)
    elif not torch.cuda.is_available():
        sys.exit("bench/prefill_sweep.py needs a CUDA GPU (or --smoke with TRITON_INTERPRET=1)")
    else:
        dev = torch.device("cuda")
        props = torch.cuda.get_device_properties(dev)
    rows: dict = dict(device=props.name, sms=props.multi_processor_count, date=datetime.date.today().isoformat(),
                      torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
                      command="python " + " ".join(sys.argv), shapes={k: list(v) for k, v in SHAPES.items()},
                      results={})
    print(f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, triton {triton.__version__}")
    precompile(args.jobs)

    names = ["default" if c is None else _name(c) for c in VARIANTS]
    rows["mixed_batch"] = mixed = check_mixed(dev)
    rows["default_layouts"] = check_default_layouts(dev)
    order = None
    for shape in ("prefill", "chunked", "long"):
        p = make_problem(shape, dev)
        sdpa, how = sdpa_fn(p)
        ref = sdpa().transpose(1, 2).reshape(-1, HQ, D)
        sdpa_ms = bench(sdpa, args.quick)
        sdpa_tf = p["flops"] / sdpa_ms / 1e9
        res = rows["results"][shape] = dict(sdpa_ms=sdpa_ms, sdpa_TFLOPs=sdpa_tf, sdpa=how, variants={})
        print(f"\n{shape}: {SHAPES[shape]} (seqs, cached, new); SDPA ({how}) {sdpa_ms * 1e3:.0f} us "
              f"{sdpa_tf:.0f} TFLOP/s")
        picks = range(len(VARIANTS)) if order is None or shape != "long" else order[: args.top] + [0, 1]
        for i in sorted(set(picks)):
            cfg, name = VARIANTS[i], names[i]
            if time.time() - t_start > args.budget:
                print(f"  {name:45s} skipped: past the {args.budget:.0f} s budget")
                res["variants"][name] = dict(error="skipped: time budget")
                continue
            try:
                fn = run_kernel(p, cfg)
                err = rel_err(fn(), ref)
                if not err < 1e-2:
                    raise AssertionError(f"relative error {err:.2e} against SDPA")
                ms = bench(fn, args.quick)
            except Exception as e:  # a config that does not compile (shared memory) is reported, not fatal
                print(f"  {name:45s} FAILED {type(e).__name__}: {str(e)[:160]}")
                res["variants"][name] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
                continue
            tf = p["flops"] / ms / 1e9
            res["variants"][name] = dict(ms=ms, TFLOPs=tf, of_sdpa=tf / sdpa_tf, err=err, config=cfg)
            print(f"  {name:45s} {ms * 1e3:8.0f} us {tf:5.0f} TFLOP/s {tf / sdpa_tf:6.1%} of SDPA  err {err:.1e}")
        timed = {n: r for n, r in res["variants"].items() if "ms" in r and mixed[n]["ok"]}
        if timed:
            best = res["best"] = min(timed, key=lambda n: timed[n]["ms"])
            print(f"  best: {best} at {timed[best]['of_sdpa']:.1%} of SDPA")
        if shape == "prefill":
            order = sorted((i for i in range(len(VARIANTS)) if names[i] in timed), key=lambda i: timed[names[i]]["ms"])
        del p, ref

    # One config for every shape: the variant with the best worst-case share of SDPA.
    common = [n for n in names
              if mixed[n]["ok"] and all("ms" in rows["results"][s]["variants"].get(n, {}) for s in SHAPES)]
    if common:
        overall = max(common, key=lambda n: min(rows["results"][s]["variants"][n]["of_sdpa"] for s in SHAPES))
        rows["best_overall"] = overall
        print(f"\nbest on every shape (max of the min share of SDPA): {overall}: " + ", ".join(
            f"{s} {rows['results'][s]['variants'][overall]['of_sdpa']:.1%}" for s in SHAPES))
    rows["wall_s"] = time.time() - t_start
    default = f"prefill_sweep_{rows['date']}{'_smoke' if args.smoke else ''}.json"
    path = args.json or os.path.join(ROOT, "bench", "results", default)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)
    print(f"wrote {path} ({rows['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
