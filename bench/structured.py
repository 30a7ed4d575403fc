"""Grammar-engine benchmark: token-mask time per decode step for xgrammar and llguidance at batch 1/16/64.

Both libraries walk the same token sequence (a valid instance of the schema, tokenized by the bundled
model's tokenizer) for every row of the batch, so each step asks for the same work: fill one bitmask
row per request, then advance each matcher by its token. Reported per library and batch size:
compile time (cold, first schema), mask time per step (sequential fill and the library's parallel batch
fill), per token, accept time, and the torch time to apply the [B, V] bitmask to float32 logits.

    .venv/bin/python bench/structured.py            # prints a table, writes bench/results/structured_cpu_<date>.json
    .venv/bin/python bench/structured.py --engine   # also the offline engine's tok/s with and without a schema (CPU)
    python bench/structured.py --gpu                # one GPU: Llama-3-8B shape, dummy weights, tok/s at batch 1/16/64

The engine tok/s runs alternate plain and schema runs and also report tok/s per CPU-second of the
process, so a shared CPU disturbs the ratio less than wall-clock time alone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, as the other benches do

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

    def __init__(self, hf_tok, vocab: int, eos: int, name: str | None = None):
        import xgrammar as xgr

        self.name = name or self.name
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


class HostSplit:
    """Per-step host time of one generate() run: the grammar's mask fill, the mask's apply (its launch,
    on a GPU), the engine's wait for the device (LLMEngine.step_timing "wait") and the rest, plus the
    process's CPU time per step (all threads: spinning fill threads show here). Wraps GrammarBackend.fill
    and the sampler's apply_bitmask for the run (`backend` picks apply_bitmask's backend)."""

    def __init__(self, llm, backend: str = "xgrammar"):
        self.engine = llm.engine
        self.backend = backend
        self.t = {"fill": 0.0, "apply": 0.0}

    def __enter__(self):
        import services.engine.sampler as sampler_mod

        self._sampler_mod, self._apply = sampler_mod, sampler_mod.apply_bitmask
        grammar, fill, apply, t = self.engine.grammar, self.engine.grammar.fill, self._apply, self.t

        def timed_fill(seqs):
            t0 = time.perf_counter()
            try:
                return fill(seqs)
            finally:
                t["fill"] += time.perf_counter() - t0

        def timed_apply(x, bitmask):
            t0 = time.perf_counter()
            try:
                return apply(x, bitmask, backend=self.backend)
            finally:
                t["apply"] += time.perf_counter() - t0

        grammar.fill = timed_fill
        sampler_mod.apply_bitmask = timed_apply
        self.engine.step_timing = {}
        self.w0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.w0, time.process_time() - self.c0
        self.timing, self.engine.step_timing = self.engine.step_timing, None
        del self.engine.grammar.fill  # the instance attribute: the method shows again
        self._sampler_mod.apply_bitmask = self._apply

    def per_step_ms(self) -> dict:
        steps = max(self.timing.get("steps", 0), 1)
        ms = lambda sec: round(sec / steps * 1e3, 3)  # noqa: E731
        wait = self.timing.get("wait", 0.0)
        return {"steps": steps, "step": ms(self.wall), "fill": ms(self.t["fill"]), "apply": ms(self.t["apply"]),
                "wait": ms(wait), "other": ms(self.wall - self.t["fill"] - self.t["apply"] - wait),
                "cpu": ms(self.cpu),
                "phases": {k: ms(v) for k, v in self.timing.items() if k != "steps"}}  # LLMEngine._phase


def _digest(outs) -> str:
    return hashlib.sha1(repr([list(c.token_ids) for o in outs for c in o.outputs]).encode()).hexdigest()[:12]


def _run(llm, prompts, params, sync, backend: str = "xgrammar") -> tuple[int, dict, str]:
    """One timed generate(): (tokens made, host split per step, digest of the tokens)."""
    sync()
    with HostSplit(llm, backend) as split:
        outs = llm.generate(prompts, params, use_tqdm=False)
        sync()
    return sum(len(c.token_ids) for o in outs for c in o.outputs), split, _digest(outs)


def engine_throughput(llm, batches: list[int], max_tokens: int, rounds: int, sync=lambda: None) -> list[dict]:
    """Output tok/s of the offline engine with and without a JSON schema, per batch size: the same
    prompts, greedy, EOS ignored so both runs generate exactly batch x max_tokens tokens (under the
    schema EOS is allowed only where the schema is complete; past it, EOS only). Plain and schema runs
    alternate (ABBA...) `rounds` times so a neighbour's load hits both alike; each row gives the median
    wall-clock tok/s of each, the median of the per-round ratios, and the same from process CPU time
    (all threads), which a shared CPU disturbs far less than wall time; and the host time per step,
    split (HostSplit), of each one's last run. Every schema round must make the same tokens."""
    from folio import SamplingParams
    from services.common.structured_output import StructuredOutputs

    so = StructuredOutputs.from_schema(SCHEMA, "schema")
    llm.generate(["warm up"] * 2, SamplingParams(max_tokens=4, structured_outputs=so), use_tqdm=False)
    llm.generate(["warm up"] * 2, SamplingParams(max_tokens=4), use_tqdm=False)
    rows = []
    for b in batches:
        prompts = [f"Person number {i} as JSON:" for i in range(b)]
        # Warm this batch size up first (its time is reported): xgrammar's Triton apply kernel compiles
        # once per class of row count (Triton specializes 1 and multiples of 16), which round 1 likely
        # counted in one schema round (batch 1: one round ~0.3 s slower than the other).
        warm = {}
        for name, so_ in (("json_schema", so), ("plain", None)):
            sync()
            t0 = time.perf_counter()
            llm.generate(prompts, SamplingParams(max_tokens=2, ignore_eos=True, structured_outputs=so_), use_tqdm=False)
            sync()
            warm[name] = round(time.perf_counter() - t0, 3)
        runs: dict[str, list[tuple[float, float, int]]] = {"plain": [], "json_schema": []}
        splits, digests = {}, set()
        for r in range(rounds):
            order = ("plain", "json_schema") if r % 2 == 0 else ("json_schema", "plain")
            for name in order:
                params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True,
                                        structured_outputs=so if name == "json_schema" else None)
                n, split, digest = _run(llm, prompts, params, sync)
                runs[name].append((split.wall, split.cpu, n))
                splits[name] = split.per_step_ms()
                if name == "json_schema":
                    digests.add(digest)
        row = {"batch": b, "max_tokens": max_tokens, "rounds": rounds, "warm_up_s": warm,
               "json_schema_round_s": [round(w, 3) for w, _, _ in runs["json_schema"]],
               "plain_round_s": [round(w, 3) for w, _, _ in runs["plain"]]}
        for name, rs in runs.items():
            row[f"{name}_tokens"] = rs[0][2]
            row[f"{name}_tok_s"] = round(statistics.median(n / w for w, _, n in rs), 1)
            row[f"{name}_tok_per_cpu_s"] = round(statistics.median(n / c for _, c, n in rs), 1)
            row[f"{name}_host_ms_per_step"] = splits[name]
        row["ratio_wall"] = round(statistics.median(
            (nj / wj) / (np_ / wp) for (wp, _, np_), (wj, _, nj) in zip(runs["plain"], runs["json_schema"])), 3)
        row["ratio_cpu"] = round(statistics.median(
            (nj / cj) / (np_ / cp) for (_, cp, np_), (_, cj, nj) in zip(runs["plain"], runs["json_schema"])), 3)
        row["same_tokens"] = row["plain_tokens"] == row["json_schema_tokens"] == b * max_tokens and len(digests) == 1
        row["json_schema_digest"] = digests.pop() if len(digests) == 1 else sorted(digests)
        rows.append(row)
        print(row, flush=True)
    return rows


