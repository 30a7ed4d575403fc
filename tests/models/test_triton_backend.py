"""The Triton attention backend (under the interpreter on CPU) on the architectures listed in
architectures.TRITON_MODELS: prefill logits and greedy tokens equal transformers', like the torch pass."""

from __future__ import annotations

import pytest

from folio import LLM, SamplingParams
from tests.models import harness
from tests.models.architectures import ARCHITECTURES, triton_pass

CASES = [a for a in ARCHITECTURES if triton_pass(a)]


@pytest.mark.parametrize("arch", CASES, ids=[a.id for a in CASES])
def test_triton_backend_matches_transformers(arch, tmp_path):
    ref = harness.build_checkpoint(arch, tmp_path)
    llm = LLM(str(tmp_path), dtype="float32", attention_backend="triton", max_num_batched_tokens=16,
              num_kv_blocks=32, max_model_len=128)
    try:
        batch = harness.prompts(arch.config["vocab_size"], lens=(7, 20), seed=5)
        for p, got in zip(batch, harness.folio_prefill_logits(llm.engine.runner, batch)):
            err = (got - harness.hf_logits(ref, p)).abs().max().item()
            assert err <= 1e-4, f"{arch.id}: prompt of {len(p)} tokens: max |logit diff| {err:.2e}"
        # Chunked prefill (the extend kernel) then decode steps (the decode kernel), two sequences.
        outs = llm.generate([{"prompt_token_ids": p} for p in batch],
                            SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
        for p, o in zip(batch, outs):
            assert o.outputs[0].token_ids == harness.hf_greedy(ref, p, n=4), f"{arch.id}: prompt of {len(p)} tokens"
    finally:
        llm.shutdown()
