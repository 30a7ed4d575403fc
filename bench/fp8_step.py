"""FP8's own launches in the prefill and decode steps (one H200, Llama-3-8B shape), checked on the GPU before they are
timed or used: SwiGLU + FP8 in one launch of whole rows per program (kernels/fp8_fused.py, ROW) against the split
launches at prefill's 8,192 rows (the winner applied to FP8_LAUNCH for the engines; committed ROW entries are always
checked), q/k/v's FP8 scales in the rotary + cache kernel, o_proj's input quantized by the decode attention kernel
(ATTENTION_QUANT; off); where the decode step's memsets come from and cuBLASLt's other algorithms (bench/fp8_memset.py).
Then the fixed workload (256 x 256 in / 256 out) for bf16 and FP8 in one run on the engine's
defaults, each engine watched (Watch: Triton compiles and the slowest steps inside the timed window), then while the
budget lasts the engines named after them ("fp8 before": session 7's final FP8 engine). A change whose check fails
is switched off for the engines and counted as a failure.

    python bench/fp8_step.py [--json PATH] [--budget 80] [--sections swiglu ...] [--engines bf16 fp8 "fp8 before"]
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import torch

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(BENCH))
sys.path.insert(0, BENCH)

import fp8_where as fw  # noqa: E402  (make_pool, throughput)
import quant as qb  # noqa: E402  (graph_ms, record, attempt, free_gpu)

from kernels import fp8_fused, fp8_quant  # noqa: E402
from kernels import paged_decode as pd  # noqa: E402
from kernels import rotary as rk  # noqa: E402
from services.engine.model.quantization import fp8 as fp8mod  # noqa: E402

DEV = qb.DEV
HQ, HKV, D, BLOCK = 32, 8, 128, 16
QKV = (6144, 4096)


def replayable(body):
    """body() captured into a CUDA graph (compiled first, outside the capture): the graph's replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        body()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    return graph.replay


def same(a, b) -> bool:
    return a.shape == b.shape and torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
                                              b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b)