def thread_sweep(llm, batch: int, max_tokens: int, plain_tok_s: float, digest: str, sync) -> list[dict]:
    """The schema run at `batch` once per fill setting: Folio's kept pool and xgrammar's own batch fill
    (a new pool of threads each call), each at 1, 2, 4, 8, 16 threads up to the CPUs this process may
    use and the default: tok/s against the plain figure, the host split, the same tokens as before."""
    from folio import SamplingParams
    from services.common.structured_output import StructuredOutputs
    from services.engine.structured import default_fill_threads

    grammar = llm.engine.grammar
    default = (grammar.fill_threads, grammar.fill_mode)
    counts = sorted({n for n in (1, 2, 4, 8, 16) if n <= _cpus()} | {default_fill_threads()})
    settings = [(k, "pool") for k in counts] + [(k, "xgrammar") for k in counts if k > 1]
    prompts = [f"Person number {i} as JSON:" for i in range(batch)]
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True,
                            structured_outputs=StructuredOutputs.from_schema(SCHEMA, "schema"))
    rows = []
    for k, mode in settings:
        grammar.set_fill(k, mode)
        n, split, d = _run(llm, prompts, params, sync)
        rows.append({"fill_threads": k, "fill_mode": mode, "tok_s": round(n / split.wall, 1),
                     "ratio": round(n / split.wall / plain_tok_s, 3), "host_ms_per_step": split.per_step_ms(),
                     "same_tokens": d == digest})
        print(rows[-1], flush=True)
    grammar.set_fill(*default)
    return rows


