"""The offline API queues its requests only as far ahead as the next schedule can tell (folio/llm.py, _feed;
Scheduler.queue_shortfall): each step schedules what it would with every request queued at once, the outputs
are the same, and the rest is queued between steps. A tiny random-weight Llama on CPU."""

import json

import numpy as np
import pytest

from folio import LLM, SamplingParams


def tiny_llm(d, prefix_caching: bool) -> LLM:
    """A 64-token step budget and 6 sequences at most: the 14 prompts of 5-30 tokens take several steps to admit."""
    (d / "config.json").write_text(json.dumps(dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", rms_norm_eps=1e-5,
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=300, max_position_embeddings=512, tie_word_embeddings=False, eos_token_id=2)))
    return LLM(str(d), load_format="dummy", dtype="float32", device="cpu", block_size=4, num_kv_blocks=200,
               max_num_seqs=6, max_num_batched_tokens=64, max_model_len=64, seed=0,
               enable_prefix_caching=prefix_caching)


def _work():
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, 300, int(rng.integers(5, 31))).tolist() for _ in range(14)]
    params = [SamplingParams(temperature=0, max_tokens=int(rng.integers(1, 6)), ignore_eos=True) for _ in prompts]
    return prompts, params


def _record_steps(engine):
    """Wrap the scheduler: (tokens, prompt tokens of each sequence) per step, and how many requests were queued."""
    sched, steps, queued = engine.scheduler, [], []
    schedule = sched.schedule

    def spy():
        queued.append(len(engine.requests))
        out = schedule()
        steps.append((out.num_tokens, [s.num_prompt_tokens for s in out.seqs]))
        return out

    sched.schedule = spy
    return steps, queued, schedule


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_fed_requests_schedule_and_finish_as_if_all_were_queued(tmp_path, prefix_caching):
    prompts, params = _work()
    prompts[7] = prompts[2][:16] + prompts[7]  # a shared prefix (a cache hit with prefix caching)
    fed_llm = tiny_llm(tmp_path, prefix_caching)
    steps, queued, _ = _record_steps(fed_llm.engine)
    fed = fed_llm.generate(prompts, params, use_tqdm=False)
    fed_steps, fed_queued = list(steps), list(queued)
    # The same requests queued at once in a fresh engine, then stepped by hand.
    engine = tiny_llm(tmp_path, prefix_caching).engine
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(f"all-{i}", None, sp, prompt_token_ids=p, stream=False)
    steps, _, _ = _record_steps(engine)
    done = {}
    while engine.has_unfinished_requests():
        for delta in engine.step():
            if delta.finished:
                done[delta.request_id] = [t for s in delta.sequences for t in s.token_ids]
    assert fed_steps == steps  # the same step by step: tokens and sequences (by prompt length) in order
    assert [o.outputs[0].token_ids for o in fed] == [done[f"all-{i}"] for i in range(len(prompts))]
    assert fed_queued[0] < len(prompts)  # the first step ran with part of the requests queued
    assert max(fed_queued) < len(prompts)  # and never all at once (each finishes before the last is queued)


def test_a_bad_request_anywhere_fails_before_anything_runs(tmp_path):
    tiny = tiny_llm(tmp_path, False)
    prompts, params = _work()
    calls = []
    step = tiny.engine.step
    tiny.engine.step = lambda: calls.append(1) or step()
    with pytest.raises(ValueError, match="prompt_token_ids: token id 300"):
        tiny.generate(prompts[:-1] + [[5, 300]], params, use_tqdm=False)
    with pytest.raises(ValueError, match="n: 7"):
        tiny.generate(prompts, params[:-1] + [SamplingParams(n=7, max_tokens=2)], use_tqdm=False)
    assert calls == [] and not tiny.engine.has_unfinished_requests()
