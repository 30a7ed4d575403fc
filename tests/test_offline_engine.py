"""The offline API on the bundled model against transformers on the same converted weights (float32)."""

import pytest
import torch

from folio import LLM, SamplingParams
from services.common.output_processor import OutputProcessor

PROMPTS = [
    "The capital of France is",
    "Hi",
    "Write a haiku about the sea.",
    "def fibonacci(n):",
    "List three prime numbers greater than 100 and explain briefly why each one is prime, step by step:",
    "1, 2, 3, 4,",
    "In 1969, the first humans landed on the Moon. The mission was called Apollo 11 and its crew were",
    "Translate to French: I like apples and oranges very much, especially in the summer when it is warm outside.",
]
MAX_TOKENS = 12


def hf_greedy(hf_model, ids, max_new_tokens, eos_id=2):
    out = hf_model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                            eos_token_id=eos_id, pad_token_id=eos_id)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def hf_refs(hf_model, llm):
    tok = llm.get_tokenizer()
    return {p: hf_greedy(hf_model, tok.encode(p), MAX_TOKENS) for p in PROMPTS}


def assert_matches_reference(outs, hf_refs):
    for p, out in zip(PROMPTS, outs):
        assert out.prompt == p
        assert out.outputs[0].token_ids == hf_refs[p], p


def test_capital_of_france_reference(llm):
    out = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0]
    assert out.prompt_token_ids == [504, 3575, 282, 4649, 314]
    assert out.outputs[0].text.startswith(" Paris.\n\nThe answer is: 2018-01")
    assert out.outputs[0].finish_reason == "length"


def test_greedy_batch_equals_transformers(llm, hf_refs):
    lens = {len(o.prompt_token_ids) for o in llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)}
    assert len(lens) >= 6  # prompts of different lengths
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)
    assert_matches_reference(outs, hf_refs)


def test_prefill_logits_match_transformers(llm, hf_model):
    """All prompt positions' logits (prompt_logprobs forces them) against transformers' forward."""
    ids = llm.get_tokenizer().encode(PROMPTS[6])
    captured = []
    runner = llm.engine.runner
    original = runner.execute
    runner.execute = lambda inputs: captured.append(original(inputs)) or captured[-1]
    try:
        llm.generate([ids], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    finally:
        runner.execute = original
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0].float()
    ours = captured[0]
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() < 1e-4


def test_preemption_and_chunked_prefill_keep_greedy_outputs(hf_refs):
    # 10 blocks x 16 tokens for 8 sequences of up to ~40 tokens: they cannot all stay resident.
    small = LLM(dtype="float32", num_kv_blocks=10, max_model_len=160, max_num_batched_tokens=40)
    outs = small.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)
    assert small.engine.scheduler.num_preemptions > 0
    assert_matches_reference(outs, hf_refs)

    chunked = LLM(dtype="float32", max_num_batched_tokens=7, max_model_len=256, cpu_kv_cache_bytes=64 << 20)
    steps = []
    original = chunked.engine.scheduler.schedule

    def spy():
        out = original()
        steps.append([(s.seq.num_computed_tokens, s.num_new_tokens, s.seq.num_prompt_tokens) for s in out.scheduled])
        return out

    chunked.engine.scheduler.schedule = spy
    outs = chunked.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)
    # Some prompt was computed in pieces: a chunk that started mid-prompt.
    assert any(0 < start < n_prompt for step in steps for start, _, n_prompt in step)
    assert all(sum(n for _, n, _ in step) <= 7 for step in steps)
    assert_matches_reference(outs, hf_refs)


def test_seeded_sampling_is_reproducible_and_batch_independent(llm):
    sp = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=10)
    alone = llm.generate(PROMPTS[2], sp, use_tqdm=False)[0].outputs[0].token_ids
    again = llm.generate(PROMPTS[2], sp, use_tqdm=False)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=1.0, max_tokens=10)] * 3
    batched = llm.generate([PROMPTS[0], PROMPTS[2], PROMPTS[4], PROMPTS[5]], [others[0], sp, others[1], others[2]],
                           use_tqdm=False)[1].outputs[0].token_ids
    assert alone == again == batched
    different = llm.generate(PROMPTS[2], SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=99, max_tokens=10),
                             use_tqdm=False)[0].outputs[0].token_ids
    assert different != alone


def test_parallel_sampling_shares_prompt_blocks(llm):
    engine = llm.engine
    ids = llm.get_tokenizer().encode(PROMPTS[6])  # ~24 tokens: one full block and a partial one
    n_prompt_blocks = -(-len(ids) // engine.config.block_size)
    req = engine.add_request("share-test", None, SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=20),
                             prompt_token_ids=ids)
    proc = OutputProcessor(llm.get_tokenizer())  # the engine emits token deltas; accumulate them
    proc.add_request("share-test", None, ids, req.params)
    outs = []

    def step():
        outs.extend(out for out, _ in map(proc.process, engine.step()) if out is not None)

    step()  # prefill, then fork into 4 and sample
    assert len(req.seqs) == 4
    tables = [engine.blocks.block_ids(s.seq_id) for s in req.seqs]
    assert all(t == tables[0] for t in tables)
    assert engine.blocks.num_used_blocks() == n_prompt_blocks  # shared, not 4x
    step()  # each writes its own token: the shared partial block is copied on write
    tables = [engine.blocks.block_ids(s.seq_id) for s in req.seqs]
    assert len({t[0] for t in tables}) == 1  # the full prompt block stays shared
    assert engine.blocks.num_used_blocks() == 1 + 4 * (n_prompt_blocks - 1)
    while engine.has_unfinished_requests():
        step()
    final = outs[-1]
    assert final.finished and len(final.outputs) == 4
    assert len({tuple(o.token_ids) for o in final.outputs}) > 1
    assert engine.blocks.num_used_blocks() == 0
    engine.blocks.check_invariants()


