"""The steady decode batch (services/engine/input_batch.py) carried from step to step by delta equals one built
from scratch, and the engine's outputs do not depend on it: random schedules on a tiny random-weight Llama on
CPU, with admissions, forks (n > 1), stop ids, length ends, aborts and preemption (a small KV pool), with
asynchronous scheduling on and off, each run once with the steady path and once with the general pass only."""

import json

import numpy as np
import pytest
import torch

from folio import LLM, SamplingParams
from services.engine.input_batch import DecodeBatch
from services.engine.scheduler import ScheduledSeq


def tiny_llm(d, device: str = "cpu", block_size: int = 4, num_kv_blocks: int = 30) -> LLM:
    """A random-weight Llama (hidden 64, 2 layers) in `d`. 30 blocks of 4 tokens for up to 8 sequences of up to
    64 tokens: they preempt each other as they grow."""
    (d / "config.json").write_text(json.dumps(dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", rms_norm_eps=1e-5,
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=300, max_position_embeddings=512, tie_word_embeddings=False, eos_token_id=2)))
    return LLM(str(d), load_format="dummy", dtype="float32", device=device, block_size=block_size,
               num_kv_blocks=num_kv_blocks, max_num_seqs=8, max_model_len=64, seed=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_llm(tmp_path_factory.mktemp("tiny_batch"))


def _requests(seed: int):
    rng = np.random.default_rng(seed)
    reqs = []
    for i in range(12):
        prompt = rng.integers(3, 300, int(rng.integers(3, 14))).tolist()
        kind = i % 7
        if kind == 3:
            p = SamplingParams(temperature=0.8, seed=i, n=2, max_tokens=int(rng.integers(4, 12)))  # forks
        elif kind == 5:
            p = SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[int(t) for t in rng.integers(3, 300, 25)])
        elif kind == 6:
            p = SamplingParams(temperature=0.7, seed=100 + i, max_tokens=int(rng.integers(10, 50)), logprobs=2)
        else:
            p = SamplingParams(temperature=0, max_tokens=int(rng.integers(5, 60)), ignore_eos=True)
        reqs.append((f"r{i}", prompt, p))
    return reqs


def _run(llm, seed: int, async_scheduling: bool, steady: bool, checks: dict, stream: bool = True):
    """Run the requests step by step (aborting two of them midway); return every sequence's tokens,
    finish reason and cumulative logprob. With `steady`, each steady step is checked as it is made."""
    engine = llm.engine
    engine.async_scheduling = async_scheduling
    scheduler, runner, blocks = engine.scheduler, engine.runner, engine.blocks
    schedule_steady, prepare = scheduler._schedule_steady, runner.prepare

    def checked_steady():
        out = schedule_steady()
        if out is not None:
            checks["steady"] += 1
            rebuilt = DecodeBatch.build(out.seqs, blocks.tables, scheduler.config.max_model_len)
            assert out.batch.same_as(rebuilt), "the carried arrays differ from a fresh build"
            for i, seq in enumerate(out.seqs):
                assert len(seq.token_ids) == seq.num_computed_tokens + 1 and seq.request.plain
                assert blocks.try_append(seq, 1) == [], "the general pass would have had a block to add"
            assert [(s.seq, s.num_new_tokens, s.prompt_logprob_rows, s.sample_row) for s in out.scheduled] == \
                [(s, 1, range(0), i) for i, s in enumerate(out.seqs)]
            assert isinstance(out.scheduled[0], ScheduledSeq) and len(out.scheduled) == len(out.seqs)
            if out.batch.lean:  # (resolve_steady then stamps and reports no request)
                checks["lean"] += 1
                assert not any(s.request.stream or s.request.first_token_time is None for s in out.seqs)
        return out

    def checked_prepare(out, blocks_, tokens=None):
        got = prepare(out, blocks_, tokens)
        if out.batch is not None:
            checks["decode_inputs"] += 1
            plain, out.num_plain_decodes = out.num_plain_decodes, -1  # the general path on the same step
            general = prepare(out, blocks_)
            out.num_plain_decodes = plain
            if tokens is not None:
                general.input_ids.copy_(tokens)
            for a, b in ((got.input_ids, general.input_ids), (got.positions, general.positions),
                         (got.meta.slot_mapping, general.meta.slot_mapping), (got.meta.seq_lens, general.meta.seq_lens),
                         (got.meta.block_tables, general.meta.block_tables), (got.logit_rows, general.logit_rows),
                         (got.meta.query_start_loc, general.meta.query_start_loc)):
                assert a.dtype == b.dtype and torch.equal(a, b)
            assert got.meta.seq_lens_cpu == general.meta.seq_lens_cpu
        return got

    scheduler._schedule_steady = checked_steady if steady else (lambda: None)
    runner.prepare = checked_prepare
    preempted = scheduler.num_preemptions
    got = {}
    try:
        for rid, prompt, params in _requests(seed):
            engine.add_request(rid, None, params, prompt_token_ids=prompt, stream=stream)
        while engine.has_unfinished_requests():
            for delta in engine.step():
                for s in delta.sequences:
                    toks, _, _ = got.get((delta.request_id, s.index), ([], None, None))
                    got[(delta.request_id, s.index)] = (toks + list(s.token_ids), s.finish_reason or None,
                                                        round(s.cumulative_logprob, 4))
            for rid in ("r2", "r8"):  # aborted once 5 tokens are out (the next may be in flight), others running
                req = engine.requests.get(rid)
                if req is not None and req.seqs[0].num_resolved_output_tokens >= 5:
                    s = engine.abort_request(rid).sequences[0]
                    toks = got.get((rid, 0), ([],))[0]
                    got[(rid, 0)] = (toks + list(s.token_ids), s.finish_reason, round(s.cumulative_logprob, 4))
                    checks["aborts"] += 1
    finally:
        del scheduler._schedule_steady, runner.prepare
    checks["preemptions"] += scheduler.num_preemptions - preempted
    blocks.check_invariants()
    assert not blocks.tables and not scheduler.running
    return got


def test_carried_batch_equals_a_fresh_build_and_outputs_do_not_change(tiny):
    check_runs(tiny)


def check_runs(llm) -> dict:
    """The requests run synchronously by the general pass only (the reference), then with the steady path,
    synchronously and asynchronously, streaming and not: every run's outputs equal the reference's. Returns
    the checks' counts."""
    checks = {"steady": 0, "decode_inputs": 0, "preemptions": 0, "aborts": 0, "lean": 0}
    runs = {(a, s, st): _run(llm, 0, a, s, checks, st)
            for a, s, st in ((False, False, True), (False, True, True), (True, True, True), (True, True, False))}
    ref = runs[(False, False, True)]
    assert any(k[1] == 1 for k in ref), "n > 1 forked"
    for key, got in runs.items():
        assert got == ref, f"async={key[0]} steady={key[1]} stream={key[2]}"
    assert ref[("r2", 0)][1] == ref[("r8", 0)][1] == "abort" and len(ref[("r2", 0)][0]) == 5
    assert checks["steady"] > 20 and checks["decode_inputs"] > checks["steady"] and checks["preemptions"] > 0, checks
    assert checks["aborts"] == 8 and checks["lean"] > 5, checks
    return checks
