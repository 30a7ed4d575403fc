"""The engine's warm-up steps (ModelRunner.warmup_steps) stay inside the limits the engine runs under and cover
the kernel builds a real step can pick: fresh prompts and chunks after cached tokens at 1, 16-divisible and
odd sequence counts, 32 or more sequences, and a step of the largest size. Running them on a tiny CPU model
leaves its KV-free state as it was (they use scratch blocks only)."""

import json

import pytest

from folio import LLM
from services.engine.model_runner import ModelRunner


@pytest.mark.parametrize("max_len,max_seqs,max_tokens", [(4096, 256, 8192), (64, 256, 2048), (8, 4, 16),
                                                         (1, 1, 1), (2048, 1024, 512)])
def test_warmup_steps_fit_the_limits(max_len, max_seqs, max_tokens):
    steps = ModelRunner.warmup_steps(max_len, max_seqs, max_tokens)
    for i, lens in enumerate(steps):
        assert lens and all(1 <= n <= ctx <= max_len for n, ctx in lens)
        if i >= len(ModelRunner.WARMUP_STEPS):  # (the fixed steps are a few tokens of up to 3 sequences)
            assert len(lens) <= max_seqs and sum(n for n, _ in lens) <= max_tokens
    big = steps[-1]
    assert sum(n for n, _ in big) <= max_tokens
    if max_len >= 4096:  # room for the largest step: it takes all the tokens a step may have
        assert sum(n for n, _ in big) == max_tokens - max_tokens % len(big)
    counts = {(len(lens), all(n == ctx for n, ctx in lens)) for lens in steps}
    for n in ModelRunner.WARMUP_SEQ_COUNTS:
        if n <= min(max_seqs, max_tokens):
            assert (n, True) in counts and ((n, False) in counts or max_len < 2), n


def test_warmup_runs_on_a_tiny_model(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", rms_norm_eps=1e-5,
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        head_dim=16, vocab_size=64, max_position_embeddings=256, eos_token_id=2)))
    llm = LLM(str(tmp_path), load_format="dummy", dtype="float32", device="cpu", block_size=4, num_kv_blocks=512,
              max_num_seqs=48, max_num_batched_tokens=256, seed=0)
    engine = llm.engine
    free = engine.blocks.num_free_blocks
    engine.runner.warmup(engine.max_model_len, 48, 256)
    assert engine.blocks.num_free_blocks == free
