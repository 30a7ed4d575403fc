"""Grammar-engine benchmark: token-mask time per decode step for xgrammar and llguidance at batch 1/16/64.

Both libraries walk the same token sequence (a valid instance of the schema, tokenized by the bundled
model's tokenizer) for every row of the batch, so each step asks for the same work: fill one bitmask
row per request, then advance each matcher by its token. Reported per library and batch size:
compile time (cold, first schema), mask time per step (sequential fill and the library's parallel batch
fill), per token, accept time, and the torch time to apply the [B, V] bitmask to float32 logits.

    .venv/bin/python bench/structured.py            # prints a table, writes bench/results/structured_cpu_<date>.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string"},
        "role": {"type": "string", "enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string"}, "city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["street", "city"],
        },
        "score": {"type": "number"},
    },
    "required": ["name", "age", "role", "tags", "address"],
    "additionalProperties": False,
}
INSTANCE = {
    "name": "Ada Lovelace",
    "age": 36,
    "email": "ada@example.org",
    "role": "admin",
    "tags": ["math", "engines", "poetry"],
    "address": {"street": "12 St James's Square", "city": "London", "zip": "SW1Y 4JH"},
    "score": 98.5,
}


def _hf_tokenizer(model_dir: Path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"))


class XGrammar:
    name = "xgrammar"

    def __init__(self, hf_tok, vocab: int, eos: int):
        import xgrammar as xgr

        self.xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(hf_tok, vocab_size=vocab, stop_token_ids=[eos])
        self.compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        self.vocab = vocab
        self.batch = xgr.BatchGrammarMatcher()

    def compile(self, schema: str):
        return self.compiler.compile_json_schema(schema, any_whitespace=False, separators=(",", ":"))

    def matchers(self, compiled, n: int):
        return [self.xgr.GrammarMatcher(compiled) for _ in range(n)]

    def bitmask(self, n: int):
        return self.xgr.allocate_token_bitmask(n, self.vocab)

    def fill_seq(self, ms, bm):
        for i, m in enumerate(ms):
            m.fill_next_token_bitmask(bm, i)

    def fill_par(self, ms, bm):
        self.batch.batch_fill_next_token_bitmask(ms, bm)

    def accept(self, ms, tok: int):
        for m in ms:
            assert m.accept_token(tok), f"xgrammar rejected token {tok}"

    def apply(self, logits, bm):
        self.xgr.apply_token_bitmask_inplace(logits, bm)


class LLGuidance:
    name = "llguidance"

    def __init__(self, hf_tok, vocab: int, eos: int):
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.ll = llguidance
        self.llt = llguidance.torch
        self.tok = llguidance.hf.from_tokenizer(hf_tok, n_vocab=vocab, eos_token=eos)
        self.vocab = vocab
        self.executor = llguidance.LLExecutor()

    def compile(self, schema: str):
        grammar = self.ll.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
        )
        m = self.ll.LLMatcher(self.tok, grammar)  # compiles the lexer; errors show here
        assert not m.is_error(), m.get_error()
        return grammar

    def matchers(self, grammar, n: int):
        return [self.ll.LLMatcher(self.tok, grammar) for _ in range(n)]

    def bitmask(self, n: int):
        return self.llt.allocate_token_bitmask(n, self.vocab)

    def fill_seq(self, ms, bm):
        for i, m in enumerate(ms):
            self.llt.fill_next_token_bitmask(m, bm, i)

    def fill_par(self, ms, bm):
        self.llt.fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(ms)], bm)

    def accept(self, ms, tok: int):
        for m in ms:
            assert m.consume_token(tok), f"llguidance rejected token {tok}: {m.get_error()}"

    def apply(self, logits, bm):
        self.llt.apply_token_bitmask_inplace(logits, bm)


def _median_ms(xs: list[float]) -> float:
    return round(statistics.median(xs) * 1e3, 4)


def run_one(lib, tokens: list[int], batch: int) -> dict:
    schema = json.dumps(SCHEMA)
    t0 = time.perf_counter()
    compiled = lib.compile(schema)
    compile_s = time.perf_counter() - t0
    out = {"library": lib.name, "batch": batch, "steps": len(tokens), "compile_ms": round(compile_s * 1e3, 2)}
    for mode in ("seq", "par"):
        ms = lib.matchers(compiled, batch)
        bm = lib.bitmask(batch)
        fill, accept = [], []
        for tok in tokens:
            t0 = time.perf_counter()
            (lib.fill_seq if mode == "seq" else lib.fill_par)(ms, bm)
            t1 = time.perf_counter()
            lib.accept(ms, tok)
            t2 = time.perf_counter()
            fill.append(t1 - t0)
            accept.append(t2 - t1)
        out[f"mask_ms_per_step_{mode}"] = _median_ms(fill)
        out[f"mask_us_per_token_{mode}"] = round(statistics.median(fill) * 1e6 / batch, 2)
        out[f"accept_ms_per_step_{mode}"] = _median_ms(accept)
    logits = torch.randn(batch, lib.vocab)
    bm = lib.bitmask(batch)
    lib.fill_seq(lib.matchers(compiled, batch), bm)
    times = []
    for _ in range(20):
        x = logits.clone()
        t0 = time.perf_counter()
        lib.apply(x, bm)
        times.append(time.perf_counter() - t0)
    out["apply_ms_cpu"] = _median_ms(times)
    return out


def engine_throughput(batches: list[int], max_tokens: int) -> list[dict]:
    """Output tok/s of the offline engine (bundled model, CPU) with and without a JSON schema, per batch
    size: the same prompts, greedy, EOS ignored so both runs generate exactly batch x max_tokens tokens
    (the schema run's EOS is allowed only where the schema is complete, so it is the same count)."""
    from folio import LLM, SamplingParams
    from services.common.structured_output import StructuredOutputs

    llm = LLM(max_model_len=1024, dtype="float32", device="cpu")
    so = StructuredOutputs.from_schema(SCHEMA, "schema")
    llm.generate(["warm up"], SamplingParams(max_tokens=2, structured_outputs=so), use_tqdm=False)
    rows = []
    for b in batches:
        prompts = [f"Person number {i} as JSON:" for i in range(b)]
        row = {"batch": b, "max_tokens": max_tokens}
        for name, constraint in (("plain", None), ("json_schema", so)):
            params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True,
                                    structured_outputs=constraint)
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            dt = time.perf_counter() - t0
            n = sum(len(c.token_ids) for o in outs for c in o.outputs)
            row[f"{name}_tok_s"] = round(n / dt, 1)
            row[f"{name}_tokens"] = n
        row["ratio"] = round(row["json_schema_tok_s"] / row["plain_tok_s"], 3)
        rows.append(row)
        print(row, flush=True)
    return rows


