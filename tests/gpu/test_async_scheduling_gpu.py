"""On CUDA (graphs and pinned copies), asynchronous scheduling gives the synchronous loop's tokens.

The CPU twin is tests/test_async_scheduling.py; here the device-side input fill, the CUDA-graph decode
replay and the non-blocking copy of the sampled tokens are the parts under test. One engine, float32,
async off then on, on a random-weight Llama (the GPU machine has no bundled model; token ids in and out).
"""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("eager", [False, True])
def test_async_matches_sync_on_cuda(random_llama_dir, eager):
    from folio import LLM, SamplingParams
    from tests.test_async_scheduling import each_mode, overlap_counter, summary

    llm = LLM(random_llama_dir, dtype="float32", device="cuda", num_kv_blocks=64, max_model_len=256,
              max_num_batched_tokens=128, enforce_eager=eager)  # 64 blocks x 16 for 12 sequences: preemption too
    engine = llm.engine
    overlapped = overlap_counter(engine)
    prompts = [[3 + (i * 37 + j * 11) % 2000 for j in range(6 + 5 * i)] for i in range(12)]
    params = [SamplingParams(temperature=0, max_tokens=40 + 8 * (i % 4), stop_token_ids=[13] if i % 3 == 0 else [])
              if i % 2 == 0 else SamplingParams(temperature=0.8, seed=i, max_tokens=48, n=1 + i % 3, logprobs=1)
              for i in range(12)]
    runs = {}
    for mode in each_mode(engine):
        overlapped[0] = 0
        runs[mode] = summary(llm.generate(prompts, params, use_tqdm=False))
        if mode:
            assert overlapped[0] > 10
    assert runs[True] == runs[False]
    del llm
    torch.cuda.empty_cache()