def apply_sweep(device: str, batch: int, vocab: int) -> list[dict]:
    """apply_bitmask per backend on [batch, vocab] float32 logits on `device`: the host time to launch it,
    the device time (CUDA events), and equality with the torch reference (random masks)."""
    from services.engine.structured import APPLY_BACKENDS, apply_bitmask

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, vocab, generator=g).to(device)
    words = (vocab + 31) // 32
    mask = torch.randint(-2**31, 2**31 - 1, (batch, words), dtype=torch.int32, generator=g)
    mask = mask.pin_memory() if device.startswith("cuda") else mask
    ref = apply_bitmask(logits.clone(), mask, backend="torch")
    rows = []
    for backend in APPLY_BACKENDS:
        ok = torch.equal(apply_bitmask(logits.clone(), mask, backend=backend), ref)
        host, dev = [], []
        for _ in range(30):
            x = logits.clone()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
            t0 = time.perf_counter()
            apply_bitmask(x, mask, backend=backend)
            host.append(time.perf_counter() - t0)
            if device.startswith("cuda"):
                e1.record()
                e1.synchronize()
                dev.append(e0.elapsed_time(e1) / 1e3)
        rows.append({"backend": backend, "equal_to_torch": ok, "host_ms": _median_ms(host),
                     "device_ms": _median_ms(dev) if dev else None})
        print(rows[-1], flush=True)
    return rows


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _cpu_note() -> dict:
    quota = None
    try:
        quota = Path("/sys/fs/cgroup/cpu.max").read_text().strip()
    except OSError:
        pass
    from services.engine.structured import default_fill_threads

    return {"os_cpu_count": os.cpu_count(), "affinity_cpus": _cpus(), "cgroup_cpu_max": quota,
            "torch_threads": torch.get_num_threads(), "default_fill_threads": default_fill_threads()}


