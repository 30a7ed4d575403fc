"""Where the 8B fixed workload's steps lose against their ceilings, kernel by kernel, and which decode variants win.

    python bench/decode_fixed.py --json bench/results/decode_fixed_<date>_h200.json       # ~50 s on an H200
    python bench/decode_fixed.py --sections attention compare --attn-batches 48 64 128 192 256   # round 2, ~40 s
    TRITON_INTERPRET=1 python bench/decode_fixed.py --shape tiny --device cpu --dtype float32 --quick   # smoke test

The fixed workload (bench/throughput.py) decodes 256 sequences whose contexts are all equal (256 + step), after
eight 8,192-token prefill steps of 32 fresh prompts each. This script, on one process (--sections picks):
1. the ceilings (bench/throughput.measure_ceilings: copy GB/s, bf16 matmul TFLOP/s);
2. attention: decode attention at 256 sequences (equal and spread contexts) and at the chat's 32 and 96, or
   at --attn-batches with LAUNCHES: every launch checked against the torch reference, then timed from a CUDA
   graph of 10 calls (so the host's launch time is not measured); the KV read rate against the copy ceiling;
3. gemms: each projection at 1-256 rows (cuBLAS, cuBLASLt, dense_gemm launches) and 8,192 (cuBLAS, cuBLASLt),
   graph-timed over rotating weights, against max(FLOPs at the matmul rate, bytes at the copy rate); prints
   the dense_dispatch.TABLE its small-row winners make;
4. engine: on a random-weight engine of the shape, the decode step of 256 x 384 from a CUDA graph and eagerly,
   the sum of its kernels (torch.profiler) and what is left (kernel boundaries), each kernel against its own
   ceiling; decode-step variants re-captured into the graph (attention launches, split counts, cuBLASLt, the
   run's GEMM table) at 256 and 32 sequences, each step's logits compared with the baseline's first; the
   8,192-token prefill step; the engine's own decode steps (trace span against the graph); mixed steps of
   1,024-8,192 tokens eager against their graph (which mixed buckets earn their capture time);
5. compare: the defaults against the other launches and the GEMM table before round 1, at 256, 96 and 32
   sequences and a chat-like mixed step, then 40 decode replays back to back against one after an idle GPU
   with nvidia-smi's clocks (the GPU slows under sustained load).
Records: bench/results/decode_fixed_2026-11-29_h200_r1.json / _r2.json (and .log); bench/results/history_performance.md,
"The 8B fixed workload: where the 30% goes".
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.chat_profile import device_ms, layer_shapes, step_ceiling_ms  # noqa: E402
from bench.decode_profile import group_of  # noqa: E402
from bench.mixed_graphs import step_inputs  # noqa: E402
from bench.throughput import SHAPES, measure_ceilings, model_bytes_and_flops, write_config  # noqa: E402

BLOCK = 16
SEQS, CTX = 256, 384
"""The fixed workload's decode step at its mean context (256 in + 128 of 256 out)."""
ATTN_CONFIGS = [dict(TILE_N=t, num_warps=w, num_stages=s)
                for t, w, s in ((64, 4, 2), (64, 4, 5), (32, 4, 5), (32, 4, 7), (64, 8, 5), (128, 8, 5), (32, 4, 3),
                                (64, 8, 2))]
"""Launch configs timed at the decode shape (the first is the engine's default on an H200). Compiled offline for
sm_90a with Triton 3.6 (strides divisible by 16, as the JIT specializes them), the loop's K/V tiles get one
shared-memory buffer at num_stages 2-4 (the next tile's copy is issued after this tile's dots and waited on at
once: no overlap of load and math inside a program), two at 5-6 and three at 7; 64/4/2: 96 registers, 38 KB."""


# --- timing helpers ----------------------------------------------------------------------------------------
def graph_ms(fn, device, calls: int = 10, reps: int = 5) -> float:
    """Device ms per call of fn from a CUDA graph of `calls` calls (median of reps replays); on CPU one call's
    wall time. Each call must read more than the L2 holds (true of every shape timed here) or be given
    rotating operands by the caller."""
    if device.type != "cuda":
        t = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t)
    fn()
    torch.cuda.synchronize(device)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    g.replay()
    torch.cuda.synchronize(device)
    out = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        g.replay()
        e1.record()
        e1.synchronize()
        out.append(e0.elapsed_time(e1) / calls)
    del g
    return float(np.median(out))


