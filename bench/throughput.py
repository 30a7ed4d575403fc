"""Offline throughput on one GPU: Folio and transformers `generate` on the same random-weight model shape,
the same prompts, in one run. Prints a table and appends one JSON record per (shape, workload) run.

    python bench/throughput.py --shape llama-3-8b --workload fixed chat
    python bench/throughput.py --shape tiny --device cpu --workload fixed --requests 8   # smoke test
    python bench/throughput.py --shape llama-3-8b --workload fixed --no-hf --tensor-parallel-size 2   # 2 GPUs
    python bench/throughput.py --shape llama-3-8b llama-3.2-1b --workload fixed many --no-hf --compare-async

Workloads
  fixed: 256 prompts x 256 random input tokens, 256 output tokens each (ignore_eos).
  many:  the fixed shape at large concurrency: 1,024 prompts x 256 in / 256 out, max_num_seqs 1,024 unless
         --max-num-seqs says otherwise (host overhead per step grows with the batch; see docs/engine.md).
  chat:  1,000 requests; input and output lengths drawn (seeded) from log-normals with means near 200 and 180,
         capped at 1,024, each request ending at its own sampled length (max_tokens, ignore_eos).
transformers runs static batches (the largest that fits, left-padded), each batch generating up to its
longest request; only each request's own tokens count as output. `--hf-requests N` runs transformers on
the first N requests only (its tok/s is then measured on that subset; the record says so).
`--compare-async` times Folio with asynchronous scheduling off, then on, on one engine, and prints both,
their ratio and the host milliseconds per step of each (every step phase but the wait on the device).

Roofline: the time an ideal engine needs on this GPU, from ceilings measured in the same run (device copy
bandwidth, bf16 matmul rate): every decode step reads all weights plus the live KV cache once
(bytes / copy bandwidth) under ideal continuous batching at max_num_seqs, and prefill costs its FLOPs
at the matmul rate. roofline_fraction = roofline time / Folio's time.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.step_trace import StepTrace  # noqa: E402

SHAPES = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, rope_theta=500000.0,
                         max_position_embeddings=131072, tie_word_embeddings=True,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, head_dim=128, vocab_size=128256, rope_theta=500000.0,
                       max_position_embeddings=8192, tie_word_embeddings=False),
    # Other families (docs/models.md): their own architecture names, real shapes.
    "qwen3-8b": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=4096,
                     intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128, vocab_size=151936, rope_theta=1000000.0, max_position_embeddings=40960,
                     tie_word_embeddings=False, rms_norm_eps=1e-6),
    "gemma-2-9b": dict(architectures=["Gemma2ForCausalLM"], model_type="gemma2", hidden_size=3584,
                       intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=256, vocab_size=256000, rope_theta=10000.0, max_position_embeddings=8192,
                       tie_word_embeddings=True, sliding_window=4096, attn_logit_softcapping=50.0,
                       final_logit_softcapping=30.0, query_pre_attn_scalar=256, hidden_activation="gelu_pytorch_tanh",
                       rms_norm_eps=1e-6),
    "phi-3-mini": dict(architectures=["Phi3ForCausalLM"], model_type="phi3", hidden_size=3072,
                       intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                       head_dim=96, vocab_size=32064, rope_theta=10000.0, max_position_embeddings=4096,
                       tie_word_embeddings=False),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, vocab_size=1000, rope_theta=10000.0,
                 max_position_embeddings=4096, tie_word_embeddings=False),
}


COARSE_MIXED_BUCKETS = (*range(16, 256, 16), *range(256, 512, 32), *range(512, 1024, 64), *range(1024, 4096, 128),
                        *range(4096, 8193, 512))
"""cuda_graphs.MIXED_BUCKETS before 2026-11-29 (--coarse-mixed-buckets, for A/B runs)."""

W4A16_CONFIG = {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True, "desc_act": False}
"""--quantization w4a16: random 4-bit weights (load_format dummy) under a GPTQ config, run by kernels/w4a16.py."""


def write_config(shape: str, directory: Path, quantization: str = "none") -> Path:
    cfg = dict(dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", rms_norm_eps=1e-5,
                    bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16", attention_bias=False), **SHAPES[shape])
    if quantization == "w4a16":
        cfg["quantization_config"] = W4A16_CONFIG
    (directory / "config.json").write_text(json.dumps(cfg))
    return directory


# --- workloads ---------------------------------------------------------------------------------------
def make_workload(name: str, vocab: int, requests: int | None, seed: int = 0):
    """[(prompt_token_ids, output_len)]"""
    rng = np.random.default_rng(seed)
    if name in ("fixed", "many"):
        n = requests or (256 if name == "fixed" else 1024)
        return [(rng.integers(3, vocab, 256).tolist(), 256) for _ in range(n)]
    n = requests or 1000
    # Log-normals with sigma 1 (long tail); mu set so the capped means land near 200 in / 180 out.
    ins = np.minimum(np.maximum(rng.lognormal(math.log(200) - 0.5, 1.0, n), 4), 1024).astype(int)
    outs = np.minimum(np.maximum(rng.lognormal(math.log(180) - 0.5, 1.0, n), 4), 1024).astype(int)
    return [(rng.integers(3, vocab, int(i)).tolist(), int(o)) for i, o in zip(ins, outs)]


# --- ceilings ----------------------------------------------------------------------------------------
def measure_ceilings(device, repeats: int = 5) -> dict:
    """The device's copy rate (GB/s, read + write) and bf16 matmul rate (TFLOP/s): the best of `repeats`
    timings each. A ceiling is what the device can do, so noise (clocks ramping, a neighbour) only lowers
    a sample; one short sample measured 740-805 TFLOP/s on the same kind of H200 and moved the roofline
    fraction of a run by several points."""
    if device.type != "cuda":
        return {"copy_GBps": float("nan"), "matmul_TFLOPs": float("nan")}
    from triton.testing import do_bench

    a = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    ms = min(do_bench(lambda: b.copy_(a), warmup=25, rep=100) for _ in range(repeats))
    copy = 2 * a.numel() / ms / 1e6
    del a, b
    x = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    y = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    ms = min(do_bench(lambda: x @ y, warmup=25, rep=100) for _ in range(repeats))
    return {"copy_GBps": copy, "matmul_TFLOPs": 2 * 8192**3 / ms / 1e9}


def model_bytes_and_flops(cfg: dict, dtype_bytes: int = 2) -> tuple[int, int, int]:
    """(weight bytes read per decode step, matmul params per token (for 2*P FLOPs), KV bytes per token)."""
    d, f, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    hq, hkv, hd, V = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"], cfg["vocab_size"]
    per_layer = d * (hq + 2 * hkv) * hd + hq * hd * d + 3 * d * f
    matmul_params = L * per_layer + V * d  # LM head included; the embedding is a gather
    weight_bytes = matmul_params * dtype_bytes  # what one decode step must read
    kv_per_token = 2 * L * hkv * hd * dtype_bytes
    return weight_bytes, matmul_params, kv_per_token


def ideal_roofline_seconds(work, cfg, max_batch, ceil) -> float:
    """Lower bound on the workload's time: ideal continuous batching at max_batch sequences."""
    W, P, kv_tok = model_bytes_and_flops(cfg)
    L, hq, hd = cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["head_dim"]
    bw, mm = ceil["copy_GBps"] * 1e9, ceil["matmul_TFLOPs"] * 1e12
    prefill_flops = sum(2 * P * len(p) + 2 * L * hq * hd * len(p) ** 2 for p, _ in work)  # causal QK^T + PV
    # Decode: each request needs (out - 1) decode steps after its prefill produced the first token.
    queue = [(len(p), o - 1) for p, o in work if o > 1]
    active: list[list[int]] = []
    decode_s, qi = 0.0, 0
    while qi < len(queue) or active:
        while len(active) < max_batch and qi < len(queue):
            ctx, left = queue[qi]
            active.append([ctx + 1, left])
            qi += 1
        kv = sum(a[0] for a in active) * kv_tok
        decode_s += (W + kv) / bw
        for a in active:
            a[0] += 1
            a[1] -= 1
        active = [a for a in active if a[1] > 0]
    return decode_s + prefill_flops / mm


