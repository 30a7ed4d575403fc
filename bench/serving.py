"""Serving latency under load: the full stack (Redis, tokenizer, router, one engine) against the same engine
in-process, under Poisson arrivals at several rates, in one run. Prints a table; writes JSON to bench/results/.

    python bench/serving.py --shape llama-3-8b --rates 2 8 16 --requests 96          # on a GPU
    python bench/serving.py --shape tiny --device cpu --rates 4 --requests 16        # smoke test

The model is a random-weight model of a real shape (load_format="dummy") whose vocabulary is the bundled
tokenizer's, so the stack's tokenizer service can detokenize everything it generates. Prompts are random
token ids; each request asks for its own output length (ignore_eos). Both paths see the same arrival
schedule (seeded). Reported per rate: time to first token (TTFT) and inter-token latency (ITL: gaps
between a stream's consecutive tokens) at p50 / p99, request and token throughput, and what the hops
add (stack minus in-process).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from throughput import SHAPES, write_config  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def pct(xs, q):
    return float(np.percentile(xs, q * 100)) if len(xs) else float("nan")


def make_requests(n: int, rate: float, vocab: int, seed: int):
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, n))
    arrivals -= arrivals[0]
    ins = rng.integers(32, 512, n)
    outs = rng.integers(32, 160, n)
    return [(float(t), rng.integers(17, vocab, int(i)).tolist(), int(o)) for t, i, o in zip(arrivals, ins, outs)]


def summarize(times: dict[str, list[float]], arrivals: dict[str, float], t_end: float, t0: float) -> dict:
    ttft = [ts[0] - arrivals[r] for r, ts in times.items() if ts]
    itl = [b - a for ts in times.values() for a, b in zip(ts, ts[1:])]
    ntok = sum(len(ts) for ts in times.values())
    wall = t_end - t0
    return {"requests": len(times), "output_tokens": ntok, "wall_s": wall, "req_per_s": len(times) / wall,
            "tok_per_s": ntok / wall,
            "ttft_ms": {"p50": 1e3 * pct(ttft, 0.5), "p99": 1e3 * pct(ttft, 0.99)},
            "itl_ms": {"p50": 1e3 * pct(itl, 0.5), "p99": 1e3 * pct(itl, 0.99)}}


def engine_kwargs(args, model_dir) -> dict:
    return {"model": str(model_dir), "load_format": "dummy", "dtype": args.dtype, "device": args.device,
            "max_model_len": 1024, "max_num_seqs": 256, "enable_prefix_caching": False}


def run_in_process(args, model_dir, reqs) -> dict:
    from services.engine.engine import EngineConfig, LLMEngine
    from services.common.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig(**engine_kwargs(args, model_dir), max_waiting_requests=None))
    engine.add_request("warmup", None, SamplingParams(max_tokens=4, ignore_eos=True), prompt_token_ids=[20, 21, 22])
    while engine.has_unfinished_requests():
        engine.step()
    times: dict[str, list[float]] = {}
    arrivals: dict[str, float] = {}
    t0 = time.perf_counter()
    i = 0
    while i < len(reqs) or engine.has_unfinished_requests():
        now = time.perf_counter() - t0
        while i < len(reqs) and reqs[i][0] <= now:
            at, ids, out = reqs[i]
            rid = f"r{i}"
            engine.add_request(rid, None, SamplingParams(temperature=0, max_tokens=out, ignore_eos=True),
                               prompt_token_ids=ids)
            arrivals[rid] = t0 + at
            times[rid] = []
            i += 1
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, reqs[i][0] - (time.perf_counter() - t0)))
            continue
        outs = engine.step()
        stamp = time.perf_counter()
        for d in outs:  # token deltas: stamp each new token of the first sequence
            ts = times[d.request_id]
            ts.extend([stamp] * sum(len(s.token_ids) for s in d.sequences if s.index == 0))
    res = summarize(times, arrivals, time.perf_counter(), t0)
    del engine
    return res


async def _one(stub, pb, common_pb2, rid, ids, out, times):
    req = pb.GenerateRequest(request_id=rid, token_ids=pb.TokenIds(ids=ids),
                             params=common_pb2.SamplingParams(temperature=0, max_tokens=out, ignore_eos=True))
    ts = times[rid]
    async for m in stub.Generate(req, timeout=900):
        now = time.perf_counter()
        for c in m.choices:
            ts.extend([now] * len(c.token_ids))


async def _drive(address, reqs) -> dict:
    import grpc

    from protos.gen.folio.v1 import common_pb2, router_pb2 as pb, router_pb2_grpc

    async with grpc.aio.insecure_channel(address) as ch:
        stub = router_pb2_grpc.RouterStub(ch)
        await _one(stub, pb, common_pb2, "warmup", [20, 21, 22], 4, {"warmup": []})
        times = {f"r{i}": [] for i in range(len(reqs))}
        t0 = time.perf_counter()
        arrivals = {f"r{i}": t0 + at for i, (at, _, _) in enumerate(reqs)}

        async def later(i, at, ids, out):
            await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
            await _one(stub, pb, common_pb2, f"r{i}", ids, out, times)

        await asyncio.gather(*[later(i, *r) for i, r in enumerate(reqs)])
        return summarize(times, arrivals, time.perf_counter(), t0)


def run_stack(args, model_dir, rates_reqs) -> list[dict]:
    from folio.stack import Stack, StackConfig
    from protos.generate import ensure_generated

    ensure_generated()
    flags = []
    for k, v in engine_kwargs(args, model_dir).items():
        if k == "model":
            continue
        if isinstance(v, bool):
            flags.append(("--" if v else "--no-") + k.replace("_", "-"))
        else:
            flags += ["--" + k.replace("_", "-"), str(v)]
    stack = Stack(StackConfig(engines=1, router_port=0, model=str(model_dir), engine_args=flags,
                              log_level="WARNING", startup_timeout_s=600))
    stack.start()
    try:
        return [asyncio.run(_drive(stack.router_address, reqs)) for reqs in rates_reqs]
    finally:
        stack.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3-8b", choices=list(SHAPES))
    ap.add_argument("--rates", type=float, nargs="+", default=[2.0, 8.0, 16.0], help="requests per second")
    ap.add_argument("--requests", type=int, default=96, help="requests per rate")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tokenizer-dir", default=None, help="where tokenizer.json is (default: the bundled model)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tok_dir = Path(args.tokenizer_dir) if args.tokenizer_dir else None
    if tok_dir is None:
        from services.common.bundled_model import ensure_bundled_model

        tok_dir = ensure_bundled_model(quiet=True)
    vocab = json.loads((tok_dir / "tokenizer.json").read_text())["model"]["vocab"]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_config(args.shape, Path(tmp))
        cfg = json.loads((model_dir / "config.json").read_text())
        cfg["vocab_size"] = len(vocab)  # generate only ids the tokenizer service can decode
        (model_dir / "config.json").write_text(json.dumps(cfg))
        for f in TOKENIZER_FILES:
            if (tok_dir / f).exists():
                shutil.copy(tok_dir / f, model_dir / f)
        rates_reqs = [make_requests(args.requests, r, len(vocab), seed=i) for i, r in enumerate(args.rates)]
        stack_res = run_stack(args, model_dir, rates_reqs)
        inproc_res = [run_in_process(args, model_dir, reqs) for reqs in rates_reqs]
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    rows = []
    print(f"\n{'rate':>6} {'path':<11}{'req/s':>7}{'tok/s':>8}{'TTFT p50':>10}{'TTFT p99':>10}{'ITL p50':>9}{'ITL p99':>9}  (ms)")
    for rate, s, p in zip(args.rates, stack_res, inproc_res):
        for label, r in (("in-process", p), ("stack", s)):
            print(f"{rate:>6g} {label:<11}{r['req_per_s']:>7.2f}{r['tok_per_s']:>8.0f}{r['ttft_ms']['p50']:>10.1f}"
                  f"{r['ttft_ms']['p99']:>10.1f}{r['itl_ms']['p50']:>9.2f}{r['itl_ms']['p99']:>9.2f}")
        add = {"ttft_ms_p50": s["ttft_ms"]["p50"] - p["ttft_ms"]["p50"], "itl_ms_p50": s["itl_ms"]["p50"] - p["itl_ms"]["p50"],
               "ttft_ms_p99": s["ttft_ms"]["p99"] - p["ttft_ms"]["p99"], "itl_ms_p99": s["itl_ms"]["p99"] - p["itl_ms"]["p99"]}
        print(f"{'':>6} {'hops add':<11}{'':>15}{add['ttft_ms_p50']:>10.1f}{add['ttft_ms_p99']:>10.1f}"
              f"{add['itl_ms_p50']:>9.2f}{add['itl_ms_p99']:>9.2f}")
        rows.append({"rate_req_s": rate, "in_process": p, "stack": s, "hops_add": add})
    record = {"device": name, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "command": "python bench/serving.py " + " ".join(sys.argv[1:]),
              "model_shape": args.shape, "vocab_size": len(vocab), "dtype": args.dtype,
              "requests_per_rate": args.requests, "rates": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"serving_{dt.date.today().isoformat()}_{args.shape}_{args.device.split(':')[0]}.json"
    path.write_text(json.dumps(record, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