def kv_case(seqs: int, lens: list[int], hkv: int, d: int, device, dtype, seed: int = 0):
    """q, a KV pool holding the sequences' blocks in shuffled order (as a pool is after many requests), block
    tables, seq_lens."""
    g = torch.Generator(device=device).manual_seed(seed)
    need = [-(-n // BLOCK) for n in lens]
    width = max(need)
    nblocks = sum(need)
    kv = torch.randn(2, nblocks, BLOCK, hkv, d, device=device, dtype=dtype, generator=g)
    perm = torch.randperm(nblocks, device=device, generator=g).to(torch.int32)
    tables = torch.zeros(seqs, width, dtype=torch.int32, device=device)
    at = 0
    for i, n in enumerate(need):
        tables[i, :n] = perm[at:at + n]
        at += n
    return kv, tables, torch.tensor(lens, dtype=torch.int32, device=device)


# --- 2. decode attention -----------------------------------------------------------------------------------
def _compile_attn(job: tuple[dict, int, int, int, int]) -> str:
    """(in a worker process) Build one decode launch (and its split reduce) into Triton's on-disk cache, on a
    small pool of the real layout (the strides the kernel specializes on are the pool's, not its size)."""
    import kernels.paged_decode as pd

    cfg, split, hq, hkv, d = job
    try:
        kv, tables, lens = kv_case(SEQS, [CTX] * 4 + [16] * (SEQS - 4), hkv, d, torch.device("cuda"), torch.bfloat16)
        q = torch.zeros(SEQS, hq, d, device="cuda", dtype=torch.bfloat16)
        pd.paged_decode(q, kv, tables, lens, d ** -0.5, max_seq_len=CTX, num_splits=split, config=cfg)
        torch.cuda.synchronize()
        return ""
    except Exception as e:  # reported again by the timed process
        return f"{cfg} split {split}: {type(e).__name__}"


def precompile_attention(trials, hq, hkv, d) -> None:
    """Compile every decode launch in worker processes first (serially ~1.5 s each)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    t0 = time.perf_counter()
    work = [(c, s, hq, hkv, d) for c, s in trials]
    try:
        with ProcessPoolExecutor(min(8, len(work)), mp_context=multiprocessing.get_context("spawn")) as pool:
            errors = [e for e in pool.map(_compile_attn, work) if e]
    except Exception as e:  # a broken pool: the timed process compiles what is left itself
        errors = [f"pool: {type(e).__name__}: {e}"]
    print(f"precompiled {len(work)} decode launches in {time.perf_counter() - t0:.0f} s"
          + (f"; errors: {errors[:3]}" if errors else ""), flush=True)


LAUNCHES = [dict(TILE_N=64, num_warps=4, num_stages=2), dict(TILE_N=64, num_warps=8, num_stages=2),
            dict(TILE_N=64, num_warps=4, num_stages=5)]
"""--attn-batches: the default launch, 8 warps, and double-buffered K/V (5 stages)."""


def attention_part(cfg, ceil, device, dtype, quick: bool, batches=None) -> list[dict]:
    import kernels.paged_decode as pd

    hq, hkv, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    configs = [pd._decode_config(d, dtype)] if quick else ATTN_CONFIGS
    extra = [(configs[0], 2), (configs[0], 4), (dict(configs[0], HEADS_FASTEST=False), 1),
             (dict(configs[0], EVICTION="evict_first"), 1)] if not quick else [(configs[0], 2)]
    fixed = [(c, 1) for c in configs] + extra
    # The chat run's small decode steps (docs/performance.md: attention there at ~59% of copy): split counts.
    chat = [(configs[0], s) for s in (1, 2, 4, 8, 16)] + [(c, s) for c in configs[1:4] for s in (1, 2, 4)]
    spread = lambda n, lo, hi: [int(x) for x in np.linspace(lo, hi, n).round()]  # noqa: E731
    cases = [("256 equal 384", [CTX] * SEQS, fixed), ("256 spread 257..511", spread(SEQS, 257, 511), fixed),
             ("32 spread 500..1000", spread(32, 500, 1000), chat), ("96 spread 325..650", spread(96, 325, 650), chat)]
    if batches:  # each batch at the split the chat's decode graphs (max_model_len 2,064) would launch
        cases = []
        for b in batches:
            split = pd.choose_num_splits(b, hkv, 2064, pd.num_sms(device))
            lens = [CTX] * b if b == SEQS else spread(b, 325, 650)
            cases.append((f"{b} {'equal 384' if b == SEQS else 'spread 325..650'}", lens, [(c, split) for c in LAUNCHES]))
    if quick:
        cases = [("4 equal 40", [40] * 4, fixed), ("4 spread", [17, 40, 33, 5], fixed)]
    copy = ceil["copy_GBps"]
    if device.type == "cuda":
        precompile_attention(list({json.dumps([c, s], sort_keys=True): (c, s) for _, _, t in cases for c, s in t}.values()),
                             hq, hkv, d)
    out = []
    print(f"\ndecode attention, {hq} q / {hkv} kv heads, head_dim {d} (copy {copy:.0f} GB/s): "
          "KV read GB/s and % of copy", flush=True)
    for label, lens, trials in cases:
        seqs = len(lens)
        kv, tables, seq_lens = kv_case(seqs, lens, hkv, d, device, dtype)
        q = torch.randn(seqs, hq, d, device=device, dtype=dtype)
        scale = d ** -0.5
        ref = pd.paged_decode_ref(q.float(), kv.float(), tables, seq_lens, scale)
        kv_bytes = sum(lens) * hkv * d * 2 * kv.element_size()
        rows = []
        # torch's gather of the same blocks (read + write, as the copy ceiling counts): what the access pattern allows.
        idx = torch.randperm(kv.shape[1], device=device)  # every block of the pool, in another order
        t = graph_ms(lambda: kv.index_select(1, idx), device)
        gather = 2 * kv_bytes / t / 1e6
        for c, split in trials:
            name = ",".join(f"{k}={v}" for k, v in c.items()) + f",split={split}"
            try:
                run = lambda c=c, split=split: pd.paged_decode(q, kv, tables, seq_lens, scale,  # noqa: E731
                                                               max_seq_len=max(lens), num_splits=split, config=c)
                err = ((run().float() - ref).abs().max() / ref.abs().max()).item()
                if not err < 2e-2:
                    print(f"  {label}: {name}: WRONG (rel err {err:.2g})", flush=True)
                    rows.append(dict(config=name, ok=False, err=err))
                    continue
                ms = graph_ms(run, device)
                rows.append(dict(config=name, cfg=c, split=split, ok=True, err=err, ms=ms, GBps=kv_bytes / ms / 1e6))
            except Exception as e:  # a config that does not compile (shared memory) is reported, not fatal
                print(f"  {label}: {name}: {type(e).__name__} {str(e)[:120]}", flush=True)
                rows.append(dict(config=name, ok=False, error=str(e)[:200]))
        good = [r for r in rows if r["ok"]]
        base = good[0] if good and good[0]["config"] == rows[0]["config"] else None  # the first trial
        best = max(good, key=lambda r: r["GBps"]) if good else None
        print(f"  {label}: torch gather {gather:.0f} GB/s ({gather / copy:.0%}); default "
              f"{base['GBps'] if base else float('nan'):.0f} ({(base['GBps'] if base else 0) / copy:.0%}, "
              f"{base['ms'] if base else float('nan'):.4f} ms/layer); best {best['GBps'] if best else float('nan'):.0f} "
              f"({(best['GBps'] if best else 0) / copy:.0%}) {best['config'] if best else ''}", flush=True)
        for r in sorted(good, key=lambda r: -r["GBps"]):
            print(f"      {r['GBps']:>7.0f} GB/s {r['ms']:.4f} ms  {r['config']}")
        out.append(dict(case=label, lens_sum=sum(lens), kv_bytes=kv_bytes, gather_GBps=gather, results=rows))
        del kv, tables, q, ref
    return out


# --- 3. GEMMs ----------------------------------------------------------------------------------------------
def _cublaslt(x, w):
    blas = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library("cublaslt")
    try:
        return F.linear(x, w)
    finally:
        torch.backends.cuda.preferred_blas_library(blas)


SMALL_MS = (1, 16, 32, 64, 128, 256)
"""Row counts of decode steps at which dense_gemm candidates are timed against cuBLAS (graph-timed: the chat
round's per-call timing also measured dense_gemm's ~50 us of host work, which a graph does not pay)."""


def gemm_candidates(m: int) -> list[dict]:
    """chat_profile's dense_gemm launches for m rows, and for few rows each again with PREFETCH (its first
    weight tile loaded before the PDL wait: a graph of consecutive calls chains them as a step does)."""
    from bench.chat_profile import candidates

    base = candidates(m)
    return base + ([dict(c, PREFETCH=True) for c in base] if m <= 64 else [])


def precompile_gemms(jobs: int = 8) -> None:
    """Compile every dense_gemm launch gemm_part times in worker processes (bench/chat_profile._compile_one)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from bench.chat_profile import _compile_one

    t0 = time.perf_counter()
    cfgs = {json.dumps(c, sort_keys=True): c for m in SMALL_MS for c in gemm_candidates(m)}
    work = [(c, split) for c in cfgs.values() for split in (1, 2)]
    try:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            errors = [e for e in pool.map(_compile_one, work) if e]
    except Exception as e:  # a broken pool: the timed process compiles what is left itself
        errors = [f"pool: {type(e).__name__}: {e}"]
    print(f"precompiled {len(work)} dense_gemm builds in {time.perf_counter() - t0:.0f} s"
          + (f"; errors: {errors[:3]}" if errors else ""), flush=True)


def gemm_part(cfg, ceil, device, dtype) -> tuple[list[dict], dict]:
    """Each projection at SMALL_MS and 8,192 rows: cuBLAS, cuBLASLt and (small M) dense_gemm launches, each
    checked against F.linear, timed from CUDA graphs over rotating weights. Returns the rows and a
    dense_dispatch.TABLE of the small-M winners (cuBLASLt or dense_gemm beating cuBLAS by more than 3%)."""
    from bench.chat_profile import merge_entry
    from kernels.dense_gemm import dense_gemm

    bw, mm = ceil["copy_GBps"] * 1e9, ceil["matmul_TFLOPs"] * 1e12
    rows, table = [], {}
    dev_name = torch.cuda.get_device_name(device)
    print(f"\nGEMMs (graphs of 10+ calls over rotating weights): ms and % of max(FLOPs/matmul, bytes/copy)")
    print(f"{'proj':<9}{'M':>6}{'ceil ms':>9}{'cuBLAS':>9}{'of':>5}{'cuBLASLt':>10}{'of':>5}{'dense_gemm':>11}{'of':>5}  best config")
    for name, (n, k) in layer_shapes(cfg).items():
        copies = max(2, math.ceil((128 << 20) / (n * k * 2)))  # together more than the L2: each call reads from HBM
        ws = [torch.randn(n, k, device=device, dtype=dtype) * 0.02 for _ in range(copies)]
        entry = []
        for m in SMALL_MS + (8192,):
            if name == "lm_head" and m > 256:
                continue  # the LM head runs on each sequence's last row only
            x = torch.randn(m, k, device=device, dtype=dtype)
            flops, nbytes = 2 * m * n * k, 2 * (n * k + m * k + m * n)
            c_ms = 1e3 * max(flops / mm, nbytes / bw)

            def rotating(f):
                i = [0]

                def call():
                    i[0] += 1
                    return f(x, ws[i[0] % copies])
                return graph_ms(call, device, calls=max(10, copies))
            t_blas, t_lt = rotating(F.linear), rotating(_cublaslt)
            best_t, best_cfg = float("inf"), None
            if m in SMALL_MS:
                ref = F.linear(x, ws[0]).float()
                for c in gemm_candidates(m):
                    try:
                        err = (dense_gemm(x, ws[0], c).float() - ref).abs().max().item()
                        if not err <= 1e-2 * ref.abs().max().item() + 1e-3:
                            print(f"  {name} M={m} {c}: WRONG (max |diff| {err:.3g})", flush=True)
                            continue
                        t = rotating(lambda a, b, c=c: dense_gemm(a, b, c))
                    except Exception as e:  # a launch the compiler refuses: said, skipped
                        print(f"  {name} M={m} {c}: {type(e).__name__}: {str(e)[:100]}", flush=True)
                        continue
                    if t < best_t:
                        best_t, best_cfg = t, c
                alt = min((t_lt, "cublaslt"), (best_t, "dense_gemm"))
                entry.append((m, None if not alt[0] < 0.97 * t_blas else "cublaslt" if alt[1] == "cublaslt" else best_cfg))
            rows.append(dict(proj=name, m=m, n=n, k=k, ceil_ms=c_ms, cublas_ms=t_blas, cublaslt_ms=t_lt,
                             dense_gemm_ms=best_t if best_cfg else None, dense_gemm_config=best_cfg))
            dg = f"{best_t:>11.4f}{c_ms / best_t:>5.0%}" if best_cfg else f"{'-':>11}{'':>5}"
            print(f"{name:<9}{m:>6}{c_ms:>9.4f}{t_blas:>9.4f}{c_ms / t_blas:>5.0%}{t_lt:>10.4f}{c_ms / t_lt:>5.0%}{dg}"
                  f"  {best_cfg or ''}", flush=True)
        table[(dev_name, n, k)] = merge_entry(entry)
        del ws
    print("dense_dispatch.TABLE from this run's small-M winners (graph-timed):")
    for key, e in table.items():
        print(f"    {key!r}: {e!r},")
    return rows, table


# --- 4. engine steps ---------------------------------------------------------------------------------------
def kernel_ideal_ms(name: str, calls: float, lens, cfg, ceil, gemm_shapes: dict) -> float:
    """A kernel's ideal ms per step from the step's shapes: bytes at the copy rate for the elementwise and
    attention kernels (read + written, as the copy ceiling counts them); NaN where not known (GEMMs are
    judged per shape from their aten::mm rows)."""
    bw = ceil["copy_GBps"] * 1e9
    d, f, hq, hkv, hd, L = (cfg[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                             "num_key_value_heads", "head_dim", "num_hidden_layers"))
    m = sum(n for n, _ in lens)
    per_call = {"_add_norm_kernel": 8 * m * d, "_silu_mul_kernel": 6 * m * f, "_rotary_kernel": 4 * m * (hq + hkv) * hd,
                "_reshape_and_cache_kernel": 8 * m * hkv * hd,
                "_paged_decode_kernel": 4 * hkv * hd * sum(c for n, c in lens if n == 1)}
    b = per_call.get(name)
    return float("nan") if b is None or bw != bw else 1e3 * calls * b / bw


def profile_step(runner, lens, cfg, ceil, label: str) -> dict:
    """Eager step under torch.profiler: kernels per step with their ideal where known, GEMMs by (M, N, K)
    from the aten::mm rows (record_shapes) against max(FLOPs at the matmul rate, bytes at the copy rate)."""
    from torch.profiler import ProfilerActivity, profile

    inputs = step_inputs(runner, lens, 7)
    graphs, runner.graphs = runner.graphs, None
    n = 3
    try:
        runner.execute(inputs)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
            for _ in range(n):
                runner.execute(inputs)
            torch.cuda.synchronize()
    finally:
        runner.graphs = graphs
    kernels, gemms = [], []
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", 0)
        kernel = getattr(ev, "device_type", None) == torch.autograd.DeviceType.CUDA or (t and not ev.cpu_time_total)
        if kernel and t and not ev.key.startswith(("Memcpy", "Memset", "aten::", "cuda")):
            calls = ev.count / n
            kernels.append({"kernel": ev.key, "ms": t / 1e3 / n, "calls": calls, "group": group_of(ev.key),
                            "ideal_ms": kernel_ideal_ms(ev.key, calls, lens, cfg, ceil, {})})
    bw, mm = ceil["copy_GBps"] * 1e9, ceil["matmul_TFLOPs"] * 1e12
    for ev in prof.key_averages(group_by_input_shape=True):
        if ev.key in ("aten::mm", "aten::addmm") and ev.device_time_total:
            shapes = [s for s in ev.input_shapes if len(s) == 2]
            if len(shapes) < 2:
                continue
            (m_, k_), (_, n_) = shapes[-2], shapes[-1]
            fl, by = 2 * m_ * n_ * k_, 2 * (m_ * k_ + k_ * n_ + m_ * n_)
            calls = ev.count / n
            gemms.append({"m": m_, "n": n_, "k": k_, "calls": calls, "ms": ev.device_time_total / 1e3 / n,
                          "ideal_ms": 1e3 * calls * max(fl / mm, by / bw)})
    kernels.sort(key=lambda r: -r["ms"])
    gemms.sort(key=lambda r: -r["ms"])
    total = sum(r["ms"] for r in kernels)
    groups = {g: sum(r["ms"] for r in kernels if r["group"] == g) for g in ("gemm", "attention", "other")}
    print(f"\nprofile {label}: kernels {total:.3f} ms/step (" + ", ".join(f"{g} {v:.3f}" for g, v in groups.items())
          + f"), {sum(r['calls'] for r in kernels):.0f} kernels")
    print(f"{'ms/step':>9}{'ideal':>8}{'of':>5}{'calls':>6}  kernel")
    for r in kernels[:14]:
        of = f"{r['ideal_ms'] / r['ms']:.0%}" if r["ideal_ms"] == r["ideal_ms"] else "-"
        print(f"{r['ms']:>9.3f}{r['ideal_ms']:>8.3f}{of:>5}{r['calls']:>6.0f}  {r['kernel'][:90]}")
    print("  GEMMs by shape (device time incl. split-K reduce):")
    for r in gemms:
        print(f"  {r['m']:>6} x {r['n']:>6} x {r['k']:>6} {r['calls']:>4.0f}x {r['ms']:>8.3f} ms, ideal {r['ideal_ms']:.3f}"
              f" ({r['ideal_ms'] / r['ms']:.0%})")
    return {"label": label, "kernel_ms": total, "groups_ms": groups, "kernels": kernels[:30], "gemms": gemms,
            "num_kernels": sum(r["calls"] for r in kernels)}


def recapture_decode(runner, max_model_len: int, seqs: int) -> float:
    """Decode graphs for exactly `seqs` sequences (one bucket: fast) with whatever the kernels' globals say now."""
    import gc

    from services.engine import cuda_graphs

    t0 = time.perf_counter()
    runner.graphs = None
    gc.collect()
    if runner.device.type == "cuda":
        torch.cuda.empty_cache()
    saved = cuda_graphs.DECODE_BUCKETS
    cuda_graphs.DECODE_BUCKETS = (seqs,)
    try:
        runner.capture_decode_graphs(seqs, max_model_len)
    finally:
        cuda_graphs.DECODE_BUCKETS = saved
    return time.perf_counter() - t0


def decode_variants(runner, inputs, max_model_len, seqs, iters, base_logits, variants, dims, deadline,
                    capture=None) -> list[dict]:
    """The decode step from its graph under each variant (kernel globals patched, graph re-captured); logits
    compared with the baseline's (greedy argmax agreement, max |diff|) before the timing counts."""
    import kernels.paged_decode as pd
    from kernels import pdl
    from services.engine.model.layers import dense_dispatch as dd

    cfg0, splits0, table0, pdl0, early0 = pd._decode_config, pd.choose_num_splits, dict(dd.TABLE), pdl.ENABLED, pdl.EARLY
    out = []
    for label, v in variants:
        if time.perf_counter() > deadline:
            print(f"  {label}: skipped (past --budget)")
            continue
        try:
            if "attn" in v:
                pd._decode_config = lambda *a, _c=v["attn"], **k: dict(_c)
            if "split" in v:
                pd.choose_num_splits = lambda *a, _s=v["split"], **k: _s
            if "pdl" in v:
                pdl.ENABLED = v["pdl"]
            if "early" in v:
                pdl.EARLY = v["early"]
            if "table" in v:
                dd.TABLE.update(v["table"])
            if "table_only" in v:
                dd.TABLE.clear()
                dd.TABLE.update(v["table_only"])
            if v.get("lt"):
                name = dd._device_name(inputs.input_ids)
                for n, k in dims:
                    dd.TABLE[(name, n, k)] = ((seqs, dd.CUBLASLT),)
            cap = capture() if capture else recapture_decode(runner, max_model_len, seqs)
            logits = runner.execute(inputs).float()
            agree = float((logits.argmax(-1) == base_logits.argmax(-1)).float().mean()) if base_logits is not None else 1.0
            diff = float((logits - base_logits).abs().max()) if base_logits is not None else 0.0
            ms = device_ms(runner, inputs, iters)
            out.append({"variant": label, "graph_ms": ms, "argmax_agree": agree, "max_abs_diff": diff, "capture_s": cap})
            print(f"  {label:<44} {ms:>8.3f} ms  argmax agree {agree:.3f}, max |dlogit| {diff:.3g}", flush=True)
        except Exception as e:
            print(f"  {label}: {type(e).__name__} {str(e)[:160]}", flush=True)
            out.append({"variant": label, "error": str(e)[:300]})
        finally:
            pd._decode_config, pd.choose_num_splits, pdl.ENABLED, pdl.EARLY = cfg0, splits0, pdl0, early0
            dd.TABLE.clear()
            dd.TABLE.update(table0)
    base = out[0].get("graph_ms")
    ok = [r for r in out[1:] if "graph_ms" in r and r["argmax_agree"] >= 0.98]
    if base and ok:
        best = min(ok, key=lambda r: r["graph_ms"])
        print(f"  winner: {best['variant']} {best['graph_ms']:.3f} ms against baseline {base:.3f} "
              f"({base / best['graph_ms'] - 1:+.1%})")
    if capture:
        capture()
    else:
        recapture_decode(runner, max_model_len, seqs)
    return out


def eager_ms(runner, inputs, iters: int) -> tuple[float, float]:
    """(device ms, host launch ms) of an eager step: its launches queued behind ~100 ms of GPU sleep, so the
    device time does not include the host's; medians."""
    graphs, runner.graphs = runner.graphs, None
    dev, host = [], []
    try:
        runner.execute(inputs)
        for _ in range(iters):
            torch.cuda.synchronize()
            torch.cuda._sleep(200_000_000)
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            t = time.perf_counter()
            runner.execute(inputs)
            host.append(1e3 * (time.perf_counter() - t))
            e1.record()
            e1.synchronize()
            dev.append(e0.elapsed_time(e1))
    finally:
        runner.graphs = graphs
    return float(np.median(dev)), float(np.median(host))


def mixed_graph_gain(runner, max_len: int, ctx: int, seqs: int, iters: int, deadline: float) -> list[dict]:
    """Mixed steps (64 decodes + fresh prompts) of 1,024-8,192 tokens: eager device time and host launch time
    against the step's graph (one bucket captured for it). Where the graph saves nothing on the device and
    the eager launch is shorter than the device time (the host keeps ahead under async scheduling), the
    bucket only costs startup (capture) time."""
    from services.engine import cuda_graphs

    out = []
    print("\nmixed steps (64 decodes at the decode context + fresh prompts): eager vs graph")
    print(f"{'tokens':>7}{'eager dev ms':>13}{'host launch':>12}{'graph ms':>10}{'capture s':>10}")
    saved = cuda_graphs.MIXED_BUCKETS
    try:
        for tokens in (1024, 2048, 4096, 8192):
            if time.perf_counter() > deadline:
                print(f"{tokens:>7}  skipped (past --budget)")
                continue
            rest = tokens - 64  # fresh prompts of at most 480 tokens (the engine's max_model_len is 640)
            prompts = [min(480, rest - i) for i in range(0, rest, 480)]
            mi = step_inputs(runner, [(1, ctx)] * 64 + [(n, n) for n in prompts], tokens)
            dev, host = eager_ms(runner, mi, iters)
            cuda_graphs.MIXED_BUCKETS = (tokens,)
            runner.graphs = None
            torch.cuda.empty_cache()
            t = time.perf_counter()
            runner.capture_mixed_graphs(tokens, seqs, max_len)
            cap = time.perf_counter() - t
            g = device_ms(runner, mi, iters)
            out.append(dict(tokens=tokens, eager_device_ms=dev, eager_host_ms=host, graph_ms=g, capture_s=cap))
            print(f"{tokens:>7}{dev:>13.2f}{host:>12.2f}{g:>10.2f}{cap:>10.2f}", flush=True)
    finally:
        cuda_graphs.MIXED_BUCKETS = saved
        recapture_decode(runner, max_len, seqs)
    return out


def engine_steps(llm, graph_ms: float, steps: int = 16) -> dict:
    """The engine's own decode steps at 256 sequences (scheduler, input copies, the graph, the sampler; async
    scheduling on, as bench/throughput.py runs): device span per step and idle gap (bench/step_trace.py)
    against the graph replay alone, then the kernels of a few steps that are not the graph's."""
    from torch.profiler import ProfilerActivity, profile

    from bench.step_trace import StepTrace
    from folio import SamplingParams

    engine = llm.engine
    engine.async_scheduling = True
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=0, max_tokens=steps + 24, ignore_eos=True)
    for i in range(SEQS):
        engine.add_request(f"d{i}", None, params, stream=False,
                           prompt_token_ids=rng.integers(3, engine.vocab_size, CTX - 8).tolist())
    while engine.scheduler.waiting or any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running):
        engine.step()
    for _ in range(3):
        engine.step()
    torch.cuda.synchronize()
    trace = StepTrace(engine)
    t = time.perf_counter()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    wall = 1e3 * (time.perf_counter() - t) / steps
    trace.detach()
    kinds = trace.summary()
    dec = kinds.get("decode", {"steps": 0})
    n = max(dec["steps"], 1)
    span, gap, host = (dec.get(k, float("nan")) / n for k in ("span_ms", "gap_ms", "host_ms"))
    print(f"\nengine decode steps ({dec['steps']} traced, async on): wall {wall:.3f} ms/step, device span {span:.3f}, "
          f"idle gap {gap:.3f}, host launch {host:.3f}; graph replay alone {graph_ms:.3f} "
          f"(span - graph = {span - graph_ms:.3f} ms)", flush=True)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(4):
            engine.step()
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        tt = getattr(ev, "device_time_total", 0)
        if tt and ev.count:
            rows.append({"kernel": ev.key, "ms": tt / 1e3 / 4, "calls": ev.count / 4})
    rows.sort(key=lambda r: -r["ms"])
    small = [r for r in rows if r["calls"] <= 4]  # the graph's kernels run once per layer: 32 or more a step
    print("  kernels and copies run fewer than 5 times a step (outside the layers):")
    for r in small[:10]:
        print(f"    {r['ms']:>7.3f} ms {r['calls']:>4.1f}x  {r['kernel'][:100]}")
    while engine.has_unfinished_requests():
        engine.step()
    engine.async_scheduling = False
    return {"wall_ms": wall, "span_ms": span, "gap_ms": gap, "host_ms": host, "graph_ms": graph_ms,
            "outside_layers": small[:20], "kernels": rows[:40]}


