"""Quantized GEMMs on one GPU, on the Llama-3-8B layer shapes: W4A16 (kernels/w4a16.py) and FP8
(torch._scaled_mm, row-wise scales) against bf16 F.linear, after checking each against a torch reference.

    python bench/quant.py [--json bench/results/quant_<date>.json] [--quick]

Checks first (exits non-zero on a failure): W4A16 on every shape at M = 1, 16, 64, 256 (group 128, zero
points; one act-order case; a split-K case), against x @ dequant(w) in float32; the FP8 layer
(FP8Method.apply, dynamic per-token activations) against the same product on the FP8-rounded operands;
a CUDA-graph capture and replay of a W4A16 decode step. Then times, per M, the sum over one decoder
layer's four GEMMs (qkv, o, gate_up, down): bf16, W4A16 and FP8; the W4A16 / bf16 crossover is where
the speed-up column falls under 1. Then batch-1 decode through the whole engine (Llama-3-8B shape,
random weights, CUDA graphs): bf16, FP8 made at load, random 4-bit weights under a GPTQ config. A small
launch-config sweep for W4A16 at M = 1 and 256 closes. Sections that would pass 85 s are skipped (said so).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from triton.testing import do_bench  # noqa: E402

from kernels.w4a16 import dequantize_int4, pick_config, w4a16  # noqa: E402
from services.engine.model.quantization.fp8 import FP8Method, quantize_activation, quantize_weight_per_channel  # noqa: E402
from services.engine.model.quantization.int4 import pack_rows  # noqa: E402

DEV = torch.device("cuda")
HIDDEN, INTER, Q, KV = 4096, 14336, 4096, 1024
SHAPES = {"qkv": (HIDDEN, Q + 2 * KV), "o": (Q, HIDDEN), "gate_up": (HIDDEN, 2 * INTER), "down": (INTER, HIDDEN)}
"""name -> (K, N) of the Llama-3-8B linear layers."""
MS = (1, 16, 64, 256)
DTYPE = torch.bfloat16


def bench(fn) -> float:
    return do_bench(fn, warmup=10, rep=40, return_mode="median")


def rel_err(a, b) -> float:
    a, b = a.float(), b.float()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm()).item()


def int4_weights(k: int, n: int, group: int, act_order: bool, g: torch.Generator):
    q = torch.randint(0, 16, (k, n), generator=g, device=DEV)
    groups = k // group
    scales = (torch.rand(groups, n, generator=g, device=DEV) * 0.01 + 0.002).to(DTYPE)
    zeros = torch.randint(0, 16, (groups, n), generator=g, device=DEV).to(torch.uint8)
    perm = torch.randperm(k, generator=g, device=DEV).to(torch.int32) if act_order else None
    return pack_rows(q), scales, zeros, perm


class Layer:  # the attributes FP8Method.apply reads
    pass


def fp8_layer(w: torch.Tensor) -> tuple[Layer, FP8Method]:
    layer, method = Layer(), FP8Method("bench")
    layer.weight, layer.weight_scale = quantize_weight_per_channel(w)
    layer.weight_scale = layer.weight_scale.reshape(1, -1).contiguous()
    layer.input_scale = None
    return layer, method


def checks(failures: list) -> list[dict]:
    rows = []
    g = torch.Generator(device=DEV).manual_seed(0)
    for name, (k, n) in SHAPES.items():
        for m in MS:
            for act_order in ((False, True) if name == "o" and m == 16 else (False,)):
                qw, s, z, perm = int4_weights(k, n, 128, act_order, g)
                x = torch.randn(m, k, generator=g, device=DEV).to(DTYPE)
                w = dequantize_int4(qw, s, z, 128, k)
                xs = x[:, perm.long()] if perm is not None else x
                ref = xs.float() @ w
                err = rel_err(w4a16(x, qw, s, z, 128, perm), ref)
                split = pick_config(m, n, k, 128, DEV)["SPLIT_K"]
                ok = err < 2e-2
                rows.append({"check": "w4a16", "shape": name, "M": m, "act_order": act_order, "split_k": split,
                             "rel_err": err, "ok": ok})
                if not ok:
                    failures.append(rows[-1])
        w = torch.randn(n, k, generator=g, device=DEV).to(DTYPE) * 0.02
        layer, method = fp8_layer(w)
        for m in (1, 256):
            x = torch.randn(m, k, generator=g, device=DEV).to(DTYPE)
            xq, xs = quantize_activation(x, None, None)
            ref = (xq.float() * xs) @ (layer.weight.float() * layer.weight_scale.reshape(-1, 1)).t()
            err = rel_err(method.apply(layer, x, None), ref)
            ok = err < 1e-2
            rows.append({"check": "fp8_scaled_mm", "shape": name, "M": m, "rel_err": err, "ok": ok})
            if not ok:
                failures.append(rows[-1])
    return rows


def graph_check(failures: list) -> list[dict]:
    """A decode step's W4A16 GEMM (split-K: the down projection at M = 1) captured in a CUDA graph replays to
    the eager result on new input."""
    g = torch.Generator(device=DEV).manual_seed(3)
    k, n = SHAPES["down"]
    qw, s, z, _ = int4_weights(k, n, 128, False, g)
    x = torch.randn(1, k, generator=g, device=DEV).to(DTYPE)
    eager = w4a16(x, qw, s, z, 128)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        w4a16(x, qw, s, z, 128)  # warm up (compile) outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = w4a16(x, qw, s, z, 128)
    x.copy_(torch.randn(1, k, generator=g, device=DEV).to(DTYPE))
    graph.replay()
    torch.cuda.synchronize()
    err = rel_err(out, w4a16(x, qw, s, z, 128))
    ok = err < 1e-6 and not torch.equal(out, eager)
    row = {"check": "w4a16_cuda_graph", "shape": "down", "M": 1, "split_k": pick_config(1, n, k, 128, DEV)["SPLIT_K"],
           "rel_err": err, "ok": ok}
    if not ok:
        failures.append(row)
    return [row]


def timings() -> list[dict]:
    g = torch.Generator(device=DEV).manual_seed(1)
    weights = {}
    for name, (k, n) in SHAPES.items():
        w = (torch.randn(n, k, generator=g, device=DEV) * 0.02).to(DTYPE)
        weights[name] = (w, int4_weights(k, n, 128, False, g), fp8_layer(w))
    rows = []
    for m in MS:
        t = {"bf16": 0.0, "w4a16": 0.0, "fp8": 0.0}
        per = {}
        for name, (k, n) in SHAPES.items():
            w, (qw, s, z, _), (layer, method) = weights[name]
            x = torch.randn(m, k, generator=g, device=DEV).to(DTYPE)
            one = {"bf16": bench(lambda: F.linear(x, w)), "w4a16": bench(lambda: w4a16(x, qw, s, z, 128)),
                   "fp8": bench(lambda: method.apply(layer, x, None))}
            per[name] = one
            for key in t:
                t[key] += one[key]
        rows.append({"M": m, "ms": t, "per_shape_ms": per, "w4a16_speedup": t["bf16"] / t["w4a16"],
                     "fp8_speedup": t["bf16"] / t["fp8"]})
    return rows


LLAMA_3_8B = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", rms_norm_eps=1e-5,
                  hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=128, vocab_size=128256, rope_theta=500000.0,
                  max_position_embeddings=8192, tie_word_embeddings=False, torch_dtype="bfloat16")
W4A16_CONFIG = {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True, "desc_act": False}


def engine_decode(start: float, deadline: float) -> list[dict]:
    """Batch-1 decode latency of the whole engine: 128 prompt tokens, then (t(257 tokens) - t(1 token)) / 256."""
    from folio import LLM, SamplingParams

    rows = []
    for name in ("bf16", "w4a16", "fp8"):  # W4A16 before FP8: the budget skips the last first
        if time.time() - start > deadline:
            print(f"engine decode {name}: skipped (time budget)", flush=True)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            cfg = dict(LLAMA_3_8B, **({"quantization_config": W4A16_CONFIG} if name == "w4a16" else {}))
            (Path(tmp) / "config.json").write_text(json.dumps(cfg))
            t0 = time.time()
            llm = LLM(tmp, load_format="dummy", dtype="bfloat16", device=str(DEV), max_model_len=512, max_num_seqs=1,
                      gpu_memory_utilization=0.5, enable_prefix_caching=False,
                      quantization="fp8" if name == "fp8" else None)
            startup = time.time() - t0
            prompt = {"prompt_token_ids": list(range(1000, 1128))}

            def run(n):
                t = time.perf_counter()
                llm.generate([prompt], SamplingParams(max_tokens=n, ignore_eos=True), use_tqdm=False)
                return time.perf_counter() - t

            run(8)  # warm up
            one, full = min(run(1) for _ in range(2)), min(run(257) for _ in range(2))
            rows.append({"weights": name, "ms_per_token": (full - one) / 256 * 1e3, "startup_s": startup,
                         "weight_GB": llm.engine.runner.weight_bytes() / 1e9})
            llm.shutdown()
            del llm
            gc.collect()
            torch.cuda.empty_cache()
        print(f"engine decode {name}: {rows[-1]['ms_per_token']:.2f} ms/token, weights {rows[-1]['weight_GB']:.1f} GB "
              f"(startup {startup:.0f} s)", flush=True)
    return rows


def sweep() -> list[dict]:
    g = torch.Generator(device=DEV).manual_seed(2)
    k, n = SHAPES["gate_up"]
    qw, s, z, _ = int4_weights(k, n, 128, False, g)
    rows = []
    configs = [dict(BLOCK_M=16, BLOCK_N=n_, BLOCK_K=bk, num_warps=4, num_stages=st, SPLIT_K=sp)
               for n_, bk, st, sp in ((64, 128, 4, 1), (128, 128, 4, 1), (128, 128, 4, 2), (64, 128, 3, 4),
                                      (256, 64, 4, 1), (64, 64, 4, 2), (128, 64, 4, 1), (32, 128, 4, 1))]
    configs += [dict(BLOCK_M=bm, BLOCK_N=128, BLOCK_K=64, num_warps=w_, num_stages=3, SPLIT_K=1)
                for bm, w_ in ((64, 4), (128, 8), (128, 4))]
    for cfg in configs:
        for m in ((1,) if cfg["BLOCK_M"] == 16 else (256,)):
            x = torch.randn(m, k, generator=g, device=DEV).to(DTYPE)
            rows.append({"M": m, "config": cfg, "ms": bench(lambda: w4a16(x, qw, s, z, 128, config=cfg))})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true", help="checks only, no timings")
    args = ap.parse_args()
    start = time.time()
    failures: list = []
    check_rows = checks(failures) + graph_check(failures)
    print(f"{'check':<18}{'shape':<9}{'M':>5}  {'act_order':<10}{'split_k':>8}  {'rel_err':>10}  ok")
    for r in check_rows:
        print(f"{r['check']:<18}{r['shape']:<9}{r['M']:>5}  {str(r.get('act_order', '')):<10}"
              f"{str(r.get('split_k', '')):>8}  {r['rel_err']:>10.2e}  {r['ok']}")
    result = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(DEV) if DEV.type == "cuda" else "cpu",
              "torch": torch.__version__, "checks": check_rows, "failures": len(failures)}
    if not args.quick and not failures:
        result["timings"] = timings()
        print("\nOne Llama-3-8B decoder layer's GEMMs (qkv + o + gate_up + down), median ms; speed-up vs bf16:")
        print(f"{'M':>5}  {'bf16':>8}  {'w4a16':>8}  {'fp8':>8}  {'w4a16 x':>8}  {'fp8 x':>7}")
        for r in result["timings"]:
            t = r["ms"]
            print(f"{r['M']:>5}  {t['bf16']:>8.4f}  {t['w4a16']:>8.4f}  {t['fp8']:>8.4f}  {r['w4a16_speedup']:>8.2f}  "
                  f"{r['fp8_speedup']:>7.2f}")
        cross = [r["M"] for r in result["timings"] if r["w4a16_speedup"] < 1]
        print(f"W4A16 slower than bf16 from M = {cross[0]}" if cross else "W4A16 faster than bf16 at every M measured")
        print()
        result["engine_decode"] = engine_decode(start, deadline=55)
        base = next((r for r in result["engine_decode"] if r["weights"] == "bf16"), None)
        print("\nBatch-1 decode, whole engine (Llama-3-8B shape, random weights, CUDA graphs):")
        print(f"{'weights':<8}{'ms/token':>10}{'speed-up':>10}{'weight GB':>11}")
        for r in result["engine_decode"]:
            up = f"{base['ms_per_token'] / r['ms_per_token']:.2f}x" if base else "-"
            print(f"{r['weights']:<8}{r['ms_per_token']:>10.2f}{up:>10}{r['weight_GB']:>11.1f}")
        if time.time() - start < 75:
            result["sweep"] = sweep()
            print("\nW4A16 launch configs on gate_up (K 4096, N 28672):")
            for r in result["sweep"]:
                print(f"  M={r['M']:<4} {r['config']}  {r['ms']:.4f} ms")
        else:
            print("\nlaunch-config sweep: skipped (time budget)")
    result["seconds"] = round(time.time() - start, 1)
    path = args.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                     f"quant_{result['date']}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\n{len(failures)} check failure(s); {result['seconds']} s; wrote {path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
