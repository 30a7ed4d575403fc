"""Every architecture in tests/models/architectures.py against transformers on the same random weights,
in float32: prefill logits at every position, and greedy tokens with chunked prefill forced."""

from __future__ import annotations

import pytest
import torch

from folio import LLM, SamplingParams
from tests.models import harness
from tests.models.architectures import ARCHITECTURES, Arch


@pytest.fixture(scope="module", params=ARCHITECTURES, ids=[a.id for a in ARCHITECTURES])
def case(request, tmp_path_factory):
    arch: Arch = request.param
    d = tmp_path_factory.mktemp(arch.id)
    ref = harness.build_checkpoint(arch, d)
    # A step budget of 16 tokens chunks every prompt longer than that (mixed prefill + decode steps).
    llm = LLM(str(d), dtype="float32", attention_backend="torch", max_num_batched_tokens=16, num_kv_blocks=96,
              max_model_len=256, enable_prefix_caching=False)
    yield arch, ref, llm
    llm.shutdown()


def test_prefill_logits_match_transformers(case):
    arch, ref, llm = case
    batch = harness.prompts(arch.config["vocab_size"], lens=(7, 30, 2), seed=5)
    got = harness.folio_prefill_logits(llm.engine.runner, batch)
    for p, g in zip(batch, got):
        want = harness.hf_logits(ref, p)
        err = (g - want).abs().max().item()
        assert err <= 1e-4, f"{arch.id}: prompt of {len(p)} tokens: max |logit diff| {err:.2e} > 1e-4"


def test_greedy_tokens_match_transformers_with_chunked_prefill(case):
    arch, ref, llm = case
    batch = harness.prompts(arch.config["vocab_size"])
    outs = llm.generate([{"prompt_token_ids": p} for p in batch],
                        SamplingParams(temperature=0, max_tokens=harness.NEW_TOKENS, ignore_eos=True), use_tqdm=False)
    for p, o, want in zip(batch, outs, harness.hf_greedy_many(ref, batch)):
        assert o.outputs[0].token_ids == want, f"{arch.id}: prompt of {len(p)} tokens"
