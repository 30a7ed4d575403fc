"""The steady-state shortcuts of the engine's host work (docs/engine.md, "Host work per step") give what the
general path gives: the model runner's decode inputs, and the scheduler's skipped block check. A tiny
random-weight Llama on CPU; n > 1 and forks keep the general path in play beside the plain requests."""

import json

import numpy as np
import pytest
import torch

from folio import LLM, SamplingParams


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    (d / "config.json").write_text(json.dumps(dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", rms_norm_eps=1e-5,
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=300, max_position_embeddings=512, tie_word_embeddings=False, eos_token_id=2)))
    return LLM(str(d), load_format="dummy", dtype="float32", device="cpu", block_size=4, num_kv_blocks=256,
               max_num_seqs=16, seed=0)


def _same_inputs(a, b):
    for x, y in ((a.input_ids, b.input_ids), (a.positions, b.positions), (a.logit_rows, b.logit_rows),
                 (a.meta.query_start_loc, b.meta.query_start_loc), (a.meta.seq_lens, b.meta.seq_lens),
                 (a.meta.block_tables, b.meta.block_tables), (a.meta.slot_mapping, b.meta.slot_mapping)):
        assert x.dtype == y.dtype and torch.equal(x, y)
    for f in ("num_seqs", "num_tokens", "max_query_len", "max_seq_len", "query_lens_cpu", "seq_lens_cpu"):
        assert getattr(a.meta, f) == getattr(b.meta, f), f


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_decode_fast_paths_match_the_general_ones(tiny, async_scheduling):
    engine = tiny.engine
    engine.async_scheduling = async_scheduling
    runner, blocks, scheduler = engine.runner, engine.blocks, engine.scheduler
    prepare, schedule = runner.prepare, scheduler.schedule
    seen = {"fast": 0, "skipped": 0}

    def checked_prepare(out, blocks, tokens=None):
        got = prepare(out, blocks, tokens)
        if out.plain_decode:
            seen["fast"] += 1
            plain, out.num_plain_decodes = out.num_plain_decodes, -1  # the general path, on the same step
            general = prepare(out, blocks)
            if tokens is not None:  # the steady step's inputs are the step before's tokens, as they are
                assert got.input_ids is tokens
                general.input_ids.copy_(tokens)
            _same_inputs(got, general)
            out.num_plain_decodes = plain
        return got

    def checked_schedule():
        out = schedule()
        for s in out.scheduled:  # a decode that skipped try_append: the check would have said "nothing to do"
            seq = s.seq
            if (s.num_new_tokens == 1 and seq.request.plain and seq.num_computed_tokens % blocks.block_size
                    and seq.num_computed_tokens >= seq.num_prompt_tokens):
                seen["skipped"] += 1
                assert blocks.try_append(seq, 1) == []
        return out

    runner.prepare, scheduler.schedule = checked_prepare, checked_schedule
    try:
        rng = np.random.default_rng(1)
        prompts = [rng.integers(3, 300, int(k)).tolist() for k in rng.integers(3, 12, 10)]
        params = [SamplingParams(temperature=0, max_tokens=int(k), ignore_eos=True) for k in rng.integers(6, 20, 8)]
        params += [SamplingParams(temperature=0.8, seed=4, n=3, max_tokens=9),  # forks: the general path
                   SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[7, 11, 19])]
        outs = tiny.generate(prompts, params, use_tqdm=False)
    finally:
        del runner.prepare, scheduler.schedule
    assert [len(o.outputs) for o in outs] == [1] * 8 + [3, 1]
    assert all(len(o.outputs[0].token_ids) == p.max_tokens for o, p in zip(outs[:8], params))
    assert seen["fast"] > 5 and seen["skipped"] > 20, seen
    blocks.check_invariants()
    assert not blocks.tables
