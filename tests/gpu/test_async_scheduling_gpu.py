"""On CUDA (graphs and pinned copies), asynchronous scheduling gives the synchronous loop's tokens.

The CPU twin is tests/test_async_scheduling.py; here the device-side input fill, the CUDA-graph decode
replay and the non-blocking copy of the sampled tokens are the parts under test. One engine, float32,
async off then on.
"""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("eager", [False, True])
def test_async_matches_sync_on_cuda(eager):
    from folio import LLM, SamplingParams

    llm = LLM(dtype="float32", device="cuda", num_kv_blocks=64, max_model_len=256, max_num_batched_tokens=128,
              enforce_eager=eager)  # 64 blocks x 16 for 12 sequences: preemption too
    engine = llm.engine
    overlapped = [0]
    step = engine.step

    def spy():
        deltas = step()
        overlapped[0] += engine._inflight is not None
        return deltas

    engine.step = spy
    prompts = [f"Question {i}: what is {i} times {i + 3}? Answer briefly and then explain the steps." for i in range(12)]
    params = [SamplingParams(temperature=0, max_tokens=40 + 8 * (i % 4), stop_token_ids=[13] if i % 3 == 0 else [])
              if i % 2 == 0 else SamplingParams(temperature=0.8, seed=i, max_tokens=48, n=1 + i % 3, logprobs=1)
              for i in range(12)]
    runs = {}
    for mode in (False, True):
        engine.async_scheduling = mode
        overlapped[0] = 0
        outs = llm.generate(prompts, params, use_tqdm=False)
        runs[mode] = [[(c.token_ids, c.finish_reason, c.text) for c in o.outputs] for o in outs]
        if mode:
            assert overlapped[0] > 10
    assert runs[True] == runs[False]
    del llm
    torch.cuda.empty_cache()
