"""Engine features on architectures other than Llama: prefix caching, preemption and n > 1 give the same
tokens as a plain run (and greedy ones equal transformers'); a sliding-window model generating past its
window matches transformers while its used blocks stay bounded by the window."""

from __future__ import annotations

import pytest

from folio import LLM, SamplingParams
from tests.models import harness
from tests.models.architectures import ARCHITECTURES

BY_ID = {a.id: a for a in ARCHITECTURES}
BS = 4  # small blocks: prefixes of a few blocks, pools that run out quickly


def _workload(vocab: int):
    prefix = harness.prompts(vocab, lens=(24,), seed=11)[0]
    tails = harness.prompts(vocab, lens=(3, 9, 14), seed=12)
    prompts = [prefix + t for t in tails] + [prefix[:10]]
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    params = [greedy, SamplingParams(n=2, temperature=0.8, seed=5, max_tokens=10, ignore_eos=True), greedy, greedy]
    return prompts, params


def _generate(d, prompts, params, **kw):
    llm = LLM(str(d), dtype="float32", attention_backend="torch", block_size=BS, max_num_batched_tokens=16,
              max_model_len=48, **kw)  # the longest sequence: 38 prompt + 10 new tokens
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        again = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return ([[c.token_ids for c in o.outputs] for o in outs], [[c.token_ids for c in o.outputs] for o in again],
                llm.engine.blocks.prefix_hits, llm.engine.scheduler.num_preemptions)
    finally:
        llm.shutdown()


@pytest.mark.parametrize("arch_id", ["gemma2", "qwen3", "mistral", "bloom"])
def test_prefix_caching_preemption_and_n2_give_the_plain_runs_tokens(arch_id, tmp_path):
    arch = BY_ID[arch_id]  # gemma2: soft-cap + interleaved sliding; qwen3: q/k norm; mistral: sliding, blocks
    # freed; bloom: ALiBi (positions of cached prefix blocks matter to the bias)
    ref = harness.build_checkpoint(arch, tmp_path)
    prompts, params = _workload(arch.config["vocab_size"])
    plain, _, _, _ = _generate(tmp_path, prompts, params, enable_prefix_caching=False, num_kv_blocks=128)
    greedy = [p for p, sp in zip(prompts, params) if sp.temperature == 0]
    want = dict(zip(map(tuple, greedy), harness.hf_greedy_many(ref, greedy)))
    for p, o, sp in zip(prompts, plain, params):
        if sp.temperature == 0:
            assert o[0] == want[tuple(p)], f"{arch_id}: greedy differs from transformers"
        else:
            assert len(o) == 2 and o[0] != o[1]

    first, second, hits, _ = _generate(tmp_path, prompts, params, enable_prefix_caching=True, num_kv_blocks=128)
    assert hits > 0, "the shared prefix was never served from the cache"
    assert first == plain and second == plain

    # 12 blocks: one longest sequence fits; the batch (five sequences) does not, even with Mistral's window.
    small, small_again, _, preemptions = _generate(tmp_path, prompts, params, enable_prefix_caching=True,
                                                   num_kv_blocks=12)
    assert preemptions > 0, "the small pool was meant to force preemption"
    assert small == plain and small_again == plain


def test_sliding_window_model_past_its_window_matches_transformers_with_bounded_blocks(tmp_path):
    arch = BY_ID["mistral"]
    window = arch.config["sliding_window"]
    ref = harness.build_checkpoint(arch, tmp_path)
    prompt = harness.prompts(arch.config["vocab_size"], lens=(20,), seed=3)[0]
    budget, new = 16, 40
    llm = LLM(str(tmp_path), dtype="float32", attention_backend="torch", block_size=BS,
              max_num_batched_tokens=budget, num_kv_blocks=64, max_model_len=128)
    assert llm.engine.blocks.sliding_window == window
    runner, blocks, peak = llm.engine.runner, llm.engine.blocks, []
    execute = runner.execute

    def spy(inputs):  # blocks in use while the step runs (after its allocation, before the release)
        peak.append(blocks.num_used_blocks())
        return execute(inputs)

    runner.execute = spy
    out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=new, ignore_eos=True),
                       use_tqdm=False)[0]
    llm.shutdown()
    assert out.outputs[0].token_ids == harness.hf_greedy(ref, prompt, n=new)
    bound = -(-(window - 1 + budget) // BS) + 1  # the window behind the chunk, the chunk, one partial block
    assert max(peak) <= bound < (len(prompt) + new) // BS, (max(peak), bound, peak)