OLD_TABLE = {("NVIDIA H200", 4096, 4096): ((16, None), (192, "cublaslt")),
             ("NVIDIA H200", 4096, 14336): ((16, None), (192, "cublaslt"))}
"""dense_dispatch.TABLE before round 1's gate_up and LM-head entries."""


def smi() -> str:
    """SM and memory clocks (MHz), power (W) and temperature, read with nvidia-smi (read-only)."""
    import subprocess

    try:
        q = "clocks.sm,clocks.mem,power.draw,temperature.gpu"
        return subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
    except Exception as e:  # no nvidia-smi: said
        return f"nvidia-smi: {type(e).__name__}"


def sustained(runner, inputs, label: str, n: int = 40) -> dict:
    """n graph replays back to back (as the engine's decode steps run) against one after an idle GPU: does the
    step slow down as the GPU stays busy (clocks under its power limit)?"""
    single = device_ms(runner, inputs, 3)
    torch.cuda.synchronize()
    time.sleep(0.5)
    before = smi()
    evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for a, b in evs:
        a.record()
        runner.execute(inputs)
        b.record()
    during = smi()
    torch.cuda.synchronize()
    after = smi()
    t = [a.elapsed_time(b) for a, b in evs]
    out = {"single_ms": single, "first5_ms": float(np.mean(t[:5])), "last5_ms": float(np.mean(t[-5:])),
           "mean_ms": float(np.mean(t)), "smi_before": before, "smi_during": during, "smi_after": after}
    print(f"\nsustained {label}: one step after a GPU sleep {single:.3f} ms; {n} back to back: first 5 "
          f"{out['first5_ms']:.3f}, last 5 {out['last5_ms']:.3f}, mean {out['mean_ms']:.3f} ms\n"
          f"  nvidia-smi (SM MHz, mem MHz, W, C): before [{before}], during [{during}], after [{after}]", flush=True)
    return out


