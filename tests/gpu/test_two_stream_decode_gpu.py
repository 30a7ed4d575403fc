"""Decode graphs recorded as two half batches on two CUDA streams (EngineConfig.two_stream_decode_from) give the
tokens and logprobs of single-stream graphs, through padded buckets and a shrinking batch."""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_two_stream_decode_graphs_match_one_stream(random_llama_dir, dtype):
    from folio import LLM, SamplingParams

    prompts = [[3 + i * 7 + j for j in range(5 + 9 * i)] for i in range(11)]  # 11 sequences: bucket 16, padded
    params = [SamplingParams(temperature=0, max_tokens=8 + 5 * i, ignore_eos=True, logprobs=2) for i in range(11)]
    runs = {}
    for split_from in (0, 2):
        llm = LLM(random_llama_dir, dtype=dtype, device="cuda", num_kv_blocks=256, max_model_len=512,
                  two_stream_decode_from=split_from)
        assert llm.engine.runner.graphs.two_stream_from == split_from
        runs[split_from] = llm.generate(prompts, params, use_tqdm=False)
        del llm
    for one, two in zip(runs[0], runs[2]):
        if dtype == "float32":
            assert one.outputs[0].token_ids == two.outputs[0].token_ids
        agree = sum(a == b for a, b in zip(one.outputs[0].token_ids, two.outputs[0].token_ids))
        assert agree >= len(one.outputs[0].token_ids) * (1.0 if dtype == "float32" else 0.5)
        for lo, lt, a, b in zip(one.outputs[0].logprobs, two.outputs[0].logprobs, one.outputs[0].token_ids,
                                two.outputs[0].token_ids):
            if a != b:
                break  # past a bf16 near-tie the two runs decode different texts
            for t in lo:
                if t in lt:
                    assert abs(lo[t].logprob - lt[t].logprob) < (1e-4 if dtype == "float32" else 5e-2)