# --- runs --------------------------------------------------------------------------------------------
def run_folio(model_dir, work, args, max_num_seqs: int, modes: list[bool | None]) -> list[tuple[int, float, dict, list]]:
    """One engine; one timed run per asynchronous-scheduling mode in `modes` (None: the engine's default),
    switched on the same engine between runs so a comparison pays one startup. Host time per step comes
    from the engine's step timing (no GPU sync): every phase but "wait" (blocked on the device)."""
    from folio import LLM, SamplingParams

    max_len = max(len(p) + o for p, o in work) + 16
    t0 = time.perf_counter()
    options = dict(load_format="dummy", dtype=args.dtype, device=args.device, max_model_len=max_len,
                   max_num_seqs=max_num_seqs, gpu_memory_utilization=args.gpu_memory_utilization,
                   enable_prefix_caching=False, tensor_parallel_size=args.tensor_parallel_size,
                   async_scheduling=not args.no_async_scheduling,
                   quantization="fp8" if args.quantization == "fp8" else None)
    options.update(engine_option(o) for o in args.engine_option)
    llm = LLM(str(model_dir), **options)
    startup = time.perf_counter() - t0
    engine = llm.engine
    waste = []
    schedule = engine.scheduler.schedule
    calls = [0]

    def spy():
        # KV waste sampled every 16th step: two passes over the batch inside the timed "schedule"
        # phase each step would add their own host time (~0.3 ms at 256 sequences) to what is measured.
        out = schedule()
        calls[0] += 1
        if calls[0] % 16:
            return out
        held = sum(engine.blocks.num_held_blocks(s.seq.seq_id) for s in out.scheduled) * engine.blocks.block_size
        used = sum(s.seq.num_computed_tokens + s.num_new_tokens for s in out.scheduled)
        if held:
            waste.append((held - used) / held)
        return out

    engine.scheduler.schedule = spy
    params = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for _, o in work]
    llm.generate([p for p, _ in work[:4]], [SamplingParams(max_tokens=4, ignore_eos=True)] * 4, use_tqdm=False)
    results = []
    for mode in modes:
        if mode is not None:
            engine.async_scheduling = mode
        waste.clear()
        preempted, steady = engine.scheduler.num_preemptions, engine.scheduler.num_steady_steps
        engine.step_timing = {}
        trace = StepTrace(engine) if args.trace else None
        sync(args)
        t = time.perf_counter()
        if args.profile:
            import cProfile
            import pstats

            prof = cProfile.Profile()
            outs = prof.runcall(llm.generate, [p for p, _ in work], params, use_tqdm=False)
            pstats.Stats(prof).sort_stats("tottime").print_stats(30)
        else:
            outs = llm.generate([p for p, _ in work], params, use_tqdm=False)
        sync(args)
        secs = time.perf_counter() - t
        trace_kinds = trace.print_table(f"async_scheduling={engine.async_scheduling}") if trace else None
        if trace:
            trace.detach()
            trace = None  # it holds the engine: let the engine go with the run
        n_out = sum(len(o.outputs[0].token_ids) for o in outs)
        digest = hashlib.sha1(np.asarray([t for o in outs for t in o.outputs[0].token_ids], np.int64).tobytes())
        assert n_out == sum(o for _, o in work), "every request must end at its own length"
        timing = dict(engine.step_timing)
        steps = timing.pop("steps", 0) or 1
        per_step = {k: 1e3 * v / steps for k, v in timing.items()}
        host_ms = sum(v for k, v in per_step.items() if k != "wait")
        label = f"async_scheduling={engine.async_scheduling}"
        steady = engine.scheduler.num_steady_steps - steady
        print(f"{label}: output tokens sha1 {digest.hexdigest()[:12]} (greedy: equal across runs of the same "
              "workload when the kernels compute the same tokens)")
        print(f"{label}: {n_out / secs:.0f} output tok/s, {steps} steps ({steady} steady), "
              f"{1e3 * secs / steps:.2f} ms/step, "
              f"host {host_ms:.2f} ms/step (" + ", ".join(f"{k} {v:.2f}" for k, v in per_step.items()) + ")",
              flush=True)
        results.append((n_out, secs, {
            "kv_blocks": engine.blocks.num_blocks, "startup_s": startup, "max_num_seqs": max_num_seqs,
            "async_scheduling": engine.async_scheduling, "steps": steps, "steady_steps": steady,
            "ms_per_step": 1e3 * secs / steps,
            "host_ms_per_step": host_ms, "step_timing_ms": per_step,
            "kv_waste_mean": float(np.mean(waste)) if waste else 0.0,
            "preemptions": engine.scheduler.num_preemptions - preempted, "step_trace": trace_kinds,
            "tokens_sha1": digest.hexdigest(),
            "tensor_parallel_size": args.tensor_parallel_size}, [o.outputs[0].token_ids for o in outs]))
        del outs
    engine.step_timing = None
    llm.shutdown()  # tensor-parallel workers, if any
    del llm, engine
    free(args)
    return results