def _print_split(rows: list[dict]) -> None:
    """Host ms per step of each batch's last plain and schema run: fill / apply / wait / other, and CPU ms."""
    print(f"\nhost ms per step{'':>6}{'step':>8}{'fill':>8}{'apply':>8}{'wait':>8}{'other':>8}{'cpu':>8}")
    for r in rows:
        for name in ("plain", "json_schema"):
            h = r[f"{name}_host_ms_per_step"]
            print(f"  b{r['batch']:<4}{name:<15}{h['step']:>8.2f}{h['fill']:>8.2f}{h['apply']:>8.3f}{h['wait']:>8.2f}"
                  f"{h['other']:>8.2f}{h['cpu']:>8.2f}   engine phases: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in h["phases"].items()))


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def cpu_engine(args) -> dict:
    """The bundled model on this CPU (float32)."""
    from folio import LLM

    torch.set_num_threads(args.threads)  # OpenMP threads oversubscribed on a shared CPU spin many times slower
    llm = LLM(max_model_len=1024, dtype="float32", device="cpu", max_num_seqs=max(args.engine_batches_list))
    load_before = _load_average()
    rows = engine_throughput(llm, args.engine_batches_list, args.engine_max_tokens, args.rounds)
    return {"device": "cpu", "model": "SmolLM2-135M-Instruct (bundled), float32", "threads": torch.get_num_threads(),
            "load_average_before": load_before, "load_average_after": _load_average(), "rows": rows}


# --- the GPU check: the 8B shape with dummy weights ----------------------------------------------
def _tokenizer_dir(out: Path, trained: bool = False) -> tuple[Path, str]:
    """A tokenizer for the dummy-weight model: the bundled model's when it is prepared here (the GPU
    machine has no network and may not have it) unless `trained`, else a byte-level BPE trained now on
    this repository's text (~15k ids: the model's 128,256-row embedding is padded far past it)."""
    from services.common.bundled_model import bundled_model_dir, is_prepared

    src = bundled_model_dir()
    if is_prepared(src) and not trained:
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (out / f).write_bytes((src / f).read_bytes())
        return out, "SmolLM2-135M-Instruct's (vocab 49,152)"
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root = Path(__file__).resolve().parents[1]  # (a copy of the tree need not be a git checkout)
    files = sorted(str(f) for ext in ("*.py", "*.md") for f in root.rglob(ext)
                   if not {".venv", ".git", "gen", "node_modules"} & set(f.relative_to(root).parts))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train(files, trainers.BpeTrainer(vocab_size=49152, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "bos_token": "<|im_start|>"}))
    return out, f"a byte-level BPE trained on the repository's text (vocab {tok.get_vocab_size():,}; the bundled model is not prepared here)"


def _check_outputs_follow_grammar(llm, prompts: list[str], max_tokens: int) -> int:
    """Correctness before timing: each schema-constrained output (greedy, EOS allowed) is accepted token by
    token by a fresh xgrammar matcher of the same schema, and one that ended on EOS parses and validates."""
    import xgrammar as xgr

    from folio import SamplingParams
    from services.common.structured_output import StructuredOutputs

    engine = llm.engine
    so = StructuredOutputs.from_schema(SCHEMA, "schema")
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens, structured_outputs=so),
                        use_tqdm=False)
    engine.grammar._init()
    compiled = engine.grammar._compiler.compile_grammar(so.grammar_obj())
    complete = 0
    for o in outs:
        c = o.outputs[0]
        m = xgr.GrammarMatcher(compiled)
        for t in c.token_ids:
            assert m.accept_token(t), f"output left the schema at token {t}: {c.text!r}"
        if c.finish_reason == "stop":
            parsed = json.loads(c.text)
            try:
                import jsonschema
            except ImportError:  # not on every GPU machine: the matcher's acceptance above is the check
                jsonschema = None
            if jsonschema is not None:
                jsonschema.validate(parsed, SCHEMA)
            complete += 1
    return complete


