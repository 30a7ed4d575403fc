"""Paged-attention kernel benchmark on one GPU, against the machine's own ceilings.

    python bench/kernels.py [--sweep none|decode|prefill|all] [--variants] [--json bench/results/kernels_<date>.json]

Measures in one run: device-to-device copy bandwidth (bytes read + written), the bf16 8192^3 matmul
rate, paged decode (batch 64, 32 q / 8 kv heads, d 128, 2048 ctx, block 16, bf16) against copy
bandwidth and torch SDPA on the same K/V laid out contiguously, the split-KV path at long context
(batch 4, 32k), and causal prefill (8 x 2048) against the matmul rate. Every kernel is checked
against a reference before it is timed. --sweep also times alternative launch configs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from kernels.paged_decode import choose_num_splits, num_sms, paged_decode  # noqa: E402
from kernels.paged_prefill import paged_prefill  # noqa: E402
from kernels.paged_prefill_configs import BASE  # noqa: E402
from kernels.reshape_and_cache import reshape_and_cache  # noqa: E402

DEV = torch.device("cuda")


def bench(fn) -> float:
    """Median milliseconds."""
    return do_bench(fn, warmup=50, rep=300, return_mode="median")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    assert not a.isnan().any(), "NaN in output"
    return ((a - b).norm() / b.norm()).item()


def copy_bandwidth() -> float:
    n = 1 << 30  # 1 GiB each way
    x = torch.randint(0, 255, (n,), dtype=torch.uint8, device=DEV)
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    assert torch.equal(x, y)
    return 2 * n / ms / 1e9  # TB/s


def matmul_rate() -> float:
    n = 8192
    a = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    ms = bench(lambda: a @ b)
    return 2 * n**3 / ms / 1e9  # TFLOP/s


def paged_setup(batch, ctx, hq, hkv, d, block_size, dtype=torch.bfloat16, seed=0):
    """A paged cache with a random permutation of blocks, and the same K/V contiguous."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    nb_seq = triton.cdiv(ctx, block_size)
    num_blocks = batch * nb_seq
    kv_cache = torch.randn(2, num_blocks, block_size, hkv, d, device=DEV, dtype=dtype, generator=g)
    tables = torch.randperm(num_blocks, device=DEV, generator=g).to(torch.int32).view(batch, nb_seq)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=DEV)
    # Contiguous copies [batch, hkv, ctx, d] for SDPA.
    k = kv_cache[0][tables.long()].reshape(batch, nb_seq * block_size, hkv, d)[:, :ctx].transpose(1, 2).contiguous()
    v = kv_cache[1][tables.long()].reshape(batch, nb_seq * block_size, hkv, d)[:, :ctx].transpose(1, 2).contiguous()
    return kv_cache, tables, seq_lens, k, v