def compare_part(args, ceil, t0: float, res: dict, checkpoint) -> dict:
    """The engine's decode steps with the defaults against the other decode launches (LAUNCHES) and the GEMM
    table before round 1's entries (OLD_TABLE), at 256 x 384, 96 x 325-640 and 32 x 320-640 sequences, each at
    the split the chat's decode graphs would launch, and a chat-like mixed step; then the sustained check.
    (Round 2 ran it with a program-count rule as the default, since reverted: its "old attention launch" is
    today's default.)"""
    import kernels.paged_decode as pd

    cfg = SHAPES[args.shape]
    llm, runner, startup = make_engine(args, SEQS, 640)
    res["startup_eager_s"] = startup
    dims = [(n, k) for name, (n, k) in layer_shapes(cfg).items() if name != "lm_head"]
    deadline = t0 + args.budget
    for n, lens in ((SEQS, [(1, CTX)] * SEQS), (96, [(1, int(c)) for c in np.linspace(325, 640, 96).round()]),
                    (32, [(1, int(c)) for c in np.linspace(320, 640, 32).round()])):
        split = pd.choose_num_splits(n, cfg["num_key_value_heads"], 2064, pd.num_sms(runner.device))
        inputs = step_inputs(runner, lens, n)
        saved, pd.choose_num_splits = pd.choose_num_splits, lambda *a, _s=split, **k: _s
        try:
            recapture_decode(runner, 640, n)
            base = runner.execute(inputs).float()
        finally:
            pd.choose_num_splits = saved
        print(f"\ndecode step, {n} sequences (split {split}): the defaults against what they replaced")
        res[f"compare_{n}"] = decode_variants(
            runner, inputs, 640, n, args.iters, base,
            [("defaults", {"split": split})] + [(f"attn {c}", {"attn": c, "split": split}) for c in LAUNCHES[1:]]
            + [("old GEMM table", {"table_only": OLD_TABLE, "split": split}), ("defaults again", {"split": split})],
            dims, deadline)
        checkpoint()
    # A chat-like mixed step (250 decodes + a 350-token prompt: its decode rows take the decode kernel, with
    # a bucket's 256 sequences of programs) from its one-bucket graph.
    from services.engine import cuda_graphs

    mi = step_inputs(runner, [(1, 500)] * 250 + [(350, 350)], 11)

    def capture_mixed() -> float:
        t, saved_b = time.perf_counter(), cuda_graphs.MIXED_BUCKETS
        runner.graphs = None
        cuda_graphs.MIXED_BUCKETS = (608,)
        try:
            runner.capture_mixed_graphs(608, SEQS, 640)
        finally:
            cuda_graphs.MIXED_BUCKETS = saved_b
        return time.perf_counter() - t
    capture_mixed()
    print("\nmixed step, 250 decodes at 500 + a 350-token prompt (608-token graph): the defaults against 8 warps")
    res["compare_mixed"] = decode_variants(
        runner, mi, 640, SEQS, args.iters, runner.execute(mi).float(),
        [("defaults", {}), (f"attn {LAUNCHES[1]}", {"attn": LAUNCHES[1]}), ("defaults again", {})],
        dims, deadline, capture=capture_mixed)
    checkpoint()
    recapture_decode(runner, 640, SEQS)
    res["sustained_256"] = sustained(runner, step_inputs(runner, [(1, CTX)] * SEQS, 5), f"decode {SEQS} x {CTX}")
    checkpoint()
    return res


