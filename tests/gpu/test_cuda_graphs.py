"""Decode steps replayed from CUDA graphs give the same tokens as eager steps (padded buckets, shrinking batches)."""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_graph_replay_matches_eager(random_llama_dir, dtype):
    from folio import LLM, SamplingParams

    prompts = [[3 + i * 7 + j for j in range(5 + 9 * i)] for i in range(7)]  # 7 sequences: a padded bucket (8)
    # Different lengths so the decode batch shrinks through several buckets.
    params = [SamplingParams(temperature=0, max_tokens=10 + 6 * i, ignore_eos=True, logprobs=2) for i in range(7)]
    runs = {}
    for eager in (True, False):
        llm = LLM(random_llama_dir, dtype=dtype, device="cuda", num_kv_blocks=256, max_model_len=512,
                  enforce_eager=eager)
        assert bool(llm.engine.runner.graphs) is not eager
        runs[eager] = llm.generate(prompts, params, use_tqdm=False)
        del llm
    for e, g in zip(runs[True], runs[False]):
        assert e.outputs[0].token_ids == g.outputs[0].token_ids
        for le, lg in zip(e.outputs[0].logprobs, g.outputs[0].logprobs):
            for t in le:
                assert abs(le[t].logprob - lg[t].logprob) < (1e-4 if dtype == "float32" else 2e-2)
