"""kernels/pdl.py on a GPU: with programmatic dependent launch on (and with EARLY: each kernel lets the next launch
before its own wait), CUDA-graphed decode (and eager prefill) give the tokens and logprobs they give without it:
every kernel waits for its predecessor before reading."""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available() or
                                                  torch.cuda.get_device_capability()[0] < 9,
                                                  reason="needs a CUDA GPU of compute capability 9.0 or newer")]


def test_pdl_changes_no_token(random_llama_dir, monkeypatch):
    from folio import LLM, SamplingParams
    from kernels import pdl

    prompts = [[3 + i * 7 + j for j in range(5 + 9 * i)] for i in range(5)]
    params = [SamplingParams(temperature=0, max_tokens=12 + 5 * i, ignore_eos=True, logprobs=2) for i in range(5)]
    runs = {}
    for mode in ("off", "on", "early"):
        monkeypatch.setattr(pdl, "ENABLED", mode != "off")
        monkeypatch.setattr(pdl, "EARLY", mode == "early")
        llm = LLM(random_llama_dir, dtype="float32", device="cuda", num_kv_blocks=256, max_model_len=512)
        assert pdl.on(torch.zeros(1, device="cuda")) is (mode != "off")
        runs[mode] = llm.generate(prompts, params, use_tqdm=False)
        del llm
    for a, b in [*zip(runs["off"], runs["on"]), *zip(runs["off"], runs["early"])]:
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            for t in la:
                assert abs(la[t].logprob - lb[t].logprob) < 1e-4
