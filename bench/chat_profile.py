"""Where the 8B chat workload's steps lose against their ceilings, and which GEMM launch wins per row count.

    python bench/chat_profile.py --json bench/results/chat_profile_<date>_h200.json     # ~90 s on an H200
    python bench/chat_profile.py --shape tiny --device cpu --quick                       # smoke test

1. GEMMs: each dense projection of the shape (qkv, o, gate_up, down, LM head) at the row counts decode and
   mixed steps use, timed (median of 20 calls, L2 flushed before each) with cuBLAS (F.linear),
   cuBLASLt (torch's preferred BLAS switched) and kernels/dense_gemm.py launches; every dense_gemm result is
   checked against F.linear first. Prints ms, the fraction of max(weight bytes at the copy rate, FLOPs at the
   matmul rate) reached, the winner, and the dispatch table the winners make (dense_dispatch.TABLE format).
2. Steps on a random-weight engine of the shape (max_model_len 2,064 as the chat run): decode steps of B
   sequences at context C replayed from their CUDA graphs, and mixed steps of D decodes plus one C-token
   prefill chunk, device time against the step's ceiling (weights + KV at the copy rate, or the matmul
   FLOPs at the matmul rate if larger).
3. Kernel by kernel (torch.profiler, eager launches: the graphs replay the same kernels) for a few of them:
   GEMMs, attention, the rest.
4. Decode attention at the chat's shapes: the split count the decode graphs capture against others, a few
   tile configs.
5. Some of the steps again from re-captured graphs with the winners' table installed (cuBLASLt or dense_gemm
   where either beat cuBLAS by more than 3%), with PDL flipped from the engine's default (kernels/pdl.py:
   every Triton kernel of the step, dense_gemm included, may launch before the previous one ends), and both;
   the table's logits compared with cuBLAS's first. The engine's own dense_dispatch.TABLE is off throughout
   (the baseline is cuBLAS alone) and restored at the end.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.decode_profile import group_of  # noqa: E402
from bench.mixed_graphs import step_inputs as make_step  # noqa: E402
from bench.throughput import SHAPES, measure_ceilings, model_bytes_and_flops, write_config  # noqa: E402

GEMM_MS = (1, 16, 32, 48, 64, 96, 128, 192, 256, 640)
"""Row counts timed (the LM head's stop at 256: it runs on the sampled rows only)."""
TRITON_MAX_M = 256
"""dense_gemm candidates are timed up to this many rows; above it cuBLAS alone (compute-bound tiles)."""
DECODE_STEPS = ((1, 700), (16, 700), (32, 700), (48, 700), (64, 700), (96, 700), (128, 700), (192, 600),
                (256, 500), (64, 1500), (16, 1800))
"""(sequences, context) of decode steps: the chat run's decode steps average 76 sequences; its tail runs long
outputs at few sequences."""
MIXED_STEPS = ((250, 350), (200, 200), (128, 512), (64, 200), (250, 120))
"""(decodes at context 600, prefill chunk of C new tokens): the chat run's mixed steps average ~600 tokens."""
PROFILE_STEPS = (("decode", 32, 700), ("decode", 96, 700), ("decode", 256, 500), ("mixed", 250, 350))


def candidates(m: int) -> list[dict]:
    """dense_gemm launches worth timing at m rows: swapped weight-streaming tiles for few rows, MMA tiles of
    64-128 rows for more (kept few: each is a compile)."""
    if m <= 16:
        return [dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, SWAP=True, num_warps=4, num_stages=st)
                for bn, bk, st in ((64, 128, 4), (128, 128, 3), (64, 256, 3), (32, 256, 4), (64, 128, 6))]
    bm = 32 if m <= 32 else 64
    out = [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, SWAP=True, num_warps=4, num_stages=st)
           for bn, st in ((64, 4), (128, 3))]
    out.append(dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, SWAP=False, num_warps=4, num_stages=4))
    if m > 64:
        out += [dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, SWAP=False, num_warps=8, num_stages=3),
                dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, SWAP=False, num_warps=8, num_stages=3)]
    return out