def test_stop_strings_and_stop_token_ids(llm):
    base = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0].outputs[0]
    assert "\n\n" in base.text
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=16, stop=["\n\n"]), use_tqdm=False)[0].outputs[0]
    assert out.text == base.text[:base.text.index("\n\n")]
    assert out.finish_reason == "stop" and out.stop_reason == "\n\n"

    third = base.token_ids[2]
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[third]), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == base.token_ids[:3]  # the stop token is kept in token_ids, like EOS
    assert out.finish_reason == "stop" and out.stop_reason == third


def test_eos_min_tokens_ignore_eos_and_max_tokens(llm):
    chat = [{"role": "user", "content": "What is 2+2?"}]
    out = llm.chat(chat, SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)[0].outputs[0]
    assert out.text == "The answer to this classic math problem is 4."
    assert out.finish_reason == "stop" and out.token_ids[-1] == 2
    n_natural = len(out.token_ids)

    longer = llm.chat(chat, SamplingParams(temperature=0, max_tokens=40, min_tokens=n_natural + 3), use_tqdm=False)[0].outputs[0]
    assert len(longer.token_ids) >= n_natural + 3
    assert 2 not in longer.token_ids[:n_natural + 3]

    ignore = llm.chat(chat, SamplingParams(temperature=0, max_tokens=n_natural + 5, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert len(ignore.token_ids) == n_natural + 5 and ignore.finish_reason == "length"
    assert ignore.token_ids[n_natural - 1] == 2  # it went straight past EOS

    short = llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)[0].outputs[0]
    assert len(short.token_ids) == 3 and short.finish_reason == "length"


def test_logprobs_equal_transformers_log_softmax(llm, hf_model):
    ids = llm.get_tokenizer().encode(PROMPTS[3])
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=6, logprobs=5), use_tqdm=False)[0].outputs[0]
    full = torch.tensor([ids + out.token_ids])
    with torch.no_grad():
        ref = torch.log_softmax(hf_model(full).logits[0].double(), dim=-1)
    total = 0.0
    for i, (tok, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        row = ref[len(ids) - 1 + i]
        assert tok in entry and entry[tok].rank == 1  # greedy picks the top token
        assert len(entry) == 5  # the sampled token is among the top 5 here
        top_ids = row.topk(5).indices.tolist()
        assert set(entry) == set(top_ids)
        for t, lp in entry.items():
            assert abs(lp.logprob - row[t].item()) < 1e-4
        total += row[tok].item()
    assert abs(out.cumulative_logprob - total) < 1e-3


@pytest.mark.parametrize("kwargs, field", [
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=0), "top_k"),
    (dict(top_k=-2), "top_k"),
    (dict(n=0), "n"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(min_p=2.0), "min_p"),
    (dict(presence_penalty=3.0), "presence_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(logprobs=-1), "logprobs"),
])
def test_invalid_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_bad_prompts_raise_and_the_engine_keeps_serving(llm, hf_refs):
    limit = llm.engine.max_model_len
    with pytest.raises(ValueError, match="prompt"):
        llm.generate("", SamplingParams(max_tokens=2), use_tqdm=False)
    with pytest.raises(ValueError, match=f"prompt: {limit + 5} tokens.*{limit - 1}"):
        llm.generate([[5] * (limit + 5)], SamplingParams(max_tokens=2), use_tqdm=False)
    with pytest.raises(ValueError, match=r"prompt_token_ids: token id 49152 .*\[0, 49152\)"):
        llm.generate([[1, 2, 49152]], SamplingParams(max_tokens=2), use_tqdm=False)
    with pytest.raises(ValueError, match=r"prompt_token_ids: token id -1"):
        llm.generate([[1, -1]], SamplingParams(max_tokens=2), use_tqdm=False)
    # Nothing was left behind, and good requests still get the reference output.
    assert not llm.engine.has_unfinished_requests()
    out = llm.generate(PROMPTS[:2], SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in out] == [hf_refs[p] for p in PROMPTS[:2]]


def test_unknown_model_path_is_a_clear_error():
    with pytest.raises(ValueError, match="model: path '/nonexistent/model' does not exist"):
        LLM("/nonexistent/model")
    with pytest.raises(ValueError, match="model: 'no-such-org/no-such-model'"):
        LLM("no-such-org/no-such-model")


@pytest.mark.parametrize("shutdown_first", [True, False])
def test_a_dropped_llm_frees_its_weights_and_kv_pool(tmp_path, shutdown_first):
    """The engine freezes its objects for the collector at start (gc.freeze); dropping it must still free
    them. Before the fix a dropped 1B engine kept its 2.3 GiB of weights on the GPU for the process's life,
    and tensors in the frozen generation are invisible to gc.get_objects, so only a weak reference tells."""
    import gc
    import json
    import weakref

    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", rms_norm_eps=1e-5,
               bos_token_id=1, eos_token_id=2, torch_dtype="float32", hidden_size=64, intermediate_size=128,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
               max_position_embeddings=256)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    small = LLM(str(tmp_path), load_format="dummy", max_model_len=128, cpu_kv_cache_bytes=4 << 20)
    small.generate([[1, 2, 3]] * 2, SamplingParams(max_tokens=4), use_tqdm=False)
    weight = weakref.ref(next(small.engine.runner.model.parameters()))
    pool = weakref.ref(small.engine.runner.kv_caches[0])
    if shutdown_first:
        small.shutdown()
    del small
    gc.collect()
    assert weight() is None and pool() is None