def run_hf(model_dir, work, args):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model_dir)
    dtype = getattr(torch, args.dtype)
    torch.set_default_dtype(dtype)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(cfg).eval()
    torch.set_default_dtype(torch.float32)
    work = work[:args.hf_requests] if args.hf_requests else work
    batch = args.hf_batch
    n_out, secs = 0, 0.0
    i = 0
    while i < len(work):
        chunk = work[i:i + batch]
        width = max(len(p) for p, _ in chunk)
        ids = torch.full((len(chunk), width), 0, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, (p, _) in enumerate(chunk):
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        new = max(o for _, o in chunk)
        try:
            sync(args)
            t = time.perf_counter()
            with torch.no_grad():
                model.generate(input_ids=ids.to(args.device), attention_mask=mask.to(args.device),
                               max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
            sync(args)
        except torch.OutOfMemoryError:
            free(args)
            batch //= 2
            print(f"transformers: out of memory, batch -> {batch}", flush=True)
            if batch == 0:
                raise
            continue
        secs += time.perf_counter() - t
        n_out += sum(o for _, o in chunk)
        i += len(chunk)
    del model
    free(args)
    return n_out, secs, {"hf_batch": batch, "hf_requests": len(work)}


def save_tokens(path: str, tokens: list) -> None:
    lengths = np.asarray([len(t) for t in tokens], np.int64)
    np.savez_compressed(path, tokens=np.asarray([t for ts in tokens for t in ts], np.int32), lengths=lengths)
    print(f"output tokens of {len(tokens)} requests written to {path}", flush=True)


def compare_tokens(path: str, tokens: list, work) -> dict:
    """Where this run's tokens part from a saved run's: per differing request its index, prompt length, output
    length and first differing position. Greedy on random weights: a kernel that rounds differently flips
    near-ties late in a few requests; a wrong kernel makes most requests differ early."""
    saved = np.load(path)
    ends = np.cumsum(saved["lengths"])
    old = np.split(saved["tokens"], ends[:-1])
    if len(old) != len(tokens):
        raise SystemExit(f"--compare-tokens: {path} holds {len(old)} requests, this run {len(tokens)}")
    diffs = []
    for i, (a, b) in enumerate(zip(old, tokens)):
        b = np.asarray(b, np.int32)
        if len(a) != len(b) or not np.array_equal(a, b):
            n = min(len(a), len(b))
            first = int(np.argmax(a[:n] != b[:n])) if not np.array_equal(a[:n], b[:n]) else n
            diffs.append(dict(request=i, prompt_len=len(work[i][0]), output_len=int(len(b)), first_diff=first))
    print(f"tokens vs {path}: {len(tokens) - len(diffs)}/{len(tokens)} requests identical", flush=True)
    for d in diffs[:40]:
        print(f"  request {d['request']}: prompt {d['prompt_len']}, output {d['output_len']}, "
              f"first differs at output position {d['first_diff']}", flush=True)
    return dict(identical=len(tokens) - len(diffs), requests=len(tokens), differing=diffs)


def engine_option(text: str) -> tuple[str, object]:
    """NAME=VALUE -> (NAME, VALUE as an int, float or bool where it reads as one); NAME must be an EngineConfig field."""
    import dataclasses

    from services.engine.config import EngineConfig

    name, sep, raw = text.partition("=")
    if not sep or name not in {f.name for f in dataclasses.fields(EngineConfig)}:
        raise SystemExit(f"--engine-option: {text!r} is not NAME=VALUE with NAME an EngineConfig field")
    for conv in (int, float):
        try:
            return name, conv(raw)
        except ValueError:
            pass
    return name, {"true": True, "false": False}.get(raw.lower(), raw)


def dense_dispatch_on() -> bool:
    """Whether the engine's measured GEMM table applied (FOLIO_DENSE_GEMM=0 turns it off for A/B runs)."""
    from services.engine.model.layers import dense_dispatch

    return dense_dispatch.enabled()


def sync(args):
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()


def free(args):
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", nargs="+", default=["llama-3.2-1b", "llama-3-8b"], choices=list(SHAPES))
    ap.add_argument("--workload", nargs="+", default=["fixed", "chat"], choices=["fixed", "chat", "many"])
    ap.add_argument("--requests", type=int, default=None, help="override the request count (smoke tests)")
    ap.add_argument("--hf-requests", type=int, default=None)
    ap.add_argument("--hf-batch", type=int, default=256)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--profile", action="store_true", help="run Folio under cProfile and print where the time goes")
    ap.add_argument("--step-timing", action="store_true",
                    help="accepted for old command lines: the host time of each step phase is always printed")
    ap.add_argument("--trace", action="store_true",
                    help="time each step's launch with CUDA events and print device time and idle gaps by step kind")
    ap.add_argument("--compare-async", action="store_true",
                    help="run Folio with asynchronous scheduling off and on (one engine) and print the ratio")
    ap.add_argument("--no-async-scheduling", action="store_true", help="run Folio with asynchronous scheduling off")
    ap.add_argument("--repeat", type=int, default=1,
                    help="time the workload this many times on one engine (a record each, run_index 0, 1, ...): "
                         "run 0 is a fresh engine's first run, the figure reported; later runs show what is left "
                         "of first-use costs (graph uploads, allocator growth) and the run-to-run spread")
    ap.add_argument("--engine-option", action="append", default=[], metavar="NAME=VALUE",
                    help="any other EngineConfig field for Folio's engine (repeatable), e.g. max_mixed_graph_tokens=8192")
    ap.add_argument("--coarse-mixed-buckets", action="store_true",
                    help="A/B: mixed-step graphs at the token buckets used before 2026-11-29 (every 32 tokens from 256, "
                         "64 from 512, 128 from 1,024; services/engine/cuda_graphs.py has the current ones)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--max-num-seqs", type=int, default=None, help="default 256 (1,024 for the many workload)")
    ap.add_argument("--tensor-parallel-size", type=int, default=1,
                    help="shard Folio's model over this many GPUs (the roofline then assumes their summed ceilings)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--quantization", default="none", choices=["none", "fp8", "w4a16"],
                    help="weights: bf16 (none), FP8 made at load, or random GPTQ-layout 4-bit (docs/quantization.md)")
    ap.add_argument("--save-tokens", metavar="PATH",
                    help="write the first run's output token ids per request (npz) for a later --compare-tokens")
    ap.add_argument("--compare-tokens", metavar="PATH",
                    help="compare each run's greedy tokens with a --save-tokens file of the same workload: how many "
                         "requests differ, and where each first differs")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "throughput.jsonl"))
    args = ap.parse_args()
    if (args.save_tokens or args.compare_tokens) and len(args.shape) * len(args.workload) != 1:
        ap.error("--save-tokens and --compare-tokens take one --shape and one --workload")
    if args.coarse_mixed_buckets:
        from services.engine import cuda_graphs

        cuda_graphs.MIXED_BUCKETS = COARSE_MIXED_BUCKETS
    if args.quantization == "w4a16" and not args.no_hf:
        ap.error("--quantization w4a16 needs --no-hf (transformers reads GPTQ configs only through gptqmodel)")
    dev = torch.device(args.device)
    ceil = measure_ceilings(dev)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"device {name}: copy {ceil['copy_GBps']:.0f} GB/s, bf16 matmul {ceil['matmul_TFLOPs']:.0f} TFLOP/s", flush=True)
    rows = []
    for shape in args.shape:
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = write_config(shape, Path(tmp), args.quantization)
            for wl in args.workload:
                work = make_workload(wl, SHAPES[shape]["vocab_size"], args.requests)
                max_seqs = args.max_num_seqs or (1024 if wl == "many" else 256)
                modes = ([False, True] if args.compare_async else [None]) * args.repeat
                runs = run_folio(model_dir, work, args, max_seqs, modes)
                if args.no_hf:
                    h_n, h_s, h_info = 0, float("nan"), {}
                else:
                    h_n, h_s, h_info = run_hf(model_dir, work, args)
                hf_tps = h_n / h_s if h_n else float("nan")
                roof_s = ideal_roofline_seconds(work, SHAPES[shape], max_seqs, ceil) / args.tensor_parallel_size
                if args.quantization != "none":  # the roofline counts bf16 weight bytes
                    roof_s = float("nan")
                if args.save_tokens:
                    save_tokens(args.save_tokens, runs[0][3])
                for run_index, (f_n, f_s, f_info, tokens) in enumerate(runs):
                    if args.compare_tokens:
                        f_info = dict(f_info, tokens_diff=compare_tokens(args.compare_tokens, tokens, work))
                    folio_tps = f_n / f_s
                    rec = {"run_index": run_index,
                        "device": name, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                        "command": "python bench/throughput.py " + " ".join(sys.argv[1:]),
                        "dense_dispatch_table": dense_dispatch_on(),
                        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("FOLIO_")},
                        "model_shape": shape, "workload": wl, "requests": len(work), "quantization": args.quantization,
                        "input_tokens": sum(len(p) for p, _ in work), "output_tokens": f_n,
                        "folio_output_tok_s": folio_tps, "hf_output_tok_s": hf_tps,
                        "ratio": folio_tps / hf_tps if h_n else None,
                        "roofline_fraction": roof_s / f_s if math.isfinite(roof_s) else None,
                        "roofline_output_tok_s": f_n / roof_s if roof_s and math.isfinite(roof_s) else None,
                        "folio_seconds": f_s, "hf_seconds": h_s, **f_info, **h_info, **ceil,
                    }
                    rows.append(rec)
                    print(json.dumps(rec), flush=True)
                if args.compare_async:
                    (_, off_s, off, off_tok), (_, on_s, on, on_tok) = runs[:2]
                    same = sum(a == b for a, b in zip(off_tok, on_tok))
                    # Greedy on random weights in bf16: a different batch make-up at some step can flip a
                    # near-tie, so a few differing requests are possible; a broken device-side input fill
                    # makes nearly every request differ from its second token on.
                    print(f"{shape} {wl}: greedy tokens identical with async on and off for {same}/{len(off_tok)} "
                          "requests", flush=True)
                    print(f"{shape} {wl}: async scheduling on/off = {off_s / on_s:.3f}x output tok/s; host ms/step "
                          f"{off['host_ms_per_step']:.2f} (off) vs {on['host_ms_per_step']:.2f} (on); ms/step "
                          f"{off['ms_per_step']:.2f} (off) vs {on['ms_per_step']:.2f} (on)", flush=True)
    print(f"\n{'shape':<14}{'workload':<9}{'async':>6}{'folio tok/s':>12}{'hf tok/s':>10}{'ratio':>8}{'roofline':>10}"
          f"{'kv waste':>10}{'host ms/step':>13}{'ms/step':>9}")
    for r in rows:
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] else "-"
        roof = f"{r['roofline_fraction']:.0%}" if r["roofline_fraction"] else "-"
        print(f"{r['model_shape']:<14}{r['workload']:<9}{'on' if r['async_scheduling'] else 'off':>6}"
              f"{r['folio_output_tok_s']:>12.0f}{r['hf_output_tok_s']:>10.0f}{ratio:>8}{roof:>10}{r['kv_waste_mean']:>10.1%}"
              f"{r['host_ms_per_step']:>13.2f}{r['ms_per_step']:>9.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"appended {len(rows)} records to {out}")


if __name__ == "__main__":
    main()
