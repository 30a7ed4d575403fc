"""Where the Llama-3.2-1B shape's steps go at 256 and 1,024 sequences (issue 15's small-model targets), in one
GPU run of about a minute: a decode step as one CUDA graph against two half batches on two streams (attention of one
half overlapping the GEMMs of the other), the 1B's GEMMs at decode and prefill row counts against the matmul ceiling (cuBLAS and
cuBLASLt), the paged decode kernel's launch configs and KV splits at the fixed and `many` workloads' decode
shapes (each checked against the torch reference), and the engine's own steps kernel by kernel (eager, under
torch.profiler): a fresh 8,192-token prefill step, a mixed step of the `many` ramp, decode at 1,024 and 256
sequences; plus each eager step's host launch time against its device time, measured in isolation.

    python bench/small_profile.py --json bench/results/small_profile.json
    python bench/small_profile.py --sections gemm attn      # a subset
"""

from __future__ import annotations

import argparse
import datetime as dt
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
from bench.throughput import SHAPES, measure_ceilings, write_config  # noqa: E402

SHAPE = "llama-3.2-1b"


def weight_shapes(cfg: dict) -> dict[str, tuple[int, int]]:
    """name -> (N, K) of each projection of one layer, and the LM head."""
    d, f, hq, hkv, hd = (cfg[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                          "num_key_value_heads", "head_dim"))
    return {"qkv": ((hq + 2 * hkv) * hd, d), "o": (d, hq * hd), "gate_up": (2 * f, d), "down": (d, f),
            "lm_head": (cfg["vocab_size"], d)}


def section_gemm(ceil: dict) -> list[dict]:
    """F.linear at the decode (256, 1,024) and prefill (8,192) row counts, cuBLAS and cuBLASLt."""
    from triton.testing import do_bench

    rows = []
    shapes = weight_shapes(SHAPES[SHAPE])
    print(f"\nGEMMs of the 1B shape (ms; % of the {ceil['matmul_TFLOPs']:.0f} TFLOP/s ceiling; weight read GB/s)")
    print(f"{'gemm':<9}{'M':>6}{'N':>8}{'K':>6}{'cublas ms':>11}{'%':>5}{'GB/s':>7}{'cublasLt ms':>13}{'%':>5}")
    for m in (256, 1024, 8192):
        for name, (n, k) in shapes.items():
            if name == "lm_head" and m > 1024:
                continue
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
            res = {}
            for lib in ("cublas", "cublaslt"):
                torch.backends.cuda.preferred_blas_library(lib)
                res[lib] = do_bench(lambda: F.linear(x, w), warmup=5, rep=25)
            torch.backends.cuda.preferred_blas_library("cublas")
            flops = 2 * m * n * k
            pc = {lib: flops / ms / 1e9 / ceil["matmul_TFLOPs"] for lib, ms in res.items()}
            print(f"{name:<9}{m:>6}{n:>8}{k:>6}{res['cublas']:>11.4f}{pc['cublas']:>5.0%}"
                  f"{n * k * 2 / res['cublas'] / 1e6:>7.0f}{res['cublaslt']:>13.4f}{pc['cublaslt']:>5.0%}")
            rows.append(dict(gemm=name, M=m, N=n, K=k, cublas_ms=res["cublas"], cublaslt_ms=res["cublaslt"],
                             cublas_frac=pc["cublas"], cublaslt_frac=pc["cublaslt"]))
    return rows


ATTN_CONFIGS = [dict(TILE_N=t, num_warps=w, num_stages=s) for t, w, s in
                ((64, 4, 2), (64, 2, 4), (64, 4, 4), (64, 4, 3), (32, 4, 2), (32, 2, 2), (128, 4, 2))]
ATTN_CONFIGS += [dict(ATTN_CONFIGS[0], EVICTION="evict_first"), dict(ATTN_CONFIGS[0], HEADS_FASTEST=False)]
"""Launch configs of the paged decode kernel; the first is the default (kernels/paged_decode.py). The first two
are also run with the context split in 2 and 4."""


