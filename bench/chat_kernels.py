"""The 8B chat workload's attention kernels on the GPU: two kernel changes checked against float64, then decode
splits timed at the chat's small batches.

Checks (always first; exit status 1 if one fails):
  prefill: the dispatch table's pick for fresh prompts under 1,024 tokens (Gluon, TMA_STORE + AHEAD) against the
    pick it replaced (FOLIO_PREFILL_SHORT_PICK=ws: no TMA_STORE, no AHEAD) and a float64 reference, on the chat's
    first step (its first prompts up to the 8,192-token budget) and other fresh-prompt batches. The two picks do
    the same arithmetic per work item, so they should agree bit for bit.
  decode: the split counts the engine's graphs take now, in session 7 and in session 6 (FOLIO_DECODE_SPLIT_RULE),
    one split, and a float64 reference, at the chat's tail contexts (1-48 sequences).
Timing: the prefill kernel's part of the chat's mixed steps as the engine's graphs launch it, per config
  (`--mixed-budget` seconds); paged decode per launch (CUDA graph of LAYERS launches over their own KV pools, so the
  KV is read from memory as in a step) at 1-128 sequences over chat-like contexts, for split counts 1-32, against
  the count choose_num_splits gives the engine's graphs (max_seq_len = the chat's max_model_len).

    python bench/chat_kernels.py --out bench/results/chat_kernels.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = str(Path(__file__).resolve().parents[1])
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "kernels"))  # paged_cases.make_batch, shared with the tests

from bench.throughput import make_workload  # noqa: E402
from kernels import paged_decode as pd  # noqa: E402
from kernels import paged_prefill_configs as ppc  # noqa: E402
from kernels.paged_prefill import make_chunk_list, paged_prefill  # noqa: E402

HQ, HKV, D, BLOCK = 32, 8, 128, 16  # the 8B's attention
CHAT_MAX_MODEL_LEN = 1024 + 1024 + 16  # bench/throughput.py: the longest prompt + output + 16
SCALE = D ** -0.5
DTYPE = torch.bfloat16  # the engine's; a CPU smoke run of these functions needs float16 (the interpreter has no bf16)


def ref64_prefill(b) -> torch.Tensor:
    """Causal attention of fresh prompts in float64 (k/v are the batch's new rows)."""
    out = torch.zeros(b.q.shape, dtype=torch.float64, device=b.q.device)
    qsl = b.query_start_loc.tolist()
    for i in range(len(qsl) - 1):
        s, e = qsl[i], qsl[i + 1]
        q, k, v = (t[s:e].double() for t in (b.q, b.k, b.v))
        k = k.repeat_interleave(HQ // HKV, 1)
        v = v.repeat_interleave(HQ // HKV, 1)
        sc = torch.einsum("qhd,nhd->hqn", q, k) * SCALE
        n = e - s
        sc = sc.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        out[s:e] = torch.einsum("hqn,nhd->qhd", sc.softmax(-1), v)
    return out


def ref64_decode(b) -> torch.Tensor:
    out = torch.empty(b.q.shape, dtype=torch.float64, device=b.q.device)
    for i, n in enumerate(b.seq_lens_cpu):
        blocks = b.block_tables[i, : -(-n // BLOCK)].long()
        k = b.kv_cache[0, blocks].reshape(-1, HKV, D)[:n].double().repeat_interleave(HQ // HKV, 1)
        v = b.kv_cache[1, blocks].reshape(-1, HKV, D)[:n].double().repeat_interleave(HQ // HKV, 1)
        sc = torch.einsum("hd,nhd->hn", b.q[i].double(), k) * SCALE
        out[i] = torch.einsum("hn,nhd->hd", sc.softmax(-1), v)
    return out


def compare(name: str, outs: dict, ref: torch.Tensor, pair: tuple[str, str]) -> dict:
    """Each output's largest error against float64 (bf16 tolerance of the tests), and whether the pair agrees bit for bit."""
    from paged_cases import TOLERANCE

    tol = TOLERANCE[DTYPE]
    rec = {"case": name}
    ok = True
    for key, out in outs.items():
        err = (out.double() - ref).abs()
        bound = tol["atol"] + tol["rtol"] * ref.abs()
        # A bf16 rounding of the float64 result is the best a kernel can return: its error, for scale.
        best = (ref.to(DTYPE).double() - ref).abs().max().item()
        rec[key] = dict(max_abs_err=err.max().item(), mean_abs_err=err.mean().item(), dtype_rounding=best,
                        within_tol=bool((err <= bound).all()), nan=bool(out.isnan().any()))
        ok &= rec[key]["within_tol"] and not rec[key]["nan"]
    a, b = (outs[k] for k in pair)
    rec["bitwise_equal"] = bool(torch.equal(a, b))
    rec["elements_differing"] = int((a != b).sum())
    rec["elements"] = a.numel()
    rec["max_abs_diff"] = (a.double() - b.double()).abs().max().item()
    rec["ok"] = ok
    errs = ", ".join(f"{k} max err {v['max_abs_err']:.2e} (rounding to the dtype {v['dtype_rounding']:.1e})"
                     for k, v in rec.items() if isinstance(v, dict))
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {errs}; {pair[0]} vs {pair[1]}: bitwise equal {rec['bitwise_equal']}, "
          f"{rec['elements_differing']}/{rec['elements']} elements differ (max {rec['max_abs_diff']:.2e})", flush=True)
    return rec


def check_prefill(dev) -> list[dict]:
    from paged_cases import make_batch

    work = make_workload("chat", 128256, None)
    first, total = [], 0
    for p, _ in work:  # the first step's fresh prompts under the 8,192-token budget
        if total + len(p) > 8192 or len(first) == 256:
            break
        first.append(len(p))
        total += len(p)
    cases = {f"chat first step ({len(first)} prompts, {total} tokens, longest {max(first)})": first,
             "chat prompts 40-79": [len(p) for p, _ in work[40:80]],
             "one 343-token prompt": [343], "one 1023-token prompt": [1023],
             "32 x 512": [512] * 32, "lengths off the tiles": [1, 17, 63, 65, 129, 200, 511, 777, 1000]}
    new, old = dict(ppc.BASE, **ppc._WS_SHORT_FRESH), dict(ppc.BASE, **ppc._WS_FRESH)
    picked = ppc.select_config(D, HQ // HKV, DTYPE, False, 700)
    assert picked == new, "the table's pick for fresh prompts under 1,024 tokens is not TMA_STORE + AHEAD"
    recs = []
    for name, lens in cases.items():
        b = make_batch(lens, lens, HQ, HKV, D, BLOCK, DTYPE, dev)
        outs = {}
        for key, cfg in (("new_pick", new), ("old_pick", old)):
            outs[key] = paged_prefill(b.q, b.kv_cache, b.block_tables, b.seq_lens, b.query_start_loc, SCALE,
                                      config=cfg, k=b.k, v=b.v, has_prefix=False, max_query_len=max(lens))
        recs.append(compare("prefill " + name, outs, ref64_prefill(b), ("new_pick", "old_pick")))
    return recs


def splits_rule(n: int, rule: str, sms: int) -> int:
    """choose_num_splits for the engine's graphs (max_seq_len = max_model_len) under FOLIO_DECODE_SPLIT_RULE=rule
    ("" the current rule, "s7" / "s6" the sessions' before)."""
    prev = os.environ.get(pd.SPLIT_RULE_ENV)
    os.environ[pd.SPLIT_RULE_ENV] = rule
    try:
        return pd.choose_num_splits(n, HKV, CHAT_MAX_MODEL_LEN, sms)
    finally:
        if prev is None:
            del os.environ[pd.SPLIT_RULE_ENV]
        else:
            os.environ[pd.SPLIT_RULE_ENV] = prev


def check_decode(dev) -> list[dict]:
    from paged_cases import make_batch

    sms = pd.num_sms(dev)
    cases = {"1 x 300": [300], "1 x 700": [700], "1 x 1500": [1500], "1 x 2047": [2047], "2 x (450, 1200)": [450, 1200],
             "2 x (64, 1900)": [64, 1900], "4 x 200-1800": [200, 700, 1200, 1800],
             "24 x 200-1800": list(range(200, 1800, 67))[:24], "48 x 300-1000": list(range(300, 1020, 15))}
    recs = []
    for name, lens in cases.items():
        b = make_batch(lens, [1] * len(lens), HQ, HKV, D, BLOCK, DTYPE, dev)
        rules = {r: splits_rule(len(lens), r, sms) for r in ("", "s7", "s6")}
        outs = {f"splits_{s}": pd.paged_decode(b.q, b.kv_cache, b.block_tables, b.seq_lens, SCALE, num_splits=s)
                for s in dict.fromkeys((*rules.values(), 1))}
        rec = compare(f"decode {name} (graph rule: {rules['']} splits, session 7: {rules['s7']}, session 6: "
                      f"{rules['s6']})", outs, ref64_decode(b), (f"splits_{rules['']}", f"splits_{rules['s6']}"))
        rec.update(splits_now=rules[""], splits_s7=rules["s7"], splits_s6=rules["s6"])
        recs.append(rec)
    return recs


def timing_pools(lens: list[int], layers: int, dev) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """One random pool on the device with each layer's sequences in their own shuffled blocks: (kv_cache, seq_lens,
    block tables per layer)."""
    per_seq = [-(-n // BLOCK) for n in lens]
    width = max(per_seq)
    total = sum(per_seq) * layers
    kv = torch.randn(2, total, BLOCK, HKV, D, device=dev, dtype=DTYPE)
    perm = torch.randperm(total, device=dev).to(torch.int32)
    tables, used = [], 0
    for _ in range(layers):
        t = torch.zeros(len(lens), width, dtype=torch.int32, device=dev)
        for i, nb in enumerate(per_seq):
            t[i, :nb] = perm[used:used + nb]
            used += nb
        tables.append(t)
    return kv, torch.tensor(lens, dtype=torch.int32, device=dev), tables


def time_decode(dev, budget_s: float, layers: int) -> list[dict]:
    """Per-launch time of paged decode (its split reduce included) in a CUDA graph of `layers` launches, each over
    its own blocks of one pool (as a step's layers read theirs)."""
    sms = pd.num_sms(dev)
    gen = torch.Generator().manual_seed(1)
    t_end = time.perf_counter() + budget_s
    recs = []
    for batch in (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128):
        lens = torch.randint(200, 1800, (batch,), generator=gen).tolist()
        kv, seq_lens, tables = timing_pools(lens, layers, dev)
        q = torch.randn(batch, HQ, D, device=dev, dtype=DTYPE)
        rule = splits_rule(batch, "", sms)
        row = {"batch": batch, "rule": rule, "contexts_mean": sum(lens) / batch, "us": {}}
        kv_bytes = sum(lens) * HKV * D * 2 * 2
        for s in (1, 2, 4, 8, 16, 32):
            if time.perf_counter() > t_end:
                break
            outs = [torch.empty_like(q) for _ in tables]

            def step():
                for t, o in zip(tables, outs):
                    pd.paged_decode(q, kv, t, seq_lens, SCALE, num_splits=s, out=o)

            step()  # compile outside the capture
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                step()
            for _ in range(3):
                g.replay()
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            reps = 20
            start.record()
            for _ in range(reps):
                g.replay()
            stop.record()
            torch.cuda.synchronize()
            row["us"][s] = 1e3 * start.elapsed_time(stop) / (reps * layers)
        if not row["us"]:
            break
        best = min(row["us"], key=row["us"].get)
        row.update(best=best, best_over_rule=row["us"][best] / row["us"].get(rule, float("nan")),
                   kv_GBps_best=kv_bytes / (row["us"][best] * 1e3))
        print(f"decode {batch:4d} seqs (contexts mean {row['contexts_mean']:.0f}): "
              + "  ".join(f"{s}:{u:6.1f}" for s, u in row["us"].items())
              + f" us/launch; rule {rule}, best {best} ({row['best_over_rule']:.3f}x the rule's time)", flush=True)
        recs.append(row)
        del kv, tables
    return recs


def gpu_batch(seq_lens: list[int], query_lens: list[int], dev, seed: int = 0) -> SimpleNamespace:
    """make_batch's layout (shuffled blocks, the new tokens' K/V in the cache and in k/v) drawn on the device: the
    chat's mixed steps hold ~150k cached tokens, too many to draw on the host in the time a round has."""
    g = torch.Generator(device=dev).manual_seed(seed)
    per_seq = [-(-n // BLOCK) for n in seq_lens]
    total = sum(per_seq) + 1
    kv = torch.randn(2, total, BLOCK, HKV, D, device=dev, dtype=DTYPE, generator=g)
    perm = torch.randperm(total, device=dev, generator=g).to(torch.int32)
    tables = torch.zeros(len(seq_lens), max(per_seq) + 1, dtype=torch.int32, device=dev)
    slots, starts, used = [], [0], 0
    for i, (n, ql) in enumerate(zip(seq_lens, query_lens)):
        tables[i, :per_seq[i]] = perm[used:used + per_seq[i]]
        used += per_seq[i]
        pos = torch.arange(n - ql, n, device=dev)
        slots.append(tables[i, pos // BLOCK].long() * BLOCK + pos % BLOCK)
        starts.append(starts[-1] + ql)
    slots = torch.cat(slots)
    k = kv[0].view(-1, HKV, D)[slots].clone()
    v = kv[1].view(-1, HKV, D)[slots].clone()
    q = torch.randn(starts[-1], HQ, D, device=dev, dtype=DTYPE, generator=g)
    return SimpleNamespace(q=q, k=k, v=v, kv_cache=kv, block_tables=tables,
                           seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
                           query_start_loc=torch.tensor(starts, dtype=torch.int32, device=dev))


def graph_us(fn, layers: int, reps: int = 20) -> float:
    """Per-call device time of fn in a CUDA graph of `layers` calls (after one eager call that compiles)."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(layers):
            fn()
    for _ in range(3):
        g.replay()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        g.replay()
    stop.record()
    torch.cuda.synchronize()
    return 1e3 * start.elapsed_time(stop) / (reps * layers)


MIXED_CONFIGS = {
    "table (graphs: has_prefix, max_query_len = bucket)": None,  # session 9: 64x32 4w 3st + CHUNK_LIST, 3 per SM
    "BASE + CHUNK_LIST, 2 per SM (session 8's pick)": dict(ppc.BASE, **ppc._PREFIX_SHORT_BASE),
    "BASE (session 7's pick)": dict(ppc.BASE),
    "64x32 4w 3st, no list": dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3, maxnreg=168, ONE_LOOP=2),
    # the prompts' tiles alone from the host's list (paged_prefill chunk_list), persistent grids
    "64x32 4w 3st + CHUNK_LIST, 2 per SM": dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3, maxnreg=168,
                                                ONE_LOOP=2, CHUNK_LIST=True, PERSISTENT=2),
    "64x32 4w 3st + CHUNK_LIST, 3 per SM": dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3, maxnreg=168,
                                                ONE_LOOP=2, CHUNK_LIST=True, PERSISTENT=3),
}


def time_mixed(dev, budget_s: float, layers: int, shapes: dict | None = None) -> list[dict]:
    """The prefill kernel's part of a mixed step as the engine's graphs launch it (has_prefix, max_query_len = the
    token bucket, skip_single; the decode rows are the decode kernel's), per config, checked against the float32
    reference on the prompt rows first; and the decode kernel's part (query_start_loc, one split) for scale."""
    from kernels.paged_prefill import paged_prefill_ref

    gen = torch.Generator().manual_seed(2)
    ctx = lambda n: torch.randint(200, 1200, (n,), generator=gen).tolist()  # noqa: E731
    shapes = shapes or {"254 decodes + a 343-token prompt (the chat's mean mixed step)": (ctx(254), [(343, 343)]),
              "250 decodes + prompts of 120 and 600": (ctx(250), [(120, 120), (600, 600)]),
              "60 decodes + a 900-token prompt": (ctx(60), [(900, 900)]),
              "4 chunks of 200 after 1,500 cached, 100 decodes": (ctx(100), [(1700, 200)] * 4)}
    t_end = time.perf_counter() + budget_s
    recs = []
    for name, (dec, prompts) in shapes.items():
        seq_lens = dec + [s for s, _ in prompts]
        q_lens = [1] * len(dec) + [ql for _, ql in prompts]
        b = gpu_batch(seq_lens, q_lens, dev)
        t = b.q.shape[0]
        bucket = -(-t // 16) * 16
        fresh = all(s == ql for s, ql in prompts)
        rows = slice(len(dec), None)  # the prompts' rows: from query_start_loc
        p0 = int(b.query_start_loc[len(dec)])
        ref = paged_prefill_ref(b.q[p0:], b.kv_cache, b.block_tables[rows], b.seq_lens[rows],
                                b.query_start_loc[len(dec):] - p0, SCALE)
        chunks = torch.from_numpy(make_chunk_list(q_lens)).to(dev)
        rec = {"shape": name, "tokens": t, "us": {}, "max_err": {}}
        out = torch.zeros_like(b.q)
        for cname, cfg in MIXED_CONFIGS.items():
            if time.perf_counter() > t_end:
                break
            if cfg == "gluon":
                if not fresh:
                    continue
                kw = dict(config=dict(ppc.BASE, **ppc._WS_SHORT_FRESH), has_prefix=False)
            else:
                kw = dict(config=cfg, has_prefix=True, chunk_list=chunks)  # used where the config lists chunks

            def fn(kw=kw):
                paged_prefill(b.q, b.kv_cache, b.block_tables, b.seq_lens, b.query_start_loc, SCALE, out=out,
                              k=b.k, v=b.v, skip_single=True, max_query_len=bucket, **kw)
            try:
                out.fill_(float("nan"))  # rows a config fails to write fail its check
                fn()
                torch.cuda.synchronize()
                rec["max_err"][cname] = (out[p0:].float() - ref.float()).abs().max().item()
                rec["us"][cname] = graph_us(fn, layers)
            except Exception as e:  # a config this shape cannot take: say so, go on
                rec["us"][cname] = None
                rec["max_err"][cname] = repr(e)[:200]
        # The bound a launch over the prompts alone would reach (no tile slots for the decode rows), same config.
        pq, pk, pv = b.q[p0:], b.k[p0:], b.v[p0:]
        pqsl = (b.query_start_loc[len(dec):] - p0).contiguous()
        ptab, plens = b.block_tables[rows].contiguous(), b.seq_lens[rows].contiguous()
        pout = torch.zeros_like(pq)
        if time.perf_counter() <= t_end:
            rec["us"]["prompts alone (bound for a launch without decode slots)"] = graph_us(
                lambda: paged_prefill(pq, b.kv_cache, ptab, plens, pqsl, SCALE, out=pout, k=pk, v=pv,
                                      skip_single=True, has_prefix=True, max_query_len=bucket), layers)
            rec["max_err"]["prompts alone (bound for a launch without decode slots)"] = (
                pout.float() - ref.float()).abs().max().item()
        dout = torch.empty_like(b.q)
        rec["decode_rows_us"] = graph_us(lambda: pd.paged_decode(b.q, b.kv_cache, b.block_tables, b.seq_lens, SCALE,
                                                                 out=dout, query_start_loc=b.query_start_loc), layers)
        print(f"mixed prefill, {name} ({t} tokens, bucket {bucket}; decode rows' kernel {rec['decode_rows_us']:.1f} us):",
              flush=True)
        for cname, us in rec["us"].items():
            err = rec["max_err"][cname]
            ok = isinstance(err, float) and err < 0.05  # bf16 outputs of |x| < ~3 (NaN fails too)
            rec.setdefault("ok", {})[cname] = ok
            print(f"   {cname:<56} " + (f"{us:7.1f} us" if us else "   -   ") + f"  max err {err}"
                  + ("" if ok else "  FAIL"), flush=True)
        recs.append(rec)
        del b, out, dout
    return recs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=25.0, help="seconds for the decode timing sweep")
    ap.add_argument("--mixed-budget", type=float, default=10.0, help="seconds for the mixed-step prefill timings")
    ap.add_argument("--layers", type=int, default=16, help="launches per graph, each over its own KV pool")
    ap.add_argument("--sections", nargs="+", default=["prefill", "decode", "mixed", "sweep"],
                    choices=["prefill", "decode", "mixed", "sweep"],
                    help="prefill / decode: the two kernels' checks; mixed: mixed-step prefill configs (each checked, "
                         "then timed); sweep: decode splits timed")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "chat_kernels.json"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/chat_kernels.py needs a CUDA GPU")
    dev = torch.device("cuda")
    t0 = time.perf_counter()
    rec = {"device": torch.cuda.get_device_name(dev),
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "command": "python bench/chat_kernels.py " + " ".join(sys.argv[1:])}
    checks = (check_prefill(dev) if "prefill" in args.sections else []) + (
        check_decode(dev) if "decode" in args.sections else [])
    failed = sum(not r["ok"] for r in checks)
    if checks:
        rec["checks"] = checks
        print(f"checks: {len(checks) - failed} passed, {failed} failed ({time.perf_counter() - t0:.1f} s)", flush=True)
    if "mixed" in args.sections:
        rec["mixed_prefill"] = time_mixed(dev, args.mixed_budget, args.layers)
        failed += sum(not ok for r in rec["mixed_prefill"] for ok in r.get("ok", {}).values())
    if "sweep" in args.sections:
        rec["decode_splits"] = time_decode(dev, args.budget, args.layers)
    rec["wall_s"] = time.perf_counter() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rec, indent=1))
    print(f"wrote {args.out} ({rec['wall_s']:.1f} s)")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