def _compile_one(job: tuple[dict, int]) -> str:
    """(in a worker process) Compile one dense_gemm launch into Triton's on-disk cache: the row count is not
    specialized, so any M builds it; split 1 and split > 1 are two builds."""
    from kernels.dense_gemm import dense_gemm

    cfg, split = job
    x = torch.zeros(16, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.zeros(4096, 4096, device="cuda", dtype=torch.bfloat16)
    try:
        dense_gemm(x, w, dict(cfg, SPLIT_K=split))
        torch.cuda.synchronize()
        return ""
    except Exception as e:  # reported again by the timed process
        return f"{cfg} split {split}: {type(e).__name__}"


def precompile(ms_list, jobs: int = 8) -> None:
    """Compile every candidate in worker processes first (serially they take most of a minute)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    t0 = time.perf_counter()
    cfgs = {repr(c): c for m in ms_list if m <= TRITON_MAX_M for c in candidates(m)}
    work = [(c, split) for c in cfgs.values() for split in (1, 2)]
    try:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            errors = [e for e in pool.map(_compile_one, work) if e]
    except Exception as e:  # a broken pool: the timed process compiles what is left itself
        errors = [f"pool: {type(e).__name__}: {e}"]
    print(f"precompiled {len(work)} dense_gemm builds in {time.perf_counter() - t0:.0f} s"
          + (f"; errors: {errors[:3]}" if errors else ""), flush=True)


_FLUSH: dict[str, torch.Tensor] = {}


def bench_ms(fn, device, reps: int = 20) -> float:
    """Median device ms of fn over `reps` calls, L2 flushed before each (a step's weights arrive cold too).
    Fixed repetitions rather than do_bench's 'fill rep ms': a 10 us kernel would otherwise run ~1,500
    times, each behind a 256 MB flush."""
    if device.type != "cuda":
        fn()
        t = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t)
    flush = _FLUSH.setdefault("l2", torch.empty(128 << 20, dtype=torch.uint8, device=device))  # > the 60 MB L2
    fn()
    fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for a, b in zip(starts, ends):
        flush.zero_()
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize(device)
    return float(np.median([a.elapsed_time(b) for a, b in zip(starts, ends)]))


def layer_shapes(cfg: dict) -> dict[str, tuple[int, int]]:
    d, f, hq, hkv, hd = (cfg[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                          "num_key_value_heads", "head_dim"))
    return {"qkv": ((hq + 2 * hkv) * hd, d), "o": (d, hq * hd), "gate_up": (2 * f, d), "down": (d, f),
            "lm_head": (cfg["vocab_size"], d)}


def gemm_sweep(cfg, ceil, device, ms_list, dtype) -> tuple[list[dict], dict]:
    from kernels.dense_gemm import dense_gemm

    bw, mm = ceil["copy_GBps"] * 1e9, ceil["matmul_TFLOPs"] * 1e12
    rows, table = [], {}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\n{'gemm':<8}{'M':>5}{'ceil ms':>9}{'cuBLAS':>9}{'cuBLASLt':>9}{'x@wT':>9}{'best tri':>9}{'best':>11}"
          f"{'of ceil':>8}  best dense_gemm config")
    for label, (n, k) in layer_shapes(cfg).items():
        g = torch.Generator(device=device).manual_seed(n + k)
        w = (torch.randn(n, k, device=device, generator=g) / k ** 0.5).to(dtype)
        wt = w.t().contiguous()  # the weight stored K-major: cuBLAS sees another transpose case, picks otherwise
        entry = []
        for m in ms_list:
            if label == "lm_head" and m > TRITON_MAX_M:
                continue
            x = torch.randn(m, k, device=device, generator=g).to(dtype)
            ceil_ms = 1e3 * max(n * k * 2 / bw, 2 * m * n * k / mm) if device.type == "cuda" else float("nan")
            ref = F.linear(x, w)
            t_blas = bench_ms(lambda: F.linear(x, w), device)
            t_lt = float("nan")
            if device.type == "cuda":
                blas = torch.backends.cuda.preferred_blas_library()
                try:
                    torch.backends.cuda.preferred_blas_library("cublaslt")
                    y = F.linear(x, w)
                    ok = bool(torch.allclose(y.float(), ref.float(), atol=2e-2, rtol=2e-2))
                    t_lt = bench_ms(lambda: F.linear(x, w), device) if ok else float("nan")
                finally:
                    torch.backends.cuda.preferred_blas_library(blas)
            t_wt = bench_ms(lambda: torch.mm(x, wt), device)
            if not torch.allclose(torch.mm(x, wt).float(), ref.float(), atol=2e-2, rtol=2e-2):
                t_wt = float("nan")
            best_t, best_cfg, bad = float("inf"), None, 0
            if m <= TRITON_MAX_M:
                for c in candidates(m):
                    try:
                        y = dense_gemm(x, w, c)
                    except Exception as e:  # a launch the compiler refuses (shared memory): skipped, said
                        print(f"  {label} M={m} {c}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                        continue
                    err = (y.float() - ref.float()).abs().max().item()
                    scale = ref.float().abs().max().item()
                    if not err <= 1e-2 * scale + 1e-3:
                        bad += 1
                        print(f"  {label} M={m} {c}: WRONG, max |diff| {err:.3g} vs max |y| {scale:.3g}", flush=True)
                        continue
                    t = bench_ms(lambda c=c: dense_gemm(x, w, c), device)
                    if t < best_t:
                        best_t, best_cfg = t, c
            best = min(("cublas", t_blas), ("cublaslt", t_lt), ("cublas_wT", t_wt), ("dense_gemm", best_t),
                       key=lambda kv: kv[1] if kv[1] == kv[1] else float("inf"))
            row = {"gemm": label, "N": n, "K": k, "M": m, "ceil_ms": ceil_ms, "cublas_ms": t_blas, "cublaslt_ms": t_lt, "cublas_wT_ms": t_wt,
                   "dense_gemm_ms": best_t if best_cfg else None, "dense_gemm_config": best_cfg, "winner": best[0],
                   "wrong_configs": bad}
            rows.append(row)
            frac = ceil_ms / best[1] if best[1] else float("nan")
            print(f"{label:<8}{m:>5}{ceil_ms:>9.4f}{t_blas:>9.4f}{t_lt:>9.4f}{t_wt:>9.4f}"
                  f"{(best_t if best_cfg else float('nan')):>9.4f}{best[0]:>11}{frac:>8.0%}  {best_cfg or ''}", flush=True)
            # Table: cuBLASLt or dense_gemm, whichever is faster, where it beats cuBLAS by more than 3% (noise).
            alt = min((t_lt, "cublaslt"), (best_t if best_cfg else float("inf"), "dense_gemm"),
                      key=lambda tc: tc[0] if tc[0] == tc[0] else float("inf"))
            choice = None if not alt[0] < 0.97 * t_blas else "cublaslt" if alt[1] == "cublaslt" else best_cfg
            entry.append((m, choice))
        table[(name, n, k)] = merge_entry(entry)
        del w, wt
    return rows, table


def merge_entry(entry: list[tuple[int, dict | None]]) -> tuple:
    """[(m, choice)] per timed row count -> dense_dispatch entry: each choice covers the row counts up to its
    own (a row count between two timed ones takes the larger one's choice); trailing cuBLAS dropped."""
    out: list[tuple[int, dict | None]] = []
    for m, c in entry:
        if out and out[-1][1] == c:
            out[-1] = (m, c)
        else:
            out.append((m, c))
    while out and out[-1][1] is None:
        out.pop()
    return tuple(out)


# --- decode attention at the chat's shapes ------------------------------------------------------------------
ATTN_SHAPES = ((1, 1200), (16, 1200), (32, 1000), (48, 900), (96, 650), (256, 400))
"""(sequences, longest context; contexts spread over [ctx/2, ctx]) of the chat run's decode steps."""


def attention_sweep(cfg, ceil, max_model_len: int = 2064) -> list[dict]:
    """The paged decode kernel's KV read rate at the chat's shapes: the split count a decode graph captures
    (chosen for max_model_len) against other split counts, and a few tile configs; each checked first."""
    from bench.decode_sweep import make
    from kernels.paged_decode import _decode_config, choose_num_splits, num_sms, paged_decode, paged_decode_ref

    hq, hkv, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    copy = ceil["copy_GBps"] / 1e3
    default = _decode_config(d, torch.bfloat16)
    others = [dict(TILE_N=32, num_warps=4, num_stages=2), dict(TILE_N=128, num_warps=4, num_stages=2),
              dict(TILE_N=64, num_warps=8, num_stages=2), dict(TILE_N=64, num_warps=4, num_stages=3)]
    rows = []
    print(f"\ndecode attention (copy {copy:.2f} TB/s): seqs x ctx, graph's split, TB/s per (config, split)")
    for b, ctx in ATTN_SHAPES:
        q, kv, tables, lens = make(b, ctx, hq, hkv, d)
        scale = d ** -0.5
        ref = paged_decode_ref(q.float(), kv.float(), tables, lens, scale)
        kv_bytes = int(lens.sum()) * hkv * d * 2 * 2
        graph_split = choose_num_splits(b, hkv, max_model_len, num_sms(q.device))
        trials = [(default, s) for s in sorted({1, 2, 4, 8, graph_split}) if s == 1 or b * hkv < 512]
        if b in (48, 96):  # tile configs at split 1 (each split count is its own build: kept few)
            trials += [(c, 1) for c in others]
        res = []
        for c, split in trials:
            try:
                run = lambda c=c, split=split: paged_decode(q, kv, tables, lens, scale, max_seq_len=max_model_len,  # noqa: E731
                                                            num_splits=split, config=c)
                err = ((run().float() - ref).abs().max() / ref.abs().max()).item()
                if err > 2e-2:
                    print(f"  {b} x {ctx} {c} split {split}: WRONG (err {err:.2g})")
                    continue
                ms = bench_ms(run, q.device)
                res.append(dict(c, split=split, ms=ms, TBps=kv_bytes / ms / 1e9))
            except Exception as e:  # a config that does not compile is reported, not fatal
                print(f"  {b} x {ctx} {c} split {split}: {type(e).__name__} {str(e)[:100]}")
        now = next((r for r in res if r["split"] == graph_split and all(r[k] == default[k] for k in default)), None)
        best = max(res, key=lambda r: r["TBps"])
        print(f"  {b:>4} x {ctx:<5} graph split {graph_split}: {now['TBps'] if now else float('nan'):.2f} TB/s "
              f"({(now['TBps'] if now else 0) / copy:.0%} of copy, {now['ms'] if now else float('nan'):.3f} ms); best "
              f"{best['TBps']:.2f} ({best['TBps'] / copy:.0%}, {best['ms']:.3f} ms) TILE_N={best['TILE_N']} "
              f"w{best['num_warps']} s{best['num_stages']} split {best['split']}", flush=True)
        rows.append({"seqs": b, "ctx": ctx, "graph_split": graph_split, "now": now, "best": best, "all": res})
        del q, kv, tables, lens, ref
    return rows


# --- engine steps -----------------------------------------------------------------------------------------
def step_lens(kind: str, a: int, b: int) -> list[tuple[int, int]]:
    if kind == "decode":  # a sequences, contexts spread over [b/2, b] (the workload's are not all equal)
        return [(1, int(c)) for c in np.linspace(b // 2, b, a).round()] if a > 1 else [(1, b)]
    return [(1, 600)] * a + [(b, b)]  # a decodes at 600, one fresh prompt chunk of b tokens


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def device_ms(runner, inputs, iters: int) -> float:
    """Device time of one step (graphed if the runner has graphs): launches queued behind a GPU sleep, so the
    host's launch time is hidden; median of iters."""
    dev = runner.device
    for _ in range(2):
        runner.execute(inputs)
    if dev.type != "cuda":
        t = time.perf_counter()
        runner.execute(inputs)
        return 1e3 * (time.perf_counter() - t)
    out = []
    for _ in range(iters):
        torch.cuda.synchronize(dev)
        torch.cuda._sleep(20_000_000)
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        runner.execute(inputs)
        e1.record()
        e1.synchronize()
        out.append(e0.elapsed_time(e1))
    return float(np.median(out))


def step_ceiling_ms(cfg, lens, ceil) -> float:
    W, P, kv_tok = model_bytes_and_flops(cfg)
    bw, mm = ceil["copy_GBps"] * 1e9, ceil["matmul_TFLOPs"] * 1e12
    tokens = sum(n for n, _ in lens)
    kv = sum(c for _, c in lens) * kv_tok
    L, hq, hd = cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["head_dim"]
    flops = 2 * (P - cfg["vocab_size"] * cfg["hidden_size"]) * tokens + 2 * cfg["vocab_size"] * cfg["hidden_size"] * len(lens)
    flops += sum(4 * L * hq * hd * n * c for n, c in lens)  # QK^T and PV of the new tokens
    return 1e3 * max((W + kv) / bw, flops / mm) if bw == bw else float("nan")


def time_steps(runner, cfg, ceil, iters, label, steps, eager: bool = True) -> list[dict]:
    """Device ms of each (kind, a, b) step from its graph and (if eager) launched op by op."""
    rows = []
    print(f"\n{label}: {'kind':<7}{'seqs':>6}{'ctx/chunk':>10}{'tokens':>7}{'ceil ms':>9}{'graph ms':>9}{'eager ms':>9}"
          f"{'of ceil':>8}")
    for kind, a, b in steps:
        lens = step_lens(kind, a, b)
        inputs = make_step(runner, lens, a * 7 + b)
        graphs = runner.graphs
        t_graph = device_ms(runner, inputs, iters) if graphs is not None else float("nan")
        t_eager = float("nan")
        if eager or graphs is None:
            runner.graphs = None
            try:
                t_eager = device_ms(runner, inputs, iters)
            finally:
                runner.graphs = graphs
        c = step_ceiling_ms(cfg, lens, ceil)
        best = min(t for t in (t_graph, t_eager) if t == t)
        rows.append({"kind": kind, "a": a, "b": b, "tokens": sum(n for n, _ in lens), "ceil_ms": c,
                     "graph_ms": t_graph, "eager_ms": t_eager, "ms": best})
        print(f"{'':<{len(label) + 2}}{kind:<7}{a:>6}{b:>10}{sum(n for n, _ in lens):>7}{c:>9.2f}{t_graph:>9.2f}"
              f"{t_eager:>9.2f}{c / best:>8.0%}", flush=True)
    return rows


def profile_steps(runner, steps, cfg, ceil) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    out = []
    graphs, runner.graphs = runner.graphs, None
    try:
        for kind, a, b in steps:
            lens = step_lens(kind, a, b)
            inputs = make_step(runner, lens, a + b)
            runner.execute(inputs)
            sync(runner.device)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    runner.execute(inputs)
                sync(runner.device)
            rows = []
            for ev in prof.key_averages():
                t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
                if t and ev.count and not ev.key.startswith(("cudaLaunch", "cudaMemcpy", "Memcpy", "Memset")):
                    rows.append({"kernel": ev.key, "ms": t / 1e3 / 3, "calls": ev.count / 3, "group": group_of(ev.key)})
            rows.sort(key=lambda r: -r["ms"])
            total = sum(r["ms"] for r in rows)
            groups = {g: sum(r["ms"] for r in rows if r["group"] == g) for g in ("gemm", "attention", "other")}
            W, _, kv_tok = model_bytes_and_flops(cfg)
            bw = ceil["copy_GBps"] * 1e9
            kv_ms = 1e3 * sum(c for _, c in lens) * kv_tok / bw
            print(f"\nprofile {kind} {a} x {b}: {total:.2f} ms device, " + ", ".join(f"{g} {v:.2f}" for g, v in groups.items())
                  + f"; at the copy rate: weights {1e3 * W / bw:.2f} ms, KV {kv_ms:.2f} ms")
            for r in rows[:12]:
                print(f"  {r['ms']:>8.3f} ms {r['calls']:>5.0f}x  {r['group']:<9} {r['kernel'][:100]}")
            out.append({"kind": kind, "a": a, "b": b, "total_ms": total, "groups_ms": groups, "kernels": rows[:25]})
    finally:
        runner.graphs = graphs
    return out


def engine_part(args, ceil, table) -> dict:
    from folio import LLM
    from services.engine.model.layers import dense_dispatch

    cfg = SHAPES[args.shape]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        llm = LLM(str(write_config(args.shape, Path(tmp))), load_format="dummy", dtype=args.dtype, device=args.device,
                  max_model_len=2064, max_num_seqs=256, enable_prefix_caching=False, async_scheduling=False,
                  max_mixed_graph_tokens=1024 if not args.quick else 64)
        print(f"\nengine up in {time.perf_counter() - t0:.1f} s", flush=True)
    runner = llm.engine.runner
    builtin = dict(dense_dispatch.TABLE)  # the engine's own table: off for the cuBLAS baseline, back at the end
    dense_dispatch.TABLE.clear()
    try:
        return engine_phases(llm, args, cfg, ceil, table)
    finally:
        dense_dispatch.TABLE.clear()
        dense_dispatch.TABLE.update(builtin)


def engine_phases(llm, args, cfg, ceil, table) -> dict:
    from kernels import pdl
    from services.engine.model.layers import dense_dispatch

    runner = llm.engine.runner
    if runner.graphs is not None:
        recapture(llm, args)  # the graphs captured at start hold the engine's own table
    all_steps = [("decode", a, b) for a, b in DECODE_STEPS] + [("mixed", a, b) for a, b in MIXED_STEPS]
    res = {"phases": {"cuBLAS": time_steps(runner, cfg, ceil, args.iters, "cuBLAS", all_steps)}}
    if args.device.startswith("cuda"):
        res["profile"] = profile_steps(runner, PROFILE_STEPS, cfg, ceil)
    if not any(table.values()):
        print("\nno dense_gemm winner: nothing to install")
    else:
        res["logit_checks"] = logit_checks(runner, table)
    # Each phase re-records the graphs so they hold its kernels; the steps the chat run spends most time in.
    sub = [s for s in all_steps if (s[0], s[1]) in {("decode", 1), ("decode", 16), ("decode", 48), ("decode", 96),
                                                    ("decode", 256), ("mixed", 250), ("mixed", 128)}] or all_steps
    # The cuBLAS phase ran with PDL as the engine has it (kernels/pdl.py); the others flip it and/or add the table.
    pdl_default = pdl.ENABLED
    flip = "PDL off" if pdl_default else "PDL on"
    phases = [("table", True, pdl_default), (flip, False, not pdl_default), (f"table, {flip}", True, not pdl_default)]
    if not any(table.values()):
        phases = phases[1:2]
    for label, use_table, use_pdl in phases:
        dense_dispatch.TABLE.update(table if use_table else {})
        pdl.ENABLED = use_pdl
        try:
            recapture(llm, args)
            res["phases"][label] = time_steps(runner, cfg, ceil, args.iters, label, sub, eager=False)
        finally:
            dense_dispatch.TABLE.clear()
            pdl.ENABLED = pdl_default
    base = {(r["kind"], r["a"], r["b"]): r["ms"] for r in res["phases"]["cuBLAS"]}
    names = [p for p in res["phases"] if p != "cuBLAS"]
    print(f"\n{'step (graph ms)':<22}{'cuBLAS':>9}" + "".join(f"{n:>17}" for n in names))
    for kind, a, b in sub:
        key = (kind, a, b)
        cells = []
        for n in names:
            t = next(r["ms"] for r in res["phases"][n] if (r["kind"], r["a"], r["b"]) == key)
            cells.append(f"{t:>7.2f}{base[key] / t - 1:>+5.0%}")
        print(f"{kind + ' ' + str(a) + ' x ' + str(b):<22}{base[key]:>9.2f}" + "".join(f"{c:>17}" for c in cells))
    return res


def logit_checks(runner, table) -> list[dict]:
    """Logits with and without the table on a few eager steps: the numbers a greedy-token change would come from."""
    from services.engine.model.layers import dense_dispatch

    checks = []
    for kind, a, b in (("decode", 32, 700), ("decode", 128, 700), ("mixed", 64, 200)):
        inputs = make_step(runner, step_lens(kind, a, b), 99 + a)
        graphs, runner.graphs = runner.graphs, None
        try:
            base = runner.execute(inputs).float()
            dense_dispatch.TABLE.update(table)
            new = runner.execute(inputs).float()
        finally:
            dense_dispatch.TABLE.clear()
            runner.graphs = graphs
        agree = float((base.argmax(-1) == new.argmax(-1)).float().mean())
        checks.append({"step": f"{kind} {a}x{b}", "max_abs_logit_diff": float((base - new).abs().max()),
                       "argmax_agreement": agree})
        print(f"table vs cuBLAS logits, {kind} {a} x {b}: max |diff| {checks[-1]['max_abs_logit_diff']:.4f}, "
              f"argmax agreement {agree:.3f}", flush=True)
    return checks


def recapture(llm, args) -> None:
    runner, engine = llm.engine.runner, llm.engine
    if runner.graphs is None:
        return
    t0 = time.perf_counter()
    runner.graphs = None
    gc.collect()
    if runner.device.type == "cuda":
        torch.cuda.empty_cache()
    runner.capture_decode_graphs(256, engine.max_model_len)
    runner.capture_mixed_graphs(1024 if not args.quick else 64, 256, engine.max_model_len)
    print(f"graphs re-captured in {time.perf_counter() - t0:.1f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3-8b", choices=list(SHAPES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="few row counts and steps (smoke test on CPU)")
    ap.add_argument("--no-engine", action="store_true", help="the GEMM sweep only")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.quick:
        global DECODE_STEPS, MIXED_STEPS
        DECODE_STEPS, MIXED_STEPS = ((4, 40),), ((2, 20),)
    dev = torch.device(args.device)
    t0 = time.perf_counter()
    ceil = measure_ceilings(dev)
    print(f"device {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}: copy {ceil['copy_GBps']:.0f} GB/s, "
          f"bf16 matmul {ceil['matmul_TFLOPs']:.0f} TFLOP/s", flush=True)
    ms_list = (1, 16, 48) if args.quick else GEMM_MS
    if dev.type == "cuda":
        precompile(ms_list)
    rows, table = gemm_sweep(SHAPES[args.shape], ceil, dev, ms_list, getattr(torch, args.dtype))
    print("\ndense_dispatch.TABLE entries from this run's winners:")
    for key, entry in table.items():
        print(f"    {key!r}: {entry!r},")
    print(f"(gemm sweep took {time.perf_counter() - t0:.0f} s)", flush=True)
    rec = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "command": "python bench/chat_profile.py " + " ".join(sys.argv[1:]), "shape": args.shape, **ceil,
           "gemms": rows, "table": {repr(k): v for k, v in table.items()}}
    if dev.type == "cuda":
        rec["attention"] = attention_sweep(SHAPES[args.shape], ceil)
        print(f"(attention sweep done at {time.perf_counter() - t0:.0f} s)", flush=True)
    if not args.no_engine:
        rec["engine"] = engine_part(args, ceil, table)
    print(f"(total {time.perf_counter() - t0:.0f} s)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rec, indent=1, default=str))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
