"""Mixed-step CUDA graphs (services/engine/cuda_graphs.py) against eager mixed steps, on random-weight
Llama shapes: correctness first, then per-step GPU and host time, then the chat workload both ways.

    python bench/mixed_graphs.py                                  # llama-3-8b and llama-3.2-1b, ~100 s on an H200
    python bench/mixed_graphs.py --shape tiny --device cpu --requests 4 --iters 1 --max-step-tokens 128  # smoke test

Per shape, one engine (load_format dummy, bf16, mixed graphs up to 512 tokens):
1. Correctness: mixed steps of D decodes (context 300) plus one prefill chunk of C tokens after 64 cached
   ones, run eagerly and from the graph on the same inputs: equal bits to the eager step padded as the graph
   pads it, and against the unpadded eager step the max |logit difference| and greedy agreement.
2. Step time, eager vs graphed, for each (D, C): GPU ms (the step queued behind a GPU sleep, so launch
   time is hidden), host ms (the launching call's wall time) and isolated ms (launch and run, synced).
3. The chat workload of bench/throughput.py (first --requests requests) with mixed graphs off, then on up
   to each of --chat-limits tokens (the engine captures up to the largest; smaller limits hide the larger
   buckets), on the same engine: output tok/s, ms and host ms per step, roofline fraction, and how many
   requests' greedy tokens equal the run without mixed graphs.
Prints tables and writes bench/results/mixed_graphs_<date>_<device>.json.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.throughput import (  # noqa: E402
    SHAPES, ideal_roofline_seconds, make_workload, measure_ceilings, write_config)

STEPS = [(64, 0), (256, 0), (8, 8), (16, 16), (32, 32), (60, 40), (64, 64), (128, 128), (180, 120), (200, 312), (64, 448), (255, 345),
         (200, 824), (250, 1798)]
"""(decode sequences D, prefill chunk C): D + C new tokens, D + 1 sequences, D + 1 logits rows; C = 0: a
decode-only step of D sequences (decode graphs, for comparison)."""
CTX, CACHED = 300, 64


def make_step(runner, decodes: int, chunk: int):
    """StepInputs for D decodes at context CTX and one chunk of C tokens after CACHED cached ones."""
    lens = [(1, CTX)] * decodes + ([(chunk, CACHED + chunk)] if chunk else [])
    return step_inputs(runner, lens, decodes * 1000 + chunk)


def step_inputs(runner, lens: list[tuple[int, int]], seed: int):
    """StepInputs for sequences given as (new tokens, context incl. them), on disjoint blocks from block 0 (their
    contents are whatever the pool holds: every path timed reads the same); logits rows: the last token of
    each sequence. Shared by bench/chat_profile.py and bench/decode_fixed.py."""
    return step_inputs_from(runner, lens, 0, seed)[0]


def step_inputs_from(runner, lens: list[tuple[int, int]], first_block: int, seed: int):
    """step_inputs on blocks first_block, first_block + 1, ...; the chunk list where the step has more tokens than
    sequences, as the model runner builds it. Returns (inputs, the next free block); bench/chat_steps.py lays
    several steps side by side."""
    from services.engine.attention.metadata import AttentionMetadata
    from services.engine.model_runner import StepInputs

    from kernels.paged_prefill import make_chunk_list

    bs, dev = runner.block_size, runner.device
    need = [-(-ctx // bs) for _, ctx in lens]
    width = -(-max(need) // 16) * 16
    tables = np.zeros((len(lens), width), dtype=np.int32)
    nxt = first_block
    for i, n in enumerate(need):
        tables[i, :n] = np.arange(nxt, nxt + n)
        nxt += n
    assert nxt <= runner.kv_caches[0].shape[1], "KV pool too small for the steps"
    pos = np.concatenate([np.arange(ctx - n, ctx) for n, ctx in lens])
    seq_of = np.repeat(np.arange(len(lens)), [n for n, _ in lens])
    slots = tables[seq_of, pos // bs].astype(np.int64) * bs + pos % bs
    q = [n for n, _ in lens]
    qsl = np.concatenate([[0], np.cumsum(q)]).astype(np.int32)
    ids = np.random.default_rng(seed).integers(3, runner.cfg.vocab_size, len(pos))

    def put(a, dtype):
        return torch.as_tensor(np.asarray(a), dtype=dtype).to(dev)

    meta = AttentionMetadata(
        num_seqs=len(lens), num_tokens=len(pos), query_start_loc=put(qsl, torch.int32),
        seq_lens=put([c for _, c in lens], torch.int32), block_tables=put(tables, torch.int32),
        slot_mapping=put(slots, torch.int64), max_query_len=max(q), max_seq_len=max(c for _, c in lens),
        query_lens_cpu=q, seq_lens_cpu=[c for _, c in lens],
        chunk_list=put(make_chunk_list(q), torch.int32) if len(pos) != len(lens) else None)
    return StepInputs(put(ids, torch.long), put(pos, torch.long), meta, put(qsl[1:] - 1, torch.long)), nxt


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_step(runner, inputs, graphed: bool, iters: int) -> dict:
    graphs = runner.graphs
    runner.graphs = graphs if graphed else None
    dev = runner.device
    try:
        for _ in range(3):
            runner.execute(inputs)
        sync(dev)
        host, gpu, isolated = [], [], []
        for _ in range(iters):
            if dev.type == "cuda":
                torch.cuda._sleep(40_000_000)  # ~20 ms of GPU spin: the launches below all queue behind it
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
            t = time.perf_counter()
            runner.execute(inputs)
            host.append(time.perf_counter() - t)
            if dev.type == "cuda":
                e1.record()
                e1.synchronize()
                gpu.append(e0.elapsed_time(e1) / 1e3)
            t = time.perf_counter()
            runner.execute(inputs)
            sync(dev)
            isolated.append(time.perf_counter() - t)
        ms = lambda xs: 1e3 * float(np.median(xs)) if xs else float("nan")  # noqa: E731
        return {"gpu_ms": ms(gpu), "host_ms": ms(host), "isolated_ms": ms(isolated)}
    finally:
        runner.graphs = graphs


def pad_step(inputs, tokens: int, seqs: int):
    """The step padded as a mixed graph of `tokens` tokens and `seqs` sequences pads it (padding tokens in
    slot -1, padding sequences with no new tokens), to run eagerly: the same arithmetic as the graph."""
    from services.engine.attention.metadata import AttentionMetadata
    from services.engine.model_runner import StepInputs

    m = inputs.meta
    n, s = m.num_tokens, m.num_seqs

    def pad(t, size, value):
        return torch.cat([t, t.new_full((size - t.shape[0], *t.shape[1:]), value)])

    meta = AttentionMetadata(
        num_seqs=seqs, num_tokens=tokens, query_start_loc=pad(m.query_start_loc, seqs + 1, n),
        seq_lens=pad(m.seq_lens, seqs, 1), block_tables=pad(m.block_tables, seqs, 0),
        slot_mapping=pad(m.slot_mapping, tokens, -1), max_query_len=m.max_query_len, max_seq_len=m.max_seq_len,
        query_lens_cpu=m.query_lens_cpu + [0] * (seqs - s), seq_lens_cpu=m.seq_lens_cpu + [1] * (seqs - s))
    return StepInputs(pad(inputs.input_ids, tokens, 0), pad(inputs.positions, tokens, 0), meta, inputs.logit_rows)


def check_step(runner, inputs) -> dict:
    """Graphed logits against the eager step padded the same way (the same arithmetic: must be equal bits)
    and against the eager step itself (other matmul row counts: bf16 rounding may differ)."""
    graphs, m = runner.graphs, inputs.meta
    decode = m.is_decode_only
    kinds = (graphs.decode if decode else graphs.mixed) if graphs else {}
    bucket = min((k for k in kinds if k >= (m.num_seqs if decode else m.num_tokens)), default=None)
    runner.graphs = None
    eager = runner.execute(inputs).float()
    padded = None
    if bucket and not decode:  # (a decode graph's attention splits for the longest context: other bits)
        padded = runner.execute(pad_step(inputs, bucket, graphs.max_seqs[bucket])).float()
    runner.graphs = graphs
    graphed = runner.execute(inputs).float()
    sync(runner.device)
    return {"graph_used": bucket is not None, "bucket": bucket,
            "padded_eager_equal": None if padded is None else bool(torch.equal(padded, graphed)),
            "max_abs_diff": float((eager - graphed).abs().max()), "max_abs_logit": float(eager.abs().max()),
            "argmax_agree": float((eager.argmax(-1) == graphed.argmax(-1)).float().mean())}


def run_chat(llm, work, ceil, shape: str, max_seqs: int, limits: list[int]) -> list[dict]:
    from folio import SamplingParams

    engine = llm.engine
    graphs = engine.runner.graphs
    mixed = graphs.mixed if graphs is not None else {}
    params = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for _, o in work]
    roof_s = ideal_roofline_seconds(work, SHAPES[shape], max_seqs, ceil)
    out, tokens = [], {}
    for limit in [0, *limits]:
        if graphs is not None:  # the same engine and captures, the mixed graphs above the limit hidden
            graphs.mixed = {t: g for t, g in mixed.items() if t <= limit}
        engine.step_timing = {}
        sync(engine.device)
        t = time.perf_counter()
        res = llm.generate([p for p, _ in work], params, use_tqdm=False)
        sync(engine.device)
        secs = time.perf_counter() - t
        timing = dict(engine.step_timing)
        steps = timing.pop("steps", 0) or 1
        host = sum(v for k, v in timing.items() if k != "wait")
        n_out = sum(len(o.outputs[0].token_ids) for o in res)
        tokens[limit] = [o.outputs[0].token_ids for o in res]
        out.append({"mixed_graph_tokens": limit, "requests": len(work), "output_tok_s": n_out / secs, "seconds": secs,
                    "steps": steps, "ms_per_step": 1e3 * secs / steps, "host_ms_per_step": 1e3 * host / steps,
                    "roofline_fraction": roof_s / secs if np.isfinite(roof_s) else None})
    engine.step_timing = None
    if graphs is not None:
        graphs.mixed = mixed
    for r in out:
        r["requests_with_identical_tokens"] = sum(a == b for a, b in zip(tokens[0], tokens[r["mixed_graph_tokens"]]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", nargs="+", default=["llama-3-8b", "llama-3.2-1b"], choices=list(SHAPES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--iters", type=int, default=6, help="timed repetitions per step size")
    ap.add_argument("--requests", type=int, default=1000, help="chat workload requests (0: skip it)")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-step-tokens", type=int, default=4096, help="skip the step sizes above this")
    ap.add_argument("--chat-limits", type=int, nargs="+", default=[2048],
                    help="mixed-graph token limits the chat workload runs with (0, no mixed graphs, always runs)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from folio import LLM

    dev = torch.device(args.device)
    ceil = measure_ceilings(dev)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    t_all = time.perf_counter()
    records = []
    for shape in args.shape:
        with tempfile.TemporaryDirectory() as d:
            model_dir = write_config(shape, Path(d))
            work = make_workload("chat", SHAPES[shape]["vocab_size"], args.requests) if args.requests else []
            max_len = max([len(p) + o for p, o in work] + [2048]) + 16
            t0 = time.perf_counter()
            llm = LLM(str(model_dir), load_format="dummy", dtype="bfloat16", device=args.device, max_model_len=max_len,
                      max_num_seqs=args.max_num_seqs, enable_prefix_caching=False,
                      max_mixed_graph_tokens=max(args.chat_limits))
            startup = time.perf_counter() - t0
            runner = llm.engine.runner
            graphs = runner.graphs
            captures = graphs.captures if graphs else {}
            print(f"\n== {shape} on {name}: startup {startup:.1f} s; graph captures: " + "; ".join(
                f"{k} {len(c['buckets'])} buckets {c['buckets'][0]}..{c['buckets'][-1]} in {c['seconds']:.1f} s, "
                f"{c['mib']:.0f} MiB" for k, c in captures.items()), flush=True)
            print(f"{'decodes':>8}{'chunk':>7}{'tokens':>7}{'bucket':>7}{'=padded':>8}{'max|diff|':>11}{'argmax=':>8}"
                  f"{'gpu ms e/g':>16}{'host ms e/g':>16}{'isolated e/g':>16}{'speedup':>9}", flush=True)
            rows = []
            with torch.inference_mode():
                for D, C in STEPS:
                    if D + 1 > args.max_num_seqs or D + C > args.max_step_tokens:
                        continue
                    inputs = make_step(runner, D, C)
                    chk = check_step(runner, inputs)
                    e = time_step(runner, inputs, False, args.iters)
                    g = time_step(runner, inputs, True, args.iters)
                    row = {"decodes": D, "chunk": C, "tokens": D + C, **chk, "eager": e, "graphed": g}
                    rows.append(row)
                    same = {True: "yes", False: "NO", None: "-"}[chk["padded_eager_equal"]]
                    print(f"{D:>8}{C:>7}{D + C:>7}{chk['bucket'] or '-':>7}{same:>8}"
                          f"{chk['max_abs_diff']:>11.3g}"
                          f"{chk['argmax_agree']:>8.0%}{e['gpu_ms']:>8.3f}/{g['gpu_ms']:<7.3f}"
                          f"{e['host_ms']:>8.3f}/{g['host_ms']:<7.3f}{e['isolated_ms']:>8.3f}/{g['isolated_ms']:<7.3f}"
                          f"{e['isolated_ms'] / g['isolated_ms']:>8.2f}x", flush=True)
            chat = run_chat(llm, work, ceil, shape, args.max_num_seqs, args.chat_limits) if work else []
            for r in chat:
                roof = f"{r['roofline_fraction']:.0%}" if r["roofline_fraction"] else "-"
                print(f"chat x{r['requests']} mixed graphs up to {r['mixed_graph_tokens']} tokens: "
                      f"{r['output_tok_s']:.0f} tok/s, "
                      f"{r['steps']} steps, {r['ms_per_step']:.2f} ms/step, host {r['host_ms_per_step']:.2f} ms/step, "
                      f"roofline {roof}; identical tokens {r['requests_with_identical_tokens']}/{r['requests']}",
                      flush=True)
            records.append({"shape": shape, "device": name, "startup_s": startup, "captures": captures, "steps": rows,
                            "chat": chat, **ceil})
            llm.shutdown()
            del llm, runner, graphs
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    # A graph must give the bits of the eager step padded as it pads (the same arithmetic), and the same
    # greedy tokens as the unpadded eager step on nearly every row (bf16 matmuls over other row counts can
    # round differently: random-weight logits are close to ties).
    bad = [(r["shape"], s["tokens"]) for r in records for s in r["steps"]
           if s["padded_eager_equal"] is False or s["argmax_agree"] < 0.9
           or (not s["graph_used"] and dev.type == "cuda" and s["tokens"] <= max(args.chat_limits))]
    print(f"\ncorrectness: {'OK' if not bad else 'FAILED at ' + str(bad)}; total {time.perf_counter() - t_all:.0f} s")
    stamp = dt.date.today().isoformat()
    out = Path(args.out or Path(__file__).parent / "results" / f"mixed_graphs_{stamp}_{dev.type}.json")
    out.write_text(json.dumps({"date": stamp, "records": records}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
