"""Tensor parallelism (2 ranks on CPU, gloo) on the architectures marked tp2: transformers' greedy tokens.
OLMo 2 is among them for its q/k RMSNorm over all heads, whose mean square is all-reduced across ranks."""

from __future__ import annotations

import pytest

from folio import LLM, SamplingParams
from tests.models import harness
from tests.models.architectures import ARCHITECTURES

TP2 = [a for a in ARCHITECTURES if a.tp2]


@pytest.mark.parametrize("arch", TP2, ids=[a.id for a in TP2])
def test_tp2_gives_transformers_greedy_tokens(arch, tmp_path):
    ref = harness.build_checkpoint(arch, tmp_path)
    batch = harness.prompts(arch.config["vocab_size"])
    llm = LLM(str(tmp_path), tensor_parallel_size=2, dtype="float32", attention_backend="torch",
              max_num_batched_tokens=16, num_kv_blocks=64, max_model_len=128)
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in batch],
                            SamplingParams(temperature=0, max_tokens=harness.NEW_TOKENS, ignore_eos=True),
                            use_tqdm=False)
    finally:
        llm.shutdown()
    for p, o, want in zip(batch, outs, harness.hf_greedy_many(ref, batch)):
        assert o.outputs[0].token_ids == want, f"{arch.id}: prompt of {len(p)} tokens"