def gpu_engine(args) -> dict:
    """A model shape (default Llama-3-8B, vocab 128,256) with dummy weights, bf16 on one GPU: correctness, then tok/s."""
    import tempfile

    from throughput import write_config  # bench/ is on sys.path when this runs as a script
    from folio import LLM

    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_config(args.shape, Path(tmp))
        _, tok_note = _tokenizer_dir(model_dir, trained=args.trained_tokenizer)
        cfg = json.loads((model_dir / "config.json").read_text())
        cfg["vocab_size"] = args.vocab or cfg["vocab_size"]
        from tokenizers import Tokenizer as _Tok

        tok_vocab = _Tok.from_file(str(model_dir / "tokenizer.json")).get_vocab_size()
        cfg["vocab_size"] = max(cfg["vocab_size"], tok_vocab)  # a small smoke-test shape must cover the tokenizer
        (model_dir / "config.json").write_text(json.dumps(cfg))
        t0 = time.perf_counter()
        llm = LLM(str(model_dir), load_format="dummy", dtype="bfloat16" if cuda else "float32", device=args.device,
                  max_model_len=1024,
                  max_num_seqs=max(args.engine_batches_list), enable_prefix_caching=False)
        startup = time.perf_counter() - t0
        complete = _check_outputs_follow_grammar(llm, [f"Person number {i} as JSON:" for i in range(8)], 96)
        print(f"correctness: 8 schema-constrained outputs followed the grammar token by token "
              f"({complete} completed and validated with jsonschema; random weights rarely finish)", flush=True)
        rows = engine_throughput(llm, args.engine_batches_list, args.engine_max_tokens, args.rounds, sync=sync)
        top = rows[-1]  # the largest batch: the fill-thread and apply-backend sweeps
        threads = thread_sweep(llm, top["batch"], args.engine_max_tokens, top["plain_tok_s"],
                               top["json_schema_digest"], sync) if not args.no_sweep else []
        applies = apply_sweep(args.device, top["batch"], llm.engine.vocab_size) if not args.no_sweep else []
        grammar_vocab = llm.engine.grammar.grammar_vocab
        llm.shutdown()
    return {"device": torch.cuda.get_device_name() if cuda else args.device,
            "model": f"{args.shape} shape, {'bf16' if cuda else 'float32'}, dummy weights",
            "tokenizer": tok_note, "grammar_vocab": grammar_vocab, "cpus": _cpu_note(), "startup_s": round(startup, 1),
            "rows": rows, "fill_thread_sweep": threads, "apply_sweep": applies,
            "target": "json_schema tok/s >= 0.9 x plain at batch 64"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory (default: the bundled SmolLM2)")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--engine", action="store_true",
                    help="also measure the offline engine's output tok/s with and without a schema (CPU)")
    ap.add_argument("--gpu", action="store_true",
                    help="only the engine tok/s with and without a schema on one GPU, Llama-3-8B shape, dummy weights")
    ap.add_argument("--shape", default="llama-3-8b", help="--gpu: the model shape (bench/throughput.py's SHAPES)")
    ap.add_argument("--device", default="cuda", help="--gpu: the device (cpu with --shape tiny is a smoke test)")
    ap.add_argument("--engine-batches", default="1,16,64")
    ap.add_argument("--engine-max-tokens", type=int, default=None, help="default: 16 on CPU, 128 on the GPU")
    ap.add_argument("--rounds", type=int, default=None, help="plain/schema alternations (default: 3 on CPU, 2 on the GPU)")
    ap.add_argument("--threads", type=int, default=1, help="--engine: torch CPU threads (default 1)")
    ap.add_argument("--padded", type=int, default=128256,
                    help="mask benchmark: also xgrammar told this larger vocabulary (an embedding padded past the tokenizer); 0: not")
    ap.add_argument("--vocab", type=int, default=None, help="--gpu: the model's vocabulary (default: the shape's)")
    ap.add_argument("--trained-tokenizer", action="store_true",
                    help="--gpu: the BPE trained on the repository even where the bundled model's tokenizer is prepared")
    ap.add_argument("--no-sweep", action="store_true", help="--gpu: skip the fill-thread and apply-backend sweeps")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    args.engine_batches_list = list(map(int, args.engine_batches.split(",")))
    day = time.strftime('%Y-%m-%d')
    if args.gpu:
        args.engine_max_tokens = args.engine_max_tokens or 128
        args.rounds = args.rounds or 2
        try:
            import xgrammar  # noqa: F401
        except ImportError:
            raise SystemExit("bench/structured.py --gpu: xgrammar is not installed here (pip install xgrammar==0.2.8)")
        t0 = time.perf_counter()
        result = {"engine_gpu": gpu_engine(args), "versions": {"xgrammar": _version("xgrammar"), "torch": torch.__version__}}
        rows = result["engine_gpu"]["rows"]
        print(f"\n{result['engine_gpu']['model']} on {result['engine_gpu']['device']}; tokenizer: {result['engine_gpu']['tokenizer']}")
        print(f"{'batch':>6}{'plain tok/s':>13}{'schema tok/s':>14}{'ratio':>8}  same tokens")
        for r in rows:
            print(f"{r['batch']:>6}{r['plain_tok_s']:>13.0f}{r['json_schema_tok_s']:>14.0f}{r['ratio_wall']:>8.3f}  {r['same_tokens']}")
        _print_split(rows)
        eg = result["engine_gpu"]
        print(f"CPUs: {eg['cpus']}; xgrammar sees {eg['grammar_vocab']:,} token ids")
        if eg["fill_thread_sweep"]:
            print(f"\nfill threads at batch {rows[-1]['batch']}:{'mode':>9}{'threads':>8}{'tok/s':>8}{'ratio':>7}"
                  f"{'step ms':>9}{'fill ms':>9}{'cpu ms':>8}  same tokens")
            for t in eg["fill_thread_sweep"]:
                h = t["host_ms_per_step"]
                print(f"{'':>25}{t['fill_mode']:>9}{t['fill_threads']:>8}{t['tok_s']:>8.0f}{t['ratio']:>7.3f}"
                      f"{h['step']:>9.3f}{h['fill']:>9.3f}{h['cpu']:>8.2f}  {t['same_tokens']}")
            best = max(eg["fill_thread_sweep"], key=lambda t: t["tok_s"])
            print(f"fastest: {best['fill_mode']} with {best['fill_threads']} threads "
                  f"(default here: pool with {eg['cpus']['default_fill_threads']})")
        if eg["apply_sweep"]:
            print("\napply_bitmask per backend (float32 logits):")
            for a in eg["apply_sweep"]:
                print(f"  {a['backend']:>9}: host {a['host_ms']:.3f} ms, device {a['device_ms']} ms, equal to torch: {a['equal_to_torch']}")
        r64 = next((r for r in rows if r["batch"] == 64), None)
        if r64 is not None:
            verdict = "MET" if r64["ratio_wall"] >= 0.9 else "NOT met"
            print(f"target (schema >= 90% of plain tok/s at batch 64): {verdict} ({r64['ratio_wall']:.1%})")
        print(f"total {time.perf_counter() - t0:.0f} s")
        out = args.out or f"bench/results/structured_gpu_{day}.json"
    else:
        args.engine_max_tokens = args.engine_max_tokens or 16
        args.rounds = args.rounds or 3
        result = mask_benchmark(args)
        if args.engine:
            result["engine"] = cpu_engine(args)
        out = args.out or f"bench/results/structured_cpu_{day}.json"
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