def section_attn(ceil: dict) -> list[dict]:
    """The decode kernel on the 1B's decode shapes (every sequence at the same context, as in the fixed and
    many workloads), over launch configs and KV split counts."""
    from triton.testing import do_bench

    from kernels.paged_decode import paged_decode, paged_decode_ref

    cfg = SHAPES[SHAPE]
    hq, hkv, d, bs = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"], 16
    copy = ceil["copy_GBps"]
    out_rows = []
    for batch, ctx in ((256, 384), (1024, 384)):
        g = torch.Generator(device="cuda").manual_seed(0)
        per = -(-ctx // bs)
        kv = torch.randn(2, batch * per, bs, hkv, d, device="cuda", dtype=torch.bfloat16, generator=g)
        tables = torch.randperm(batch * per, device="cuda", generator=g).to(torch.int32).view(batch, per)
        lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
        q = torch.randn(batch, hq, d, device="cuda", dtype=torch.bfloat16, generator=g)
        scale = d ** -0.5
        ref = paged_decode_ref(q[:64].float(), kv.float(), tables[:64], lens[:64], scale)
        kv_bytes = batch * ctx * hkv * d * 2 * 2
        res = []
        for c in ATTN_CONFIGS:
            for splits in (1, 2, 4):
                if splits > 1 and c not in ATTN_CONFIGS[:2]:
                    continue
                try:
                    run = lambda: paged_decode(q, kv, tables, lens, scale, max_seq_len=ctx,  # noqa: E731
                                               num_splits=splits, config=c)
                    err = ((run()[:64].float() - ref).abs().max() / ref.abs().max()).item()
                    ms = do_bench(run, warmup=5, rep=25)
                    res.append(dict(c, splits=splits, ms=ms, GBps=kv_bytes / ms / 1e6, err=err, ok=err < 2e-2))
                except Exception as e:  # a config that cannot compile is reported, not fatal
                    res.append(dict(c, splits=splits, ok=False, error=str(e)[:100]))
        good = sorted((r for r in res if r["ok"]), key=lambda r: r["ms"])
        print(f"\ndecode attention b{batch} ctx{ctx} ({kv_bytes / 1e9:.2f} GB of KV): "
              f"default {res[0].get('ms', float('nan')):.4f} ms = {res[0].get('GBps', 0) / copy:.0%} of copy; "
              f"{len(res) - len(good)} failed")
        for r in good[:8]:
            extra = "".join(f" {k}={r[k]}" for k in ("EVICTION", "HEADS_FASTEST") if k in r)
            print(f"   N{r['TILE_N']} w{r['num_warps']} s{r['num_stages']}{extra} splits {r['splits']}: {r['ms']:.4f} ms "
                  f"{r['GBps'] / copy:.0%} of copy (err {r['err']:.1e})")
        out_rows.append(dict(batch=batch, ctx=ctx, results=res))
    return out_rows


def decode_meta(b: int, ctx: int, device, block_size: int, first_block: int = 0):
    """A decode step of b sequences each at context ctx on distinct blocks: (ids, positions, metadata)."""
    from services.engine.attention.metadata import AttentionMetadata

    per = -(-ctx // block_size)
    width = -(-per // 16) * 16
    tables = torch.zeros(b, width, dtype=torch.int32)
    tables[:, :per] = first_block + torch.arange(b * per, dtype=torch.int32).view(b, per)
    pos = torch.full((b,), ctx - 1, dtype=torch.long)
    slots = tables[:, (ctx - 1) // block_size].long() * block_size + (ctx - 1) % block_size
    meta = AttentionMetadata(
        num_seqs=b, num_tokens=b, query_start_loc=torch.arange(b + 1, dtype=torch.int32, device=device),
        seq_lens=torch.full((b,), ctx, dtype=torch.int32, device=device), block_tables=tables.to(device),
        slot_mapping=slots.to(device), max_query_len=1, max_seq_len=ctx, query_lens_cpu=[1] * b,
        seq_lens_cpu=[ctx] * b, captured=True)
    return torch.ones(b, dtype=torch.long, device=device), pos.to(device), meta


def make_llm(shape: str, max_model_len: int, max_num_seqs: int, device: str):
    """An eager, synchronous engine on random weights (kernels show by name; the graphs here are our own)."""
    from folio import LLM

    with tempfile.TemporaryDirectory() as tmp:
        return LLM(str(write_config(shape, Path(tmp))), load_format="dummy", dtype="bfloat16", device=device,
                   max_model_len=max_model_len, max_num_seqs=max_num_seqs, enforce_eager=True,
                   async_scheduling=False, enable_prefix_caching=False)


def section_overlap(llm) -> list[dict]:
    """A whole decode step (forward, final norm, LM head) as one CUDA graph, against the same step as two
    half batches on two streams in one graph (their kernels free to overlap: one half's attention reads KV
    while the other's GEMMs compute), the second half started freely or only once the first half has passed
    its first layer's attention ("lag attn") or its whole first layer ("lag layer"), so that the halves' attention
    kernels fall at different times; and with programmatic dependent launch (kernels/pdl.py) on the Triton
    kernels, one stream and two. Same rows, same weights; the logits are compared with the one graph's."""
    from triton.testing import do_bench

    from services.engine.attention.metadata import AttentionMetadata

    from kernels import pdl

    runner = llm.engine.runner
    model, kv, dev, bs = runner.model, runner.kv_caches, runner.device, runner.block_size
    layer0 = model.model.layers[0]
    attn0 = layer0.self_attn.attn
    # name -> (two streams, the module after which the second half starts, PDL launches of the Triton kernels)
    variants = {"free": (True, None, False), "lag attn": (True, attn0, False), "lag layer": (True, layer0, False),
                "one+pdl": (False, None, True), "lag attn+pdl": (True, attn0, True)}
    rows = []
    side = torch.cuda.Stream()
    print("\ndecode step (forward + LM head) as one graph vs two half batches on two streams, ms per step:")
    for b, ctx in ((256, 384), (512, 384), (1024, 384)):
        ids, pos, meta = decode_meta(b, ctx, dev, bs)

        def half(lo, hi):
            m = AttentionMetadata(
                num_seqs=hi - lo, num_tokens=hi - lo, query_start_loc=meta.query_start_loc[:hi - lo + 1],
                seq_lens=meta.seq_lens[lo:hi], block_tables=meta.block_tables[lo:hi],
                slot_mapping=meta.slot_mapping[lo:hi], max_query_len=1, max_seq_len=ctx,
                query_lens_cpu=[1] * (hi - lo), seq_lens_cpu=[ctx] * (hi - lo), captured=True)
            return lambda: model.logits(model.forward(ids[lo:hi], pos[lo:hi], kv, m), float32=False)

        one = half(0, b)
        cut = b // 2
        first, second = half(0, cut), half(cut, b)
        rec = dict(batch=b, ctx=ctx)
        with torch.inference_mode():
            one()
            torch.cuda.synchronize()
            g1 = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g1):
                out1 = one()
            g1.replay()
            rec["one_ms"] = do_bench(g1.replay, warmup=5, rep=40)
            line = f"   b{b} ctx{ctx}: one graph {rec['one_ms']:.3f}"
            for name, (streams, lag, use_pdl) in variants.items():
                pdl.ENABLED = use_pdl
                ev = torch.cuda.Event()
                armed = [False]

                def hook(mod, inp, out, ev=ev, armed=armed):
                    if armed[0]:
                        ev.record()
                        armed[0] = False

                handle = lag.register_forward_hook(hook) if lag is not None else None

                def two(lag=lag, ev=ev, armed=armed, streams=streams):
                    if not streams:
                        out = one()
                        return out[:cut], out[cut:]
                    main = torch.cuda.current_stream()
                    side.wait_stream(main)
                    armed[0] = True
                    a = first()
                    with torch.cuda.stream(side):
                        if lag is not None:
                            side.wait_event(ev)
                        c = second()
                    main.wait_stream(side)
                    return a, c

                try:
                    two()
                    torch.cuda.synchronize()
                    g2 = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g2):
                        out2 = two()
                    g1.replay()
                    g2.replay()
                    torch.cuda.synchronize()
                    diff = max((out1[:cut].float() - out2[0].float()).abs().max().item(),
                               (out1[cut:].float() - out2[1].float()).abs().max().item())
                    agree = ((out1[:cut].argmax(-1) == out2[0].argmax(-1)).float().mean().item()
                             + (out1[cut:].argmax(-1) == out2[1].argmax(-1)).float().mean().item()) / 2
                    ms = do_bench(g2.replay, warmup=5, rep=40)
                    rec[name] = dict(ms=ms, max_diff=diff, argmax_agree=agree)
                    line += f"; {name} {ms:.3f} ({rec['one_ms'] / ms:.2f}x, diff {diff:.2g}, argmax {agree:.0%})"
                    del g2, out2
                except Exception as e:  # reported, not fatal
                    rec[name] = dict(error=str(e)[:200])
                    line += f"; {name} failed: {str(e)[:120]}"
                if handle is not None:
                    handle.remove()
            pdl.ENABLED = False
            print(line, flush=True)
        rows.append(rec)
        del g1, out1
    return rows


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def profile_steps(engine, steps: int) -> dict:
    """Kernels of the next `steps` engine steps (synchronous), grouped, ms per step."""
    from torch.profiler import ProfilerActivity, profile

    cuda = engine.device.type == "cuda"
    _sync()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            engine.step()
        _sync()
    rows = []
    for ev in prof.key_averages():
        t = (getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)) if cuda else ev.self_cpu_time_total
        if t and ev.count and not ev.key.startswith(("cudaLaunch", "cudaMemcpy", "Memcpy", "Memset")):
            rows.append({"kernel": ev.key, "ms": t / 1e3 / steps, "calls": ev.count / steps, "group": group_of(ev.key)})
    rows.sort(key=lambda r: -r["ms"])
    groups = {g: sum(r["ms"] for r in rows if r["group"] == g) for g in ("gemm", "attention", "other")}
    return {"ms_per_step": sum(groups.values()), "groups": groups, "kernels": rows[:25]}


def print_profile(label: str, p: dict) -> None:
    print(f"\n{label}: {p['ms_per_step']:.3f} ms of kernels per step ("
          + ", ".join(f"{g} {v:.3f}" for g, v in p["groups"].items()) + ")", flush=True)
    for r in p["kernels"][:14]:
        print(f"{r['ms']:>9.4f}{r['calls']:>6.0f}  {r['group']:<10}{r['kernel'][:100]}")


def section_engine(llm, requests: int, prompt: int, decode_to: int) -> dict:
    """The engine (eager, synchronous) on `requests` prompts of `prompt` tokens, as the many workload runs
    them: the first (fresh prefill) step and one step of the ramp (decodes and prefill chunks) profiled, every
    prefill step's host launch against its device time in isolation, then decode at all of them and at a
    quarter of them, `decode_to` steps in (the workloads' mean context)."""
    from folio import SamplingParams

    engine = llm.engine
    runner = engine.runner
    cuda = engine.device.type == "cuda"
    isolated = []
    execute = runner.execute

    def timed_execute(inputs):  # host launch and device time of a step's forward, nothing queued before it
        _sync()
        e0 = e1 = None
        if cuda:
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
        t0 = time.perf_counter()
        logits = execute(inputs)
        t1 = time.perf_counter()
        if cuda:
            e1.record()
        _sync()
        isolated.append((inputs.meta.num_tokens, inputs.meta.num_seqs, 1e3 * (t1 - t0),
                         e0.elapsed_time(e1) if cuda else float("nan")))
        return logits

    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=0, max_tokens=decode_to + 32, ignore_eos=True)
    for i in range(requests):
        engine.add_request(f"r{i}", None, params, stream=False,
                           prompt_token_ids=rng.integers(3, engine.vocab_size, prompt).tolist())
    res = {"prefill": profile_steps(engine, 1)}
    print_profile(f"fresh prefill step ({engine.step_batch[1]} tokens, {engine.step_batch[0]} seqs)", res["prefill"])
    runner.execute = timed_execute
    for _ in range(15):
        engine.step()
    runner.execute = execute
    res["mixed"] = profile_steps(engine, 1)
    print_profile(f"mixed step of the ramp ({engine.step_batch[1]} tokens, {engine.step_batch[0]} seqs)", res["mixed"])
    runner.execute = timed_execute

    def prefilling() -> bool:
        return bool(engine.scheduler.waiting) or any(s.num_computed_tokens < s.num_prompt_tokens
                                                     for s in engine.scheduler.running)
    while prefilling():
        engine.step()
    for _ in range(3):
        engine.step()
    runner.execute = execute
    print("\neager steps in isolation (tokens t, seqs s: host launch ms / device ms):\n   "
          + "; ".join(f"{t}t {s}s: {h:.1f}/{d:.1f}" for t, s, h, d in isolated), flush=True)
    res["isolated"] = isolated[:]
    isolated.clear()
    while engine.scheduler.running[0].num_tokens < prompt + decode_to:
        engine.step()
    ctx = int(np.mean([s.num_tokens for s in engine.scheduler.running]))
    n = len(engine.scheduler.running)
    res["decode_all"] = profile_steps(engine, 3)
    print_profile(f"decode step at {n} seqs, context ~{ctx} (eager kernels)", res["decode_all"])
    for i in range(requests // 4, requests):
        engine.abort_request(f"r{i}")
    engine.step()
    res["decode_quarter"] = profile_steps(engine, 5)
    print_profile(f"decode step at {len(engine.scheduler.running)} seqs, context ~{ctx} (eager kernels)",
                  res["decode_quarter"])
    runner.execute = timed_execute
    for _ in range(3):
        engine.step()
    runner.execute = execute
    print("eager decode steps in isolation (host launch ms / device ms): "
          + "; ".join(f"{s}s: {h:.2f}/{d:.2f}" for t, s, h, d in isolated))
    res["isolated_decode_quarter"] = isolated[:]
    return res


GREEDY_CONFIGS = [dict(BLOCK=b, num_warps=w, programs=p) for b, w, p in
                  ((2048, 8, 512), (1024, 4, 512), (2048, 8, 1024), (4096, 8, 512), (1024, 8, 256), (2048, 4, 128))]
"""kernels/greedy.py launch configs swept by section_greedy; the first is its DEFAULT_CONFIG."""


def section_greedy(ceil: dict) -> list[dict]:
    """The one-pass greedy sampler on [n, 128,256] bf16 logits (the 1B's LM head output) over launch configs and
    vocabulary splits, each checked against torch (float64) first; the winner per n is printed."""
    from triton.testing import do_bench

    from kernels.greedy import greedy_sample, greedy_sample_ref, split_for

    vocab, rows, failed = SHAPES[SHAPE]["vocab_size"], [], 0
    print("\ngreedy sampling of [n, 128256] bf16 logits, ms (GB/s of logits read; split = parts per row)")
    for n in (1, 256, 1024):
        x = (3 * torch.randn(n, vocab, device="cuda")).to(torch.bfloat16)
        x[:, 7] = x.max(dim=1).values  # ties: the first index must win
        ref_t, ref_lp = greedy_sample_ref(x)
        line = []
        for i, cfg in enumerate(GREEDY_CONFIGS if n > 1 else GREEDY_CONFIGS[:1]):
            t, lp = greedy_sample(x, cfg)
            ok = torch.equal(t, ref_t) and torch.allclose(lp.double(), ref_lp, atol=1e-4, rtol=1e-4)
            failed += not ok
            ms = do_bench(lambda: greedy_sample(x, cfg), warmup=10, rep=50)
            rows.append(dict(n=n, config=cfg, split=split_for(n, cfg["programs"]), ms=ms, ok=ok))
            line.append(f"{'*' if i == 0 else ''}B{cfg['BLOCK']} w{cfg['num_warps']} p{cfg['programs']} "
                        f"(split {split_for(n, cfg['programs'])}) {ms:.4f} ({n * vocab * 2 / ms / 1e6:.0f}){'' if ok else ' WRONG'}")
        best = min((r for r in rows if r["n"] == n and r["ok"]), key=lambda r: r["ms"], default=None)
        ms_argmax = do_bench(lambda: x.argmax(dim=-1), warmup=10, rep=50)
        print(f"   n {n}: " + "; ".join(line) + f"; torch argmax alone {ms_argmax:.4f}")
        if best is not None:
            print(f"   n {n}: best {best['config']} {best['ms']:.4f} ms")
    print(f"greedy: {failed} configs gave a wrong token or logprob (* = the default)")
    return rows


def section_first_use(ceil: dict) -> dict:
    """What a served step pays the first time: a CUDA graph's first replay after capture (host ms; the graph
    of 200 small kernels, as a decode step's), with and without a replay at capture; and a cudaMalloc of a
    263 MB logits tensor (host ms, and whether it waits for the device: it is timed behind a 20 ms kernel)."""
    res = {}
    x = torch.zeros(4096, device="cuda")

    def body():
        y = x
        for _ in range(200):
            y = y * 1.0001 + 1
        return y

    for label in ("first replay", "after a warm replay"):
        body()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            body()
        torch.cuda.synchronize()
        if label != "first replay":
            g.replay()
            torch.cuda.synchronize()
        times = []
        for _ in range(3):
            t = time.perf_counter()
            g.replay()
            times.append(1e3 * (time.perf_counter() - t))
            torch.cuda.synchronize()
        res[label] = times
        print(f"graph of 200 kernels, {label}: host ms per replay call " + ", ".join(f"{v:.3f}" for v in times))
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    for label in ("alone", "behind a 20 ms kernel"):
        torch.cuda.empty_cache()
        if label != "alone":
            torch.cuda._sleep(int(20e-3 * 1.98e9))
        t = time.perf_counter()
        big = torch.empty(1024 * 128256 * 2, dtype=torch.uint8, device="cuda")
        ms = 1e3 * (time.perf_counter() - t)
        torch.cuda.synchronize()
        del big
        res[f"malloc {label}"] = ms
        print(f"cudaMalloc of 263 MB {label}: host {ms:.3f} ms")
    return res


def section_rotary_cache(ceil: dict) -> list[dict]:
    """The 1B's rotary + KV-cache write per layer at 256, 1,024 and 8,192 tokens (bf16, 32 q / 8 kv heads of 64,
    blocks of 16): the two kernels (rotary_qk_inplace, then reshape_and_cache) against the one
    (rotary_and_cache); both must leave the same bits in qkv and the cache."""
    from triton.testing import do_bench

    from kernels.reshape_and_cache import reshape_and_cache
    from kernels.rotary import rotary_and_cache, rotary_qk_inplace

    hq, hkv, d, bs = 32, 8, 64, 16
    rows = []
    print("\nrotary + cache write, one layer (ms): two kernels vs one")
    for t in (256, 1024, 8192):
        g = torch.Generator(device="cuda").manual_seed(t)
        qkv0 = torch.randn(t, (hq + 2 * hkv) * d, device="cuda", generator=g).to(torch.bfloat16)
        ang = torch.rand(t, d // 2, device="cuda", generator=g) * 6
        cos, sin = ang.cos(), ang.sin()
        blocks = t // bs + 8
        slots = torch.randperm(blocks * bs, device="cuda", generator=g)[:t]
        slots[::37] = -1
        out = {}
        for name in ("two", "one"):
            qkv = qkv0.clone()
            cache = torch.zeros(2, blocks, bs, hkv, d, device="cuda", dtype=torch.bfloat16)
            q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)

            def run(q=q, k=k, v=v, cache=cache, name=name):
                if name == "two":
                    rotary_qk_inplace(q, k, cos, sin, d)
                    reshape_and_cache(k.view(t, hkv, d), v.view(t, hkv, d), cache, slots)
                else:
                    assert rotary_and_cache(q, k, v, cos, sin, cache, slots, d)

            run()
            out[name] = (qkv.clone(), cache.clone())  # (the timing below writes the cache again)
            fresh = qkv0.clone()
            fq, fk, fv = fresh.split([hq * d, hkv * d, hkv * d], dim=-1)
            # (timed on a copy turned again and again: the work per call is the same)
            ms = do_bench(lambda: run(fq, fk, fv), warmup=10, rep=50)
            out[name + "_ms"] = ms
        same = torch.equal(out["two"][0], out["one"][0]) and torch.equal(out["two"][1], out["one"][1])
        rows.append(dict(tokens=t, two_ms=out["two_ms"], one_ms=out["one_ms"], same_bits=same))
        print(f"   {t} tokens: two kernels {out['two_ms']:.4f}, one {out['one_ms']:.4f} ({out['two_ms'] / out['one_ms']:.2f}x); "
              f"same bits in qkv and cache: {same}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", nargs="+", default=["engine", "attn", "gemm"],
                    choices=["overlap", "gemm", "attn", "engine", "greedy", "first_use", "rotary_cache"])
    ap.add_argument("--json", default=None)
    ap.add_argument("--smoke", action="store_true", help="the engine section only, tiny shape on CPU (a check of the script)")
    args = ap.parse_args()
    if args.smoke:
        print(section_engine(make_llm("tiny", 24 + 8 + 64, 16, "cpu"), 16, 24, 8)["decode_all"]["groups"])
        return
    t0 = time.perf_counter()
    if set(args.sections) & {"gemm", "attn"}:  # the sections that report against the ceilings
        ceil = measure_ceilings(torch.device("cuda"))
        print(f"device {torch.cuda.get_device_name()}: copy {ceil['copy_GBps']:.0f} GB/s, "
              f"bf16 matmul {ceil['matmul_TFLOPs']:.0f} TFLOP/s", flush=True)
    else:
        ceil = {}
    rec = {"device": torch.cuda.get_device_name(), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "command": "python bench/small_profile.py " + " ".join(sys.argv[1:]), **ceil}
    llm = None
    for name in args.sections:
        t = time.perf_counter()
        if name in ("overlap", "engine") and llm is None:
            llm = make_llm(SHAPE, 256 + 128 + 64, 1024, "cuda")
        if name == "overlap":
            rec[name] = section_overlap(llm)
        elif name == "engine":
            rec[name] = section_engine(llm, 1024, 256, 128)
        else:
            rec[name] = {"gemm": section_gemm, "attn": section_attn, "greedy": section_greedy,
                         "first_use": section_first_use, "rotary_cache": section_rotary_cache}[name](ceil)
        print(f"[{name}: {time.perf_counter() - t:.1f} s]", flush=True)
    print(f"[total {time.perf_counter() - t0:.1f} s]")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rec, indent=1, default=str))


if __name__ == "__main__":
    main()