def make_engine(args, seqs: int, max_len: int):
    """A random-weight engine of the shape without graphs (the parts capture their own)."""
    from folio import LLM

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        llm = LLM(str(write_config(args.shape, Path(tmp))), load_format="dummy", dtype=args.dtype, device=args.device,
                  max_model_len=max_len, max_num_seqs=seqs, enable_prefix_caching=False, async_scheduling=False,
                  enforce_eager=True)
        startup = time.perf_counter() - t
    print(f"\nengine up (eager, no graphs) in {startup:.1f} s", flush=True)
    return llm, llm.engine.runner, startup


def engine_part(args, ceil, attn_winners, t0: float, table: dict, res: dict, checkpoint, winners_32=()) -> dict:
    """Sections 4 and 5 into `res` (checkpoint() saves what is there so far); later parts skipped past --budget."""
    cfg = SHAPES[args.shape]
    dev = torch.device(args.device)
    seqs, ctx = (4, 40) if args.quick else (SEQS, CTX)
    max_len = 64 if args.quick else 640
    llm, runner, startup = make_engine(args, seqs, max_len)
    res["startup_eager_s"] = startup
    deadline = t0 + args.budget
    lens = [(1, ctx)] * seqs
    inputs = step_inputs(runner, lens, 1)
    W, _, kv_tok = model_bytes_and_flops(cfg)
    if dev.type != "cuda":
        base = runner.execute(inputs)
        res["decode_eager_ms"] = device_ms(runner, inputs, 1)
        print(f"decode step {seqs} x {ctx}: logits {tuple(base.shape)}, eager {res['decode_eager_ms']:.1f} ms (CPU)")
        return res
    res["decode_capture_s"] = recapture_decode(runner, max_len, seqs)
    graph = device_ms(runner, inputs, args.iters)
    graphs, runner.graphs = runner.graphs, None
    eager = device_ms(runner, inputs, args.iters)
    base_logits = runner.execute(inputs).float()
    runner.graphs = graphs
    bw = ceil["copy_GBps"] * 1e9
    roof = 1e3 * (W + seqs * ctx * kv_tok) / bw
    prof = profile_step(runner, lens, cfg, ceil, f"decode {seqs} x {ctx}")
    mm = ceil["matmul_TFLOPs"] * 1e12
    floor = sum(g["ideal_ms"] for g in prof["gemms"]) + 1e3 * seqs * ctx * kv_tok / bw
    print(f"\ndecode {seqs} x {ctx}: graph {graph:.3f} ms, eager {eager:.3f} ms, kernels {prof['kernel_ms']:.3f} ms "
          f"(graph - kernels = {graph - prof['kernel_ms']:.3f} ms over {prof['num_kernels']:.0f} kernels: boundaries)")
    print(f"  roofline's decode step (weights + KV at the copy rate) {roof:.3f} ms = {roof / graph:.0%} of the graph; "
          f"per-kernel floor (GEMMs at their shape's ceiling + KV at the copy rate) {floor:.3f} ms "
          f"= {floor / graph:.0%}; GEMM FLOPs alone at the matmul rate "
          f"{1e3 * sum(2 * g['m'] * g['n'] * g['k'] * g['calls'] for g in prof['gemms']) / mm:.3f} ms")
    res.update(decode_graph_ms=graph, decode_eager_ms=eager, decode_roofline_ms=roof, decode_floor_ms=floor,
               decode_profile=prof)
    checkpoint()
    print("\ndecode-step variants, 256 sequences (graph re-captured for each):")
    dims = [(n, k) for name, (n, k) in layer_shapes(cfg).items() if name != "lm_head"]
    variants = [("baseline", {})] + ([("this run's GEMM table", {"table": table})] if table else []) + [
        (f"attn {w}", {"attn": w}) for w in attn_winners[:2]] + [("attn split 2", {"split": 2}),
                                                                  ("cuBLASLt at 256 rows", {"lt": True})]
    res["variants"] = decode_variants(runner, inputs, max_len, seqs, args.iters, base_logits, variants, dims,
                                      deadline)
    checkpoint()
    # The chat's small decode steps: 32 sequences at 320-640 (its graphs split attention for max_model_len 2,064;
    # this engine's 640 would not split: the split counts are forced).
    small = [(1, c) for c in np.linspace(320, max_len, 32).round().astype(int)]
    s_in = step_inputs(runner, small, 3)
    import kernels.paged_decode as pd

    saved, pd.choose_num_splits = pd.choose_num_splits, lambda *a, **k: 2
    try:
        recapture_decode(runner, max_len, 32)
        s_base = runner.execute(s_in).float()
    finally:
        pd.choose_num_splits = saved
    print("\ndecode-step variants, 32 sequences at 320-640:")
    s_vars = [("split 2 (the chat graphs', baseline)", {"split": 2})] + (
        [("this run's GEMM table, split 2", {"table": table, "split": 2})] if table else []) + [
        (f"attn {c} split {sp}", {"attn": c, "split": sp}) for c, sp in winners_32] + [
        ("split 4", {"split": 4}), ("split 1", {"split": 1})]
    res["variants_32"] = decode_variants(runner, s_in, max_len, 32, args.iters, s_base, s_vars, dims, deadline)
    recapture_decode(runner, max_len, seqs)
    checkpoint()
    # The prefill step of the fixed workload: 32 fresh prompts of 256 tokens.
    if time.perf_counter() > deadline:
        print("prefill: skipped (past --budget)")
        return res
    plens = [(256, 256)] * 32
    pin = step_inputs(runner, plens, 2)
    p_dev, p_host = eager_ms(runner, pin, 3)
    pt = {"gpu_ms": p_dev, "host_ms": p_host}
    pceil = step_ceiling_ms(cfg, plens, ceil)
    print(f"\nprefill 32 x 256 (8,192 tokens) eager: device {pt['gpu_ms']:.2f} ms, host launch {pt['host_ms']:.2f} ms, "
          f"ceiling (FLOPs at the matmul rate) {pceil:.2f} ms = {pceil / pt['gpu_ms']:.0%}")
    res.update(prefill_eager=pt, prefill_ceil_ms=pceil, prefill_profile=profile_step(runner, plens, cfg, ceil, "prefill 32 x 256"))
    checkpoint()
    if time.perf_counter() > deadline:
        print("engine steps, mixed graphs: skipped (past --budget)")
        return res
    try:
        res["engine_steps"] = engine_steps(llm, graph)
    except Exception as e:  # reported; what follows still runs
        print(f"engine steps: {type(e).__name__} {str(e)[:200]}", flush=True)
    checkpoint()
    res["mixed_graphs"] = mixed_graph_gain(runner, max_len, ctx, seqs, args.iters, deadline)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3-8b", choices=list(SHAPES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test on CPU)")
    ap.add_argument("--sections", nargs="+", default=["attention", "gemms", "engine"],
                    choices=["attention", "gemms", "engine", "compare"],
                    help="what to run (default: the first three; compare: the defaults against what they replaced)")
    ap.add_argument("--attn-batches", type=int, nargs="*", default=None,
                    help="the attention part at these sequence counts, the three LAUNCHES")
    ap.add_argument("--attn-configs", default=None,
                    help="JSON list of decode launch configs for the engine's variants (default: the attention part's winners)")
    ap.add_argument("--budget", type=float, default=70.0, help="seconds after which decode variants are skipped")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    ceil = measure_ceilings(dev)
    print(f"device {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}: copy {ceil['copy_GBps']:.0f} GB/s, "
          f"bf16 matmul {ceil['matmul_TFLOPs']:.0f} TFLOP/s ({time.perf_counter() - t0:.0f} s)", flush=True)
    cfg = SHAPES[args.shape]
    rec = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "command": "python bench/decode_fixed.py " + " ".join(sys.argv[1:]), "shape": args.shape, **ceil}
    pre = None
    if dev.type == "cuda" and "gemms" in args.sections:  # dense_gemm's builds compile in worker processes while the attention part runs
        import threading

        pre = threading.Thread(target=precompile_gemms, daemon=True)
        pre.start()
    rec["attention"] = (attention_part(cfg, ceil, dev, dtype, args.quick, args.attn_batches)
                        if "attention" in args.sections else [])
    # The two fastest configs (at split 1) of the equal-context cases go on to the engine's graph.
    score: dict[str, float] = {}
    for case in rec["attention"]:
        for r in case["results"]:
            if r["ok"] and r["split"] == 1 and " equal " in case["case"]:
                score[json.dumps(r["cfg"], sort_keys=True)] = score.get(json.dumps(r["cfg"], sort_keys=True), 0) + r["ms"]
    winners = [json.loads(c) for c, _ in sorted(score.items(), key=lambda kv: kv[1])[:3]]
    # The fastest (config, split) at the chat's 32 sequences goes to the 32-sequence decode graph.
    small_best = [min((r for r in case["results"] if r["ok"]), key=lambda r: r["ms"], default=None)
                  for case in rec["attention"] if case["case"].startswith("32 ")]
    winners_32 = [(r["cfg"], r["split"]) for r in small_best if r]
    if args.attn_configs:
        winners = json.loads(args.attn_configs)
    print(f"(attention done at {time.perf_counter() - t0:.0f} s)", flush=True)
    table: dict = {}
    if pre is not None:
        pre.join()
    if dev.type == "cuda" and "gemms" in args.sections:
        rec["gemms"], table = gemm_part(cfg, ceil, dev, dtype)
        rec["gemm_table"] = {repr(k): v for k, v in table.items()}
        print(f"(gemms done at {time.perf_counter() - t0:.0f} s)", flush=True)
    save(rec, args.json)
    if "engine" in args.sections:
        rec["engine"] = {}
        try:
            engine_part(args, ceil, winners, t0, table, rec["engine"], lambda: save(rec, args.json), winners_32)
        except Exception as e:  # what ran before it is still written
            import traceback

            traceback.print_exc()
            rec["engine_error"] = f"{type(e).__name__}: {e}"
    if "compare" in args.sections and dev.type == "cuda":
        rec["compare"] = {}
        try:
            compare_part(args, ceil, t0, rec["compare"], lambda: save(rec, args.json))
        except Exception as e:  # what ran before it is still written
            import traceback

            traceback.print_exc()
            rec["compare_error"] = f"{type(e).__name__}: {e}"
    print(f"(total {time.perf_counter() - t0:.0f} s)")
    save(rec, args.json)
    if args.json:
        print(f"wrote {args.json}")


def save(rec: dict, path: str | None) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(rec, indent=1, default=str))


if __name__ == "__main__":
    main()
