"""Launch configs of the paged decode kernel on the serving workloads' decode shapes (one GPU): each config is
checked against the torch reference, then timed (median of triton.testing.do_bench); prints, per shape, the
default's and the best config's KV read rate against the measured copy ceiling, and writes JSON.

    python bench/decode_sweep.py --json bench/results/decode_sweep.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.paged_decode import _decode_config, paged_decode, paged_decode_ref  # noqa: E402
from kernels.paged_prefill import paged_prefill  # noqa: E402

# (label, batch, context, q heads, kv heads, head_dim): the 8B and 1B shapes at the fixed workload's mean
# context (256 in + 128 of 256 out), the 1B at 1,024 sequences, and the kernel benchmark's long decode.
SHAPES = [("8b b256 ctx384", 256, 384, 32, 8, 128), ("1b b256 ctx384", 256, 384, 32, 8, 64),
          ("1b b1024 ctx300", 1024, 300, 32, 8, 64), ("8b b64 ctx2048", 64, 2048, 32, 8, 128)]
CONFIGS = [dict(TILE_N=t, num_warps=w, num_stages=s) for t, w, s in itertools.product((32, 64, 128), (2, 4, 8), (2, 3, 4))]
BLOCK = 16


def copy_ceiling() -> float:
    import triton.testing

    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a))
    return 2 * a.numel() / ms / 1e9  # TB/s


def make(batch, ctx, hq, hkv, d, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    blocks_per = -(-ctx // BLOCK)
    nblocks = batch * blocks_per
    kv = torch.randn(2, nblocks, BLOCK, hkv, d, device="cuda", dtype=torch.bfloat16, generator=g)
    perm = torch.randperm(nblocks, device="cuda", generator=g).to(torch.int32)
    tables = perm.view(batch, blocks_per)
    # contexts spread around ctx (the workload's sequences are at different lengths)
    lens = torch.randint(max(1, ctx // 2), ctx + 1, (batch,), device="cuda", generator=g, dtype=torch.int32)
    lens[0] = ctx
    q = torch.randn(batch, hq, d, device="cuda", dtype=torch.bfloat16, generator=g)
    return q, kv, tables, lens


def prefill_kernel_on_decodes(q, kv, tables, lens, scale, ref, kv_bytes) -> dict:
    """The decode rows of a mixed step go through the prefill kernel: one new token per sequence, its own
    K/V handed in contiguous as the backend does (gathered here from the cache)."""
    import triton.testing

    n = q.shape[0]
    qsl = torch.arange(n + 1, device=q.device, dtype=torch.int32)
    last = (lens.long() - 1)
    blocks = tables.long().gather(1, (last // BLOCK)[:, None])[:, 0]
    k = kv[0][blocks, last % BLOCK].contiguous()
    v = kv[1][blocks, last % BLOCK].contiguous()
    run = lambda: paged_prefill(q, kv, tables, lens, qsl, scale, k=k, v=v, has_prefix=True, max_query_len=1)  # noqa: E731
    out = run()
    err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
    ms = triton.testing.do_bench(run, warmup=10, rep=40)
    return dict(ms=ms, TBps=kv_bytes / ms / 1e9, err=err)


def main() -> None:
    import triton.testing

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    copy = copy_ceiling()
    print(f"device {torch.cuda.get_device_name()}: copy {copy:.2f} TB/s")
    records = []
    for label, batch, ctx, hq, hkv, d in SHAPES:
        q, kv, tables, lens = make(batch, ctx, hq, hkv, d)
        scale = d ** -0.5
        ref = paged_decode_ref(q.float(), kv.float(), tables, lens, scale)
        kv_bytes = int(lens.sum()) * hkv * d * 2 * 2
        default = _decode_config(d, q.dtype)
        results = []
        # The default runs first (it warms the clocks and caches up) and again last: the last is what counts.
        for cfg in [default] + [c for c in CONFIGS if c != {k: default[k] for k in c}] + [default]:
            try:
                out = paged_decode(q, kv, tables, lens, scale, max_seq_len=ctx, num_splits=1, config=cfg)
                err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
                if err > 2e-2:
                    results.append(dict(cfg, err=err, ok=False))
                    continue
                ms = triton.testing.do_bench(lambda: paged_decode(q, kv, tables, lens, scale, max_seq_len=ctx,
                                                                  num_splits=1, config=cfg), warmup=10, rep=40)
                results.append(dict(cfg, err=err, ok=True, ms=ms, TBps=kv_bytes / ms / 1e9))
            except Exception as e:  # a config that does not compile (shared memory) is reported, not fatal
                results.append(dict(cfg, ok=False, error=str(e)[:120]))
        results = results[1:]
        good = [r for r in results if r.get("ok")]
        best = max(good, key=lambda r: r["TBps"])
        last = results[-1]
        dflt = last if last.get("ok") else None
        bad = [r for r in results if not r.get("ok")]
        print(f"{label}: default {dflt['TBps'] if dflt else float('nan'):.2f} TB/s "
              f"({(dflt['TBps'] if dflt else 0) / copy:.0%} of copy); best {best['TBps']:.2f} TB/s "
              f"({best['TBps'] / copy:.0%}) with TILE_N={best['TILE_N']} warps={best['num_warps']} "
              f"stages={best['num_stages']}; {len(bad)} configs failed" + (f" (first: {bad[0]})" if bad else ""))
        mixed = prefill_kernel_on_decodes(q, kv, tables, lens, scale, ref, kv_bytes)
        print(f"   the same rows through the prefill kernel (as in a mixed step): {mixed['TBps']:.2f} TB/s "
              f"({mixed['TBps'] / copy:.0%} of copy), err {mixed['err']:.1e}")
        top = sorted(good, key=lambda r: -r["TBps"])[:5]
        print("   top: " + "; ".join(f"N{r['TILE_N']} w{r['num_warps']} s{r['num_stages']} {r['TBps']:.2f}" for r in top))
        records.append(dict(shape=label, batch=batch, ctx=ctx, q_heads=hq, kv_heads=hkv, head_dim=d,
                            default=dflt, best=best, prefill_kernel=mixed, results=results))
    rec = {"device": torch.cuda.get_device_name(), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "command": "python bench/decode_sweep.py " + " ".join(sys.argv[1:]), "copy_TBps": copy, "shapes": records}
    if args.json:
        Path(args.json).write_text(json.dumps(rec, indent=1))


if __name__ == "__main__":
    main()
