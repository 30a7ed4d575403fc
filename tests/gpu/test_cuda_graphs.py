"""Decode steps replayed from CUDA graphs give the same tokens as eager steps (padded buckets, shrinking batches)."""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=32, max_position_embeddings=1024,
                         initializer_range=0.1, bos_token_id=1, eos_token_id=2)
    path = tmp_path_factory.mktemp("graph-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_graph_replay_matches_eager(model_dir, dtype):
    from folio import LLM, SamplingParams

    prompts = [[3 + i * 7 + j for j in range(5 + 9 * i)] for i in range(7)]  # 7 sequences: a padded bucket (8)
    # Different lengths so the decode batch shrinks through several buckets.
    params = [SamplingParams(temperature=0, max_tokens=10 + 6 * i, ignore_eos=True, logprobs=2) for i in range(7)]
    runs = {}
    for eager in (True, False):
        llm = LLM(str(model_dir), dtype=dtype, device="cuda", num_kv_blocks=256, max_model_len=512,
                  enforce_eager=eager)
        assert bool(llm.engine.runner.graphs) is not eager
        runs[eager] = llm.generate(prompts, params, use_tqdm=False)
        del llm
    for e, g in zip(runs[True], runs[False]):
        assert e.outputs[0].token_ids == g.outputs[0].token_ids
        for le, lg in zip(e.outputs[0].logprobs, g.outputs[0].logprobs):
            for t in le:
                assert abs(le[t].logprob - lg[t].logprob) < (1e-4 if dtype == "float32" else 2e-2)