def main() -> None:
    from services.common.bundled_model import bundled_model_dir
    from services.common.tokenizer import Tokenizer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory (default: the bundled SmolLM2)")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--engine", action="store_true",
                    help="also measure the offline engine's output tok/s with and without a schema")
    ap.add_argument("--engine-batches", default="1,16")
    ap.add_argument("--engine-max-tokens", type=int, default=24)
    ap.add_argument("--out", default=f"bench/results/structured_cpu_{time.strftime('%Y-%m-%d')}.json")
    args = ap.parse_args()

    model_dir = Path(args.model) if args.model else bundled_model_dir()
    tok = Tokenizer(model_dir)
    hf_tok = _hf_tokenizer(model_dir)
    vocab = tok.vocab_size
    eos = next(iter(tok.eos_token_ids))
    tokens = tok.encode(json.dumps(INSTANCE, separators=(",", ":")), add_special_tokens=False) + [eos]
    libs = [XGrammar(hf_tok, vocab, eos), LLGuidance(hf_tok, vocab, eos)]
    rows = [run_one(lib, tokens, b) for b in map(int, args.batches.split(",")) for lib in libs]

    cols = ["library", "batch", "compile_ms", "mask_ms_per_step_seq", "mask_ms_per_step_par",
            "mask_us_per_token_par", "accept_ms_per_step_par", "apply_ms_cpu"]
    print(f"model {model_dir.name}, vocab {vocab}, {len(tokens)} tokens per sequence, {os.cpu_count()} CPUs")
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r[c]) for c in cols))
    result = {
        "model": model_dir.name, "vocab": vocab, "tokens": len(tokens), "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(), "schema": SCHEMA, "rows": rows,
        "versions": {"xgrammar": _version("xgrammar"), "llguidance": _version("llguidance"), "torch": torch.__version__},
    }
    if args.engine:
        result["engine"] = engine_throughput(list(map(int, args.engine_batches.split(","))), args.engine_max_tokens)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


def _version(pkg: str) -> str:
    from importlib.metadata import version

    return version(pkg)


if __name__ == "__main__":
    main()