def rotary_section(failures: list, ms=(256, 512)) -> dict:
    """rotary_and_cache with q/k/v's scales against FP8Output.dense() then the unscaled kernel (bits of qkv and
    cache), then µs per layer: the kernel unscaled / scaled, and the q/k/v GEMM row-wise / tensor-wise."""
    g = torch.Generator(device=DEV).manual_seed(3)
    out, rows = {"checks": []}, []
    for m in ms:
        w = (torch.randn(QKV[0], QKV[1], generator=g, device=DEV) * 0.02).to(torch.float8_e4m3fn)
        wcol = torch.rand(1, QKV[0], generator=g, device=DEV) * 1e-3 + 1e-4
        xq = (torch.randn(m, QKV[1], generator=g, device=DEV) * 50).to(torch.float8_e4m3fn)
        xs = torch.rand(m, 1, generator=g, device=DEV) * 0.02 + 1e-3
        unit = torch.ones((), device=DEV)
        raw = torch._scaled_mm(xq, w.t(), scale_a=unit, scale_b=unit, out_dtype=torch.bfloat16)
        ang = torch.rand(m, D // 2, generator=g, device=DEV) * 6
        cos, sin = ang.cos(), ang.sin()
        nblk = m // BLOCK + 4
        slots = torch.randperm(nblk * BLOCK, generator=g, device=DEV)[:m]
        cache0 = torch.zeros(2, nblk, BLOCK, HKV, D, device=DEV, dtype=torch.bfloat16)
        dense = fp8mod.FP8Output(raw, xs, wcol).dense()
        want, want_cache = dense.clone(), cache0.clone()
        rk.rotary_and_cache(*want.split([HQ * D, HKV * D, HKV * D], -1), cos, sin, want_cache, slots, D)
        got, got_cache = raw.clone(), cache0.clone()
        res = qb.attempt(lambda: rk.rotary_and_cache(*got.split([HQ * D, HKV * D, HKV * D], -1), cos, sin, got_cache,
                                                      slots, D, scales=(xs, wcol)))
        ok = res is True and same(got, want) and same(got_cache, want_cache)
        qb.record(out["checks"], failures, ok, check="rotary_and_cache_scaled_bits", M=m)
        rowwise = lambda: torch._scaled_mm(xq, w.t(), scale_a=xs, scale_b=wcol, out_dtype=torch.bfloat16)  # noqa
        ok2 = (rowwise().float() - dense.float()).abs().max().item() <= 0.02 * dense.float().abs().max().item()
        qb.record(out["checks"], failures, ok2, check="tensorwise_then_scaled_vs_rowwise", M=m)
        t = {"rotary_cache": qb.graph_ms([lambda: rk.rotary_and_cache(*raw.split([HQ * D, HKV * D, HKV * D], -1),
                                                                         cos, sin, cache0, slots, D)] * 16),
             "rotary_cache scaled": qb.graph_ms([lambda: rk.rotary_and_cache(
                 *raw.split([HQ * D, HKV * D, HKV * D], -1), cos, sin, cache0, slots, D, scales=(xs, wcol))] * 16),
             "qkv row-wise": qb.graph_ms([rowwise] * 16),
             "qkv tensor-wise": qb.graph_ms([lambda: torch._scaled_mm(xq, w.t(), scale_a=unit, scale_b=unit,
                                                                      out_dtype=torch.bfloat16)] * 16)}
        t["saved"] = t["qkv row-wise"] + t["rotary_cache"] - t["qkv tensor-wise"] - t["rotary_cache scaled"]
        rows.append(dict(M=m, ok=ok, **t))
        print(f"qkv M={m:<4} bits {'ok' if ok else 'DIFFER'}  " + "  ".join(f"{k} {v * 1e3:.1f}us" for k, v in t.items()),
              flush=True)
    out["ms"] = rows
    if not all(r["ok"] for r in out["checks"]):
        fp8mod.DEFER_MAX_M[QKV] = 0
        print("q/k/v deferral OFF for the engines (a check failed)", flush=True)
    return out


def attention_section(failures: list, batch: int = 256, ctx: int = 384) -> dict:
    """paged_decode(fp8_out=True) at 256 sequences x ~384 tokens over a bf16 and an fp8 pool: in one CUDA graph of
    8 launches replayed 10 times, every replay's FP8 rows and scales against quantize_fp8_rows of that replay's
    output (a missed arrival or stale read would differ); then µs per layer: attention alone, attention + the
    quantizing launch, attention quantizing."""
    out, rows = {"checks": []}, []
    q, kv16, tables, lens = fw.make_pool(batch, ctx)
    kv8 = fw.quantize_kv_fp8(kv16.float(), 0.05, 0.04)
    longest = int(lens.max())
    for pool, kv, ks, vs in (("bf16", kv16, 1.0, 1.0), ("fp8", kv8, 0.05, 0.04)):
        qs = [q * (1 + 0.1 * i) for i in range(8)]
        outs = [torch.empty_like(q) for _ in range(8)]
        got = [None] * 8

        def fused(i):
            got[i] = pd.paged_decode(qs[i], kv, tables, lens, D ** -0.5, max_seq_len=longest, num_splits=1,
                                     out=outs[i], k_scale=ks, v_scale=vs, fp8_out=True)

        ok, err = True, None
        try:
            replay = replayable(lambda: [fused(i) for i in range(8)])
            for rep in range(10):
                for i in range(8):
                    qs[i].mul_(1.01)
                replay()
                for i in range(8):
                    wq, ws = fp8_quant.quantize_fp8_rows(outs[i].reshape(batch, -1))
                    ok &= same(got[i][1], wq) and same(got[i][2], ws)
            ref = pd.paged_decode_ref(qs[7].float(), kv, tables, lens, D ** -0.5, ks, vs)
            ok &= ((outs[7].float() - ref).abs().max() / ref.abs().max()).item() < 2e-2
            ok &= not bool(fp8_quant.arrival_counts(DEV, batch).any())
            del replay
        except Exception as e:  # a kernel that does not compile is a failed check
            ok, err = False, repr(e)[:300]
        qb.record(out["checks"], failures, ok, check="decode_fp8_out_bits", pool=pool, error=err)
        if not ok:
            print(f"decode fp8_out {pool}: check FAILED {err or ''}", flush=True)
            continue
        run = lambda i=0: pd.paged_decode(qs[i], kv, tables, lens, D ** -0.5, max_seq_len=longest,  # noqa: E731
                                          num_splits=1, out=outs[i], k_scale=ks, v_scale=vs)
        t = {"attention": qb.graph_ms([lambda i=i: run(i) for i in range(8)]),
             "attention + quantize": qb.graph_ms([lambda i=i: fp8_quant.quantize_fp8_rows(run(i).reshape(batch, -1))
                                                  for i in range(8)]),
             "attention quantizing": qb.graph_ms([lambda i=i: fused(i) for i in range(8)])}
        t["saved"] = t["attention + quantize"] - t["attention quantizing"]
        rows.append(dict(pool=pool, **t))
        print(f"decode b{batch} ctx{ctx} {pool:<4} bits ok  " + "  ".join(f"{k} {v * 1e3:.1f}us" for k, v in t.items()),
              flush=True)
    out["ms"] = rows
    if not all(r["ok"] for r in out["checks"]):
        fp8mod.ATTENTION_QUANT = False
        print("attention quantizing OFF for the engines (a check failed)", flush=True)
    del q, kv16, kv8
    return out


SPLIT_LAUNCH = [(64, {"ROWS": 1, "BLOCK": 1024, "num_warps": 4}), (1 << 30, {"ROWS": 4, "BLOCK": 512, "num_warps": 4})]
"""The split launches of session 7 (kernels/fp8_fused.py's table then): the sweep's baseline and the "fp8 before"
engine's table."""


def split_for(m: int) -> dict:
    return dict(next(c for most, c in SPLIT_LAUNCH if m <= most))
ROW_CONFIGS = [dict(ROWS=r, num_warps=w, ROW=True) for r, w in ((1, 16), (1, 32))]
"""The one-launch SwiGLU + FP8 of whole rows per program (kernels/fp8_fused.py, ROW), swept above 4,096 rows (where
the column scales are applied it loses: session 8 round 1)."""
BUCKET_BOUND = {64: 64, 256: 256, 2048: 4096, 8192: 1 << 30}
"""A measured row count -> the FP8_LAUNCH bound its winner is entered under."""


def config_name(cfg: dict) -> str:
    if cfg.get("ROW"):
        return f"row {cfg['ROWS']} w{cfg.get('num_warps', 4)}"
    return f"split {cfg['ROWS']}x{cfg.get('BLOCK')} w{cfg.get('num_warps', 4)}"


def swiglu_section(failures: list, ms=(256, 8192), inter: int = 14336, configs=None, apply: bool = True) -> dict:
    """SwiGLU + FP8 in one launch of whole rows per program (kernels/fp8_fused.py, ROW) against the split launches, on
    gate_up as the engine hands it over (unscaled where it defers its scales; ROW is skipped there, where it loses):
    every config's bits against the split's and the software-rounding reference, then against the split again over
    10 replays of a CUDA graph of 8 calls; then µs per call. With `apply`, the fastest config that passed replaces
    FP8_LAUNCH's entry for its row count's bucket (BUCKET_BOUND) where it beats the split by 3%. `configs`:
    ROW_CONFIGS by default."""
    configs = ROW_CONFIGS if configs is None else configs
    from kernels import silu_mul as sm

    g = torch.Generator(device=DEV).manual_seed(9)
    out, rows = {"checks": []}, []
    jobs = []  # every launch compiled in parallel first
    for m in ms:
        x = torch.zeros(m, 2 * inter, device=DEV, dtype=torch.bfloat16)
        sc = (torch.ones(m, 1, device=DEV), torch.ones(1, 2 * inter, device=DEV)) \
            if m <= fp8mod.DEFER_MAX_M.get((2 * inter, 4096), m) else None
        base = split_for(m)
        jobs += [lambda x=x, sc=sc, c=c: fp8_fused.silu_mul_fp8(x, scales=sc, split=c, warmup=True)
                 for c in [base] + configs if not (c.get("ROW") and sc is not None)]
    qb.precompile(jobs)
    for m in ms:
        scaled = m <= fp8mod.DEFER_MAX_M.get((2 * inter, 4096), m)
        gus = [(torch.randn(m, 2 * inter, generator=g, device=DEV) * (40 if scaled else 0.4)).to(torch.bfloat16)
               for _ in range(8)]
        sc = (torch.rand(m, 1, generator=g, device=DEV) * 0.01,
              torch.rand(1, 2 * inter, generator=g, device=DEV) * 0.01) if scaled else None
        base = split_for(m)
        want = fp8_quant.quantize_fp8_rows(sm.silu_mul(gus[0], scales=sc), hw_cvt=False)
        t = {"split": qb.graph_ms([lambda x=x: fp8_fused.silu_mul_fp8(x, scales=sc, split=base)
                                               for x in gus])}
        best = None
        for cfg in configs:
            if cfg.get("ROW") and scaled:  # loses where the column scales are applied (round 1)
                continue
            got = qb.attempt(lambda: fp8_fused.silu_mul_fp8(gus[0], scales=sc, split=cfg))
            if isinstance(got, Exception):  # did not build or launch (resources): no values to judge, not applied
                out.setdefault("errors", []).append(dict(M=m, config=cfg, error=repr(got)[:300]))
                continue
            try:
                ok = same(got[0], want[0]) and same(got[1], want[1])
                res = [None] * 8

                def call(i, cfg=cfg, res=res):
                    res[i] = fp8_fused.silu_mul_fp8(gus[i], scales=sc, split=cfg)

                replay = replayable(lambda: [call(i) for i in range(8)])
                for rep in range(10):
                    for x in gus:
                        x.mul_(-1)
                    replay()
                    for i in (0, 3, 7):
                        ref = fp8_fused.silu_mul_fp8(gus[i], scales=sc, split=base)
                        ok &= same(res[i][0], ref[0]) and same(res[i][1], ref[1])
                del replay
            except Exception as e:
                ok = False
                print(f"swiglu M={m} {cfg}: {e!r}"[:300], flush=True)
            qb.record(out["checks"], failures, ok, check="swiglu_one_bits", M=m, config=cfg)
            if not ok:
                continue
            key = config_name(cfg)
            t[key] = qb.graph_ms([lambda x=x, cfg=cfg: fp8_fused.silu_mul_fp8(x, scales=sc, split=cfg) for x in gus])
            if best is None or t[key] < best[1]:
                best = (cfg, t[key])
        rows.append(dict(M=m, scaled=scaled, ms=t, best=best))
        print(f"swiglu_fp8 M={m:<5} " + "  ".join(f"{k} {v * 1e3:.1f}us" for k, v in t.items()), flush=True)
        bound = next(b for mm, b in sorted(BUCKET_BOUND.items()) if m <= mm)
        if apply:  # this bucket's winner (the split unless a config beats it by 3%)
            pick = best[0] if best and best[1] < t["split"] * 0.97 else base
            fp8_fused.FP8_LAUNCH[:] = sorted([e for e in fp8_fused.FP8_LAUNCH if e[0] != bound] + [(bound, pick)],
                                             key=lambda e: e[0])
        del gus
    out["ms"] = rows
    out["applied"] = list(fp8_fused.FP8_LAUNCH)
    print(f"FP8_LAUNCH for the engines: {fp8_fused.FP8_LAUNCH}", flush=True)
    return out


class Counting:
    """Counts, while engines build and capture, the decode launches that quantize and the scaled rotary launches."""

    def __init__(self):
        self.n = {"decode fp8_out in kernel": 0, "rotary_and_cache scaled": 0}
        self.launch, self.rotary = pd._launch, rk.rotary_and_cache

    def __enter__(self):
        def launch(*a, fused=None, **k):
            self.n["decode fp8_out in kernel"] += bool(fused)
            return self.launch(*a, fused=fused, **k)

        def rotary(*a, scales=None, **k):
            self.n["rotary_and_cache scaled"] += scales is not None
            return self.rotary(*a, scales=scales, **k)

        pd._launch, rk.rotary_and_cache = launch, rotary
        return self

    def __exit__(self, *exc):
        pd._launch, rk.rotary_and_cache = self.launch, self.rotary


class Watch:
    """While an engine serves the fixed workload: every Triton compile (kernel, constexprs, when, how long), every
    engine step (wall time, sequences, tokens) and the generate() calls' windows, so that what happened inside the
    timed window (the second generate: fw.throughput warms up first) can be told apart; with `profile`, a
    torch.profiler CUDA trace of the timed window (its per-kernel table)."""

    def __init__(self, profile: bool = False):
        self.compiles, self.steps, self.windows, self.profile, self.prof = [], [], [], profile, None

    def __enter__(self):
        import triton

        from folio import llm as folio_llm
        from services.engine import engine as eng

        self._knobs = triton.knobs.runtime
        self._hooks = (self._knobs.jit_cache_hook, self._knobs.jit_post_compile_hook)
        pending = {}

        def before(**kw):  # returns None: the compile goes ahead
            pending[id(kw.get("key"))] = time.perf_counter()

        def after(**kw):
            fn = kw.get("fn")
            consts = (kw.get("compile") or {}).get("constants") or {}
            t1 = time.perf_counter()
            self.compiles.append({"kernel": getattr(fn, "name", str(fn)), "end": t1,
                                  "seconds": t1 - pending.pop(id(kw.get("key")), t1),
                                  "constexprs": {str(k): v for k, v in consts.items()
                                                 if isinstance(v, (bool, int, float, str))}})

        self._knobs.jit_cache_hook, self._knobs.jit_post_compile_hook = before, after
        self._eng, self._step = eng.LLMEngine, eng.LLMEngine.step
        self._llm, self._gen = folio_llm.LLM, folio_llm.LLM.generate
        watch = self

        def step(engine, *a, **k):
            t0 = time.perf_counter()
            out = watch._step(engine, *a, **k)
            watch.steps.append((t0, time.perf_counter() - t0, *engine.step_batch))
            return out

        def generate(llm, *a, **k):
            timed = len(watch.windows) == 1 and watch.profile
            t0 = time.perf_counter()
            if timed:
                from torch.profiler import ProfilerActivity, profile
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    out = watch._gen(llm, *a, **k)
                    torch.cuda.synchronize()
                watch.prof = prof
            else:
                out = watch._gen(llm, *a, **k)
            watch.windows.append((t0, time.perf_counter()))
            return out

        eng.LLMEngine.step, folio_llm.LLM.generate = step, generate
        return self

    def __exit__(self, *exc):
        self._knobs.jit_cache_hook, self._knobs.jit_post_compile_hook = self._hooks
        self._eng.step, self._llm.generate = self._step, self._gen

    def report(self, label: str) -> dict:
        """Prints and returns what the timed window (the last generate) held: compiles, the slowest steps, the
        step time by kind, and (profiled) the kernels by device time."""
        if not self.windows:
            return {}
        a, b = self.windows[-1]
        inside = [c for c in self.compiles if a <= c["end"] <= b]
        steps = [st for st in self.steps if a <= st[0] <= b]
        decode = sorted(d for _, d, seqs, tok in steps if tok == seqs > 0)
        mixed = [d for _, d, seqs, tok in steps if tok != seqs]
        out = {"compiles_before": len(self.compiles) - len(inside), "compiles_in_window": inside,
               "steps": len(steps), "window_s": b - a, "mixed_steps_s": sum(mixed),
               "decode_step_median_ms": 1e3 * decode[len(decode) // 2] if decode else None,
               "slowest_steps": [dict(ms=1e3 * d, seqs=sq, tokens=tk) for _, d, sq, tk in
                                 sorted(steps, key=lambda st: -st[1])[:6]]}
        print(f"  {label}: {len(inside)} Triton compile(s) inside the timed window ({out['compiles_before']} before); "
              f"{len(steps)} steps, mixed {sum(mixed):.3f} s, decode median {out['decode_step_median_ms'] or 0:.2f} ms",
              flush=True)
        for c in inside:
            print(f"    compiled {c['kernel']} in {c['seconds']:.2f} s at +{c['end'] - a:.2f} s: "
                  f"{str(c['constexprs'])[:160]}", flush=True)
        print("    slowest steps: " + ", ".join(f"{r['ms']:.1f} ms ({r['seqs']} seqs, {r['tokens']} tok)"
                                               for r in out["slowest_steps"]), flush=True)
        if self.prof is not None:
            rows = fw.kernels_of(self.prof, 1)
            out["kernels_ms_per_run"] = rows[:25]
            print(f"    timed window, device ms by kernel (whole run): " + "; ".join(
                f"{r['kernel'][:48]} {r['ms']:.1f} ({r['calls']:.0f}x)" for r in rows[:14]), flush=True)
        return out


COMMITTED = {"launch": list(fp8_fused.FP8_LAUNCH)}
"""The FP8 launch tables as committed (before any section applies a winner): the "fp8 committed" engine's."""

ENGINES = {"bf16": dict(weights="bf16"), "fp8": dict(weights="fp8"),
           "fp8 committed": dict(weights="fp8", launch="committed"),
           "fp8 before": dict(weights="fp8", launch="split"),
           "fp8 no mixed graphs": dict(weights="fp8", engine_kw={"mixed_cuda_graphs": False}),
           "fp8 profiled": dict(weights="fp8", profile=True)}
"""label -> the engine: weights; `launch` (FP8_LAUNCH): as this run leaves it (default) or session 7's split
launches ("split") or as committed before this run's sections applied winners ("committed"); `engine_kw`: EngineConfig options; `profile`: a CUDA trace of the timed window (its post-processing counts in the
timed window: tok/s not comparable). "fp8 before" is session 7's final FP8 engine."""


def engines(start: float, budget: float, labels=("bf16", "fp8", "fp8 before"), **engine_kw) -> list[dict]:
    """The fixed workload on each engine of `labels` (ENGINES), in that order, each watched (Watch). The first two
    always run; later ones while the budget lasts. `engine_kw`: EngineConfig options for all (the target is judged
    on the engine's defaults)."""
    committed = list(fp8_fused.FP8_LAUNCH)
    tables = {"split": SPLIT_LAUNCH, "committed": COMMITTED["launch"]}
    rows, cost = [], 22.0
    for n, label in enumerate(labels):
        spec = ENGINES[label]
        if n >= 2 and time.time() - start + cost > budget:
            print(f"throughput {label}: skipped (time budget: {time.time() - start:.0f} s + ~{cost:.0f} s)", flush=True)
            continue
        fp8_fused.FP8_LAUNCH[:] = [(most, dict(c)) for most, c in tables.get(spec.get("launch"), committed)]
        t0 = time.time()
        with Counting() as c, Watch(spec.get("profile", False)) as w:
            got = qb.attempt(lambda: fw.throughput(label, spec["weights"], "auto",
                                                   **{**engine_kw, **spec.get("engine_kw", {})}))
        cost = time.time() - t0
        if isinstance(got, list):
            seen = qb.attempt(lambda: w.report(label))
            for r in got:
                r.update(c.n, launch=str(fp8_fused.FP8_LAUNCH),
                         watch=seen if isinstance(seen, dict) else repr(seen))
            rows += got
        else:
            rows.append({"engine": label, "error": repr(got)[:300]})
            print(f"throughput {label}: {got!r}"[:400], flush=True)
            qb.free_gpu()
    fp8_fused.FP8_LAUNCH[:] = committed
    base = next((r for r in rows if r["engine"] == "bf16" and "output_tok_s" in r), None)
    print("\nFixed workload, output tok/s (Llama-3-8B shape, random weights):")
    for r in rows:
        if base and "output_tok_s" in r:
            r["vs_bf16"] = r["output_tok_s"] / base["output_tok_s"]
            print(f"  {r['engine']:<12}{r['output_tok_s']:>9.0f} tok/s  {r['vs_bf16']:.3f}x bf16")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--budget", type=float, default=80.0, help="seconds; engines past it are skipped")
    ap.add_argument("--sections", nargs="+", default=["swiglu"],
                    choices=["memsets", "lt", "qkv", "attention", "swiglu", "none"],
                    help="checks and timings before the engines: memsets: where the FP8 decode step's device "
                         "memsets come from (bench/fp8_memset.py, with lt); lt: cuBLASLt's candidate algorithms for "
                         "the decode and prefill GEMMs, checked and timed against torch._scaled_mm's; q/k/v's scales in the rotary kernel; the decode "
                         "kernel quantizing (also whenever ATTENTION_QUANT is on); the one-launch SwiGLU sweep "
                         "(without it, FP8_LAUNCH's one-launch entries are checked)")
    ap.add_argument("--engines", nargs="+", default=["bf16", "fp8", "fp8 before"], choices=list(ENGINES),
                    help="engines in this order; the first two always run, later ones while the budget lasts")
    ap.add_argument("--no-mixed-graphs", action="store_true", help="mixed_cuda_graphs=False in every engine "
                    "(a shorter start-up; not the engine's defaults)")
    args = ap.parse_args()
    start = time.time()
    failures: list = []
    result: dict = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(DEV),
                    "torch": torch.__version__, "command": "python bench/fp8_step.py " + " ".join(sys.argv[1:])}
    if "memsets" in args.sections or "lt" in args.sections:
        import fp8_memset
        if "memsets" in args.sections:
            result["memsets"] = qb.attempt(fp8_memset.run)
            if isinstance(result["memsets"], Exception):
                print(f"memsets section: {result['memsets']!r}"[:400], flush=True)
        else:
            result["cublaslt"] = fp8_memset.lt_probe_in()
            fp8_memset.print_lt(result["cublaslt"])
        qb.free_gpu()
        print(f"memsets/lt sections done at {time.time() - start:.0f} s", flush=True)
    if "qkv" in args.sections:
        result["qkv"] = qb.attempt(lambda: rotary_section(failures, ms=(256,)))
        if isinstance(result["qkv"], Exception):
            failures.append({"check": "rotary_section", "error": repr(result["qkv"])[:300]})
            fp8mod.DEFER_MAX_M[QKV] = 0
    if "attention" in args.sections or fp8mod.ATTENTION_QUANT:
        result["attention"] = qb.attempt(lambda: attention_section(failures))
        if isinstance(result["attention"], Exception):
            failures.append({"check": "attention_section", "error": repr(result["attention"])[:300]})
            fp8mod.ATTENTION_QUANT = False
    committed = list(fp8_fused.FP8_LAUNCH)
    ones = [(most, c) for most, c in committed if c.get("ROW")]
    if "swiglu" in args.sections or ones:  # the sweep, or the committed one-launch entries checked
        sweep = "swiglu" in args.sections
        n = len(failures)
        result["swiglu"] = qb.attempt(lambda: swiglu_section(
            failures, ms=(8192,) if sweep else sorted({min(most, 8192) for most, _ in ones}),
            configs=None if sweep else [c for _, c in ones], apply=sweep))
        if isinstance(result["swiglu"], Exception) or len(failures) > n:
            if isinstance(result["swiglu"], Exception):
                failures.append({"check": "swiglu_section", "error": repr(result["swiglu"])[:300]})
            fp8_fused.FP8_LAUNCH[:] = [(most, dict(c)) for most, c in SPLIT_LAUNCH]
            print("one-launch SwiGLU OFF for the engines (a check failed): the split launches run", flush=True)
    print(f"checks done at {time.time() - start:.0f} s; engines run with DEFER_MAX_M[{QKV}] = "
          f"{fp8mod.DEFER_MAX_M.get(QKV)}, ATTENTION_QUANT = {fp8mod.ATTENTION_QUANT}, FP8_LAUNCH = "
          f"{fp8_fused.FP8_LAUNCH}", flush=True)
    qb.free_gpu()
    result["throughput"] = engines(start, args.budget, args.engines,
                                   **({"mixed_cuda_graphs": False} if args.no_mixed_graphs else {}))
    return fw.finish(result, failures, start, args.json or os.path.join(BENCH, "results",
                                                                         f"fp8_step_{result['date']}.json"))


if __name__ == "__main__":
    sys.exit(main())