def mask_benchmark(args) -> dict:
    """xgrammar against llguidance on the bundled tokenizer: mask and accept time per step."""
    from services.common.bundled_model import bundled_model_dir
    from services.common.tokenizer import Tokenizer

    model_dir = Path(args.model) if args.model else bundled_model_dir()
    tok = Tokenizer(model_dir)
    hf_tok = _hf_tokenizer(model_dir)
    vocab = tok.vocab_size
    eos = next(iter(tok.eos_token_ids))
    tokens = tok.encode(json.dumps(INSTANCE, separators=(",", ":")), add_special_tokens=False) + [eos]
    libs = [XGrammar(hf_tok, vocab, eos), LLGuidance(hf_tok, vocab, eos)]
    if args.padded and args.padded > vocab:  # xgrammar told the model's padded embedding (as before GrammarBackend.grammar_vocab)
        libs.append(XGrammar(hf_tok, args.padded, eos, name=f"xgrammar, vocab padded to {args.padded:,}"))
    rows = [run_one(lib, tokens, b) for b in map(int, args.batches.split(",")) for lib in libs]

    cols = ["library", "batch", "compile_ms", "mask_ms_per_step_seq", "mask_ms_per_step_par",
            "mask_us_per_token_par", "accept_ms_per_step_par", "apply_ms_cpu"]
    print(f"model {model_dir.name}, vocab {vocab}, {len(tokens)} tokens per sequence, {os.cpu_count()} CPUs")
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r[c]) for c in cols))
    return {
        "model": model_dir.name, "vocab": vocab, "tokens": len(tokens), "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(), "schema": SCHEMA, "rows": rows,
        "versions": {"xgrammar": _version("xgrammar"), "llguidance": _version("llguidance"), "torch": torch.__version__},
    }


def _version(pkg: str) -> str:
    from importlib.metadata import version

    return version(pkg)


if __name__ == "__main__":
    main()