def bench_decode(rows, batch, ctx, hq, hkv, d, block_size, copy_bw, sweep, label):
    kv_cache, tables, seq_lens, k, v = paged_setup(batch, ctx, hq, hkv, d, block_size)
    q = torch.randn(batch, hq, d, device=DEV, dtype=torch.bfloat16)
    scale = d**-0.5
    kv_bytes = 2 * batch * ctx * hkv * d * 2
    sdpa = lambda: F.scaled_dot_product_attention(q[:, :, None], k, v, scale=scale, enable_gqa=True)  # noqa: E731
    ref = sdpa()[:, :, 0]
    auto = choose_num_splits(batch, hkv, ctx, num_sms(DEV))
    variants = [("default", dict(num_splits=None, config=None))]
    if sweep:
        variants.append(("default (again, for noise)", dict(num_splits=None, config=None)))
        for tile, warps, stages, order in [(64, 4, 3, False), (64, 2, 3, False), (64, 2, 3, True)]:
            variants.append((f"tile{tile} w{warps} s{stages} {'heads-fastest' if order else 'seqs-fastest'}",
                             dict(num_splits=auto, config=dict(TILE_N=tile, num_warps=warps, num_stages=stages,
                                                               HEADS_FASTEST=order))))
        for splits in sorted({max(1, auto // 2), auto * 2} - {auto}):
            variants.append((f"splits{splits}", dict(num_splits=splits, config=None)))
    best = None
    for name, kw in variants:
        try:
            fn = lambda: paged_decode(q, kv_cache, tables, seq_lens, scale, max_seq_len=ctx, **kw)  # noqa: E731
            err = rel_err(fn(), ref)
            assert err < 1e-2, f"{label} {name}: relative error {err}"
            ms = bench(fn)
        except Exception as e:  # a config that does not compile (shared memory) is reported, not fatal
            print(f"  {label} {name}: FAILED {type(e).__name__}: {str(e)[:200]}")
            continue
        tbs = kv_bytes / ms / 1e9
        print(f"  {label} {name}: {ms * 1e3:.1f} us  {tbs:.2f} TB/s  err {err:.1e}")
        if name == "default":
            rows[f"{label}_ms"], rows[f"{label}_TBps"], rows[f"{label}_err"] = ms, tbs, err
            rows[f"{label}_num_splits"] = auto
            rows[f"{label}_vs_copy"] = tbs / copy_bw
        if best is None or ms < best[1]:
            best = (name, ms)
    rows[f"{label}_best_variant"] = best[0]
    rows[f"{label}_best_TBps"] = kv_bytes / best[1] / 1e9
    ms = bench(sdpa)
    rows[f"{label}_sdpa_ms"], rows[f"{label}_sdpa_TBps"] = ms, kv_bytes / ms / 1e9
    print(f"  {label} torch SDPA (contiguous): {ms * 1e3:.1f} us  {kv_bytes / ms / 1e9:.2f} TB/s")


def bench_prefill(rows, mm_rate, sweep, nseq=8, length=2048, hq=32, hkv=8, d=128, block_size=16):
    kv_cache, tables, seq_lens, k, v = paged_setup(nseq, length, hq, hkv, d, block_size, seed=1)
    q = torch.randn(nseq * length, hq, d, device=DEV, dtype=torch.bfloat16)
    qsl = torch.arange(0, nseq * length + 1, length, dtype=torch.int32, device=DEV)
    scale = d**-0.5
    qc = q.view(nseq, length, hq, d).transpose(1, 2)
    # The step's own K/V, as the engine passes them beside the cache (the kernel reads them contiguously).
    kn, vn = (t.transpose(1, 2).reshape(nseq * length, hkv, d) for t in (k, v))
    sdpa = lambda: F.scaled_dot_product_attention(qc, k, v, scale=scale, is_causal=True, enable_gqa=True)  # noqa: E731
    ref = sdpa().transpose(1, 2).reshape(nseq * length, hq, d)
    flops = 4 * d * hq * nseq * (length * (length + 1) // 2)  # causal: only the computed half
    variants = [("default", None)]
    if sweep:
        for bm, bn, w, s in [(128, 32, 4, 2), (128, 32, 4, 4), (128, 32, 8, 3), (64, 32, 4, 3), (128, 64, 4, 2),
                             (128, 64, 8, 2), (256, 32, 8, 3), (64, 64, 4, 3), (128, 16, 4, 4), (128, 64, 4, 3),
                             (128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2), (256, 64, 8, 2), (64, 128, 4, 2)]:
            # Triton tiles over BASE (the table's fresh-prompt pick is the Gluon kernel since round 8, whose keys
            # would otherwise ride along)
            variants.append((f"M{bm} N{bn} w{w} s{s}", dict(BASE, BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s,
                                                             maxnreg=None)))
        variants.append(("default (again, for noise)", None))
    best = None
    for name, cfg in variants:
        try:
            # As the triton backend calls it on a step of fresh prompts: no block-table path, the longest query.
            fn = lambda: paged_prefill(q, kv_cache, tables, seq_lens, qsl, scale, config=cfg, k=kn, v=vn,  # noqa: E731
                                       has_prefix=False, max_query_len=length)
            err = rel_err(fn(), ref)
            assert err < 1e-2, f"prefill {name}: relative error {err}"
            ms = bench(fn)
        except Exception as e:
            print(f"  prefill {name}: FAILED {type(e).__name__}: {str(e)[:200]}")
            continue
        tf = flops / ms / 1e9
        print(f"  prefill {name}: {ms * 1e3:.1f} us  {tf:.0f} TFLOP/s  err {err:.1e}")
        if name == "default":
            rows["prefill_ms"], rows["prefill_TFLOPs"], rows["prefill_err"] = ms, tf, err
            rows["prefill_vs_matmul"] = tf / mm_rate
        if best is None or ms < best[1]:
            best = (name, ms)
    rows["prefill_best_variant"], rows["prefill_best_TFLOPs"] = best[0], flops / best[1] / 1e9
    ms = bench(sdpa)
    rows["prefill_sdpa_ms"], rows["prefill_sdpa_TFLOPs"] = ms, flops / ms / 1e9
    print(f"  prefill torch SDPA causal (contiguous): {ms * 1e3:.1f} us  {flops / ms / 1e9:.0f} TFLOP/s")


def bench_cache_write(rows, copy_bw, tokens=8192, hkv=8, d=128, block_size=16):
    num_blocks = 4 * tokens // block_size
    kv_cache = torch.randn(2, num_blocks, block_size, hkv, d, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(tokens, hkv, d, device=DEV, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    slots = torch.randperm(num_blocks * block_size, device=DEV)[:tokens]
    reshape_and_cache(k, v, kv_cache, slots)
    assert torch.equal(kv_cache[0].view(-1, hkv, d)[slots], k)
    ms = bench(lambda: reshape_and_cache(k, v, kv_cache, slots))
    tbs = 2 * 2 * k.numel() * 2 / ms / 1e9
    rows["cache_write_TBps"] = tbs
    print(f"  reshape_and_cache {tokens} tokens: {ms * 1e3:.1f} us  {tbs:.2f} TB/s ({tbs / copy_bw:.0%} of copy)")


def _variant_params(name: str, hq: int, d: int):
    from services.engine.attention.params import AttentionParams

    g = torch.Generator().manual_seed(5)
    slopes = torch.tensor([2.0 ** (-8 * (i + 1) / hq) for i in range(hq)], device=DEV)
    kw = {"plain": {}, "window512": dict(sliding_window=512), "softcap50": dict(logit_softcap=50.0),
          "alibi": dict(alibi_slopes=slopes), "sinks": dict(sinks=torch.randn(hq, generator=g).to(DEV))}[name]
    return AttentionParams(scale=d ** -0.5, **kw)


def _ref_meta(batch, q_lens, ctx, tables, seq_lens, qsl):
    from services.engine.attention.metadata import AttentionMetadata

    return AttentionMetadata(num_seqs=batch, num_tokens=batch * q_lens, query_start_loc=qsl, seq_lens=seq_lens,
                             block_tables=tables, slot_mapping=torch.zeros(0, dtype=torch.int64, device=DEV),
                             max_query_len=q_lens, max_seq_len=ctx, query_lens_cpu=[q_lens] * batch,
                             seq_lens_cpu=[ctx] * batch)


def bench_variants(rows, copy_bw, mm_rate):
    """AttentionParams variants and odd head sizes: decode b64 ctx2048 and prefill 4 x 2048, bf16, each
    checked against the torch backend in float32 first. Bytes / FLOPs count only the keys a window keeps."""
    from services.engine.attention.torch_backend import paged_attention_ref

    cases = [(v, 128) for v in ("plain", "window512", "softcap50", "alibi", "sinks")]
    cases += [("plain", d) for d in (64, 80, 96, 112, 256)]
    print("  variants (bf16): decode b64 ctx2048 | prefill 4x2048 causal; 32 q / 8 kv heads")
    for name, d in cases:
        p = _variant_params(name, 32, d)
        kw = dict(sliding_window=p.sliding_window, logit_softcap=p.logit_softcap, alibi_slopes=p.alibi_slopes,
                  sinks=p.sinks)
        keys = min(2048, p.sliding_window or 2048)
        kv_cache, tables, seq_lens, _, _ = paged_setup(64, 2048, 32, 8, d, 16, seed=2)
        q = torch.randn(64, 32, d, device=DEV, dtype=torch.bfloat16)
        qsl = torch.arange(65, dtype=torch.int32, device=DEV)
        ref = paged_attention_ref(q.float(), kv_cache.float(), _ref_meta(64, 1, 2048, tables, seq_lens, qsl), p)
        fn = lambda: paged_decode(q, kv_cache, tables, seq_lens, p.scale, max_seq_len=2048, **kw)  # noqa: E731
        err_d = rel_err(fn(), ref)
        assert err_d < 1e-2, f"decode {name} d{d}: relative error {err_d}"
        tbs = 2 * 64 * keys * 8 * d * 2 / bench(fn) / 1e9
        del kv_cache, ref
        n, L = 4, 2048
        kv_cache, tables, seq_lens, kc, vc = paged_setup(n, L, 32, 8, d, 16, seed=3)
        kw.update(k=kc.transpose(1, 2).reshape(n * L, 8, d), v=vc.transpose(1, 2).reshape(n * L, 8, d))
        q = torch.randn(n * L, 32, d, device=DEV, dtype=torch.bfloat16)
        qsl = torch.arange(0, n * L + 1, L, dtype=torch.int32, device=DEV)
        ref = paged_attention_ref(q.float(), kv_cache.float(), _ref_meta(n, L, L, tables, seq_lens, qsl), p)
        fn = lambda: paged_prefill(q, kv_cache, tables, seq_lens, qsl, p.scale, has_prefix=False,  # noqa: E731
                                   max_query_len=L, **kw)
        err_p = rel_err(fn(), ref)
        assert err_p < 1e-2, f"prefill {name} d{d}: relative error {err_p}"
        pairs = sum(min(i + 1, keys) for i in range(L))
        tf = 4 * d * 32 * n * pairs / bench(fn) / 1e9
        del kv_cache, ref
        rows[f"variant_{name}_d{d}"] = dict(decode_TBps=tbs, decode_err=err_d, prefill_TFLOPs=tf, prefill_err=err_p)
        print(f"  {name:10s} d{d:<4d} decode {tbs:.2f} TB/s ({tbs / copy_bw:.0%} of copy, err {err_d:.1e})  "
              f"prefill {tf:.0f} TFLOP/s ({tf / mm_rate:.0%} of matmul, err {err_p:.1e})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", choices=["none", "decode", "prefill", "all"], default="none",
                    help="also time alternative launch configs of these kernels")
    ap.add_argument("--json", default=None, help="where to write the results (default bench/results/kernels_<date>.json)")
    ap.add_argument("--variants", action="store_true",
                    help="also check and time the AttentionParams variants and odd head sizes")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/kernels.py needs a CUDA GPU")
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(DEV)
    rows: dict = dict(device=props.name, sms=props.multi_processor_count, date=datetime.date.today().isoformat(),
                      torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
                      command="python " + " ".join(sys.argv))
    print(f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, triton {triton.__version__}")
    copy_bw = rows["copy_TBps"] = copy_bandwidth()
    mm = rows["matmul_TFLOPs"] = matmul_rate()
    print(f"  copy {copy_bw:.2f} TB/s, bf16 matmul {mm:.0f} TFLOP/s")
    sweep_decode, sweep_prefill = args.sweep in ("decode", "all"), args.sweep in ("prefill", "all")
    bench_decode(rows, 64, 2048, 32, 8, 128, 16, copy_bw, sweep_decode, "decode")
    bench_decode(rows, 4, 32768, 32, 8, 128, 16, copy_bw, sweep_decode, "longctx")
    bench_prefill(rows, mm, sweep_prefill)
    bench_cache_write(rows, copy_bw)
    if args.variants:
        bench_variants(rows, copy_bw, mm)

    table = [
        ("device-to-device copy", f"{copy_bw:.2f} TB/s", "", ""),
        ("bf16 matmul 8192^3", f"{mm:.0f} TFLOP/s", "", ""),
        ("paged decode b64 ctx2048 (KV read)", f"{rows['decode_TBps']:.2f} TB/s",
         f"{rows['decode_vs_copy']:.0%} of copy; SDPA {rows['decode_sdpa_TBps']:.2f} TB/s", ">= 90% of copy, >= SDPA"),
        (f"split-KV b4 ctx32k ({rows['longctx_num_splits']} splits)", f"{rows['longctx_TBps']:.2f} TB/s",
         f"{rows['longctx_vs_copy']:.0%} of copy; SDPA {rows['longctx_sdpa_TBps']:.2f} TB/s", ">= 80% of copy"),
        ("prefill 8x2048 causal", f"{rows['prefill_TFLOPs']:.0f} TFLOP/s",
         f"{rows['prefill_vs_matmul']:.0%} of matmul; SDPA {rows['prefill_sdpa_TFLOPs']:.0f}", ">= 60% of matmul"),
        ("reshape_and_cache 8192 tok", f"{rows['cache_write_TBps']:.2f} TB/s", "", ""),
    ]
    rows["targets"] = {
        "decode_90pct_copy": rows["decode_vs_copy"] >= 0.9,
        "decode_not_slower_than_sdpa": rows["decode_ms"] <= rows["decode_sdpa_ms"],
        "longctx_80pct_copy": rows["longctx_vs_copy"] >= 0.8,
        "prefill_60pct_matmul": rows["prefill_vs_matmul"] >= 0.6,
    }
    path = args.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                     f"kernels_{rows['date']}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)
    print()
    print("| what | measured | compared | target |")
    print("|---|---|---|---|")
    for r in table:
        print("| " + " | ".join(r) + " |")
    print("targets:", rows["targets"])


if __name__ == "__main__":
    main()
