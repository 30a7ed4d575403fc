"""Mixture-of-experts on CUDA: the fused-MoE kernel compiled (bf16 and fp32) against its torch reference, and
MoE models through the engine, eager and with decode CUDA graphs, each giving transformers' greedy tokens
(float32; a failure names the run that differs), and the two runs the same logprobs."""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

MODELS = ["mixtral", "qwen2-moe", "qwen3-moe", "olmoe", "phimoe", "granitemoe", "granitemoe-shared", "gpt-oss"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 16, 257])
def test_fused_moe_compiled_matches_reference(dtype, T):
    from kernels.fused_moe import fused_moe, fused_moe_ref

    g = torch.Generator(device="cuda").manual_seed(T)
    E, k, H, inter = 16, 4, 512, 320
    w13 = (torch.randn(E, 2 * inter, H, generator=g, device="cuda") / H ** 0.5).to(dtype)
    w2 = (torch.randn(E, H, inter, generator=g, device="cuda") / inter ** 0.5).to(dtype)
    x = torch.randn(T, H, generator=g, device="cuda").to(dtype)
    ids = torch.rand(T, E, generator=g, device="cuda").topk(k, dim=1).indices
    tw = torch.softmax(torch.randn(T, k, generator=g, device="cuda"), dim=1)
    got, want = fused_moe(x, w13, w2, tw, ids), fused_moe_ref(x, w13, w2, tw, ids)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert ((got.float() - want.float()).norm() / want.float().norm()).item() < tol


@pytest.mark.parametrize("arch_id", MODELS)
def test_moe_model_with_cuda_graphs_matches_transformers(arch_id, tmp_path):
    from folio import LLM, SamplingParams
    from tests.models import harness
    from tests.models.architectures import ARCHITECTURES

    arch = next(a for a in ARCHITECTURES if a.id == arch_id)
    ref = harness.build_checkpoint(arch, tmp_path)  # float32 on the CPU: the reference
    prompts = harness.prompts(arch.config["vocab_size"])
    params = SamplingParams(temperature=0, max_tokens=harness.NEW_TOKENS, ignore_eos=True, logprobs=2)
    runs = {}
    for eager in (True, False):
        llm = LLM(str(tmp_path), dtype="float32", device="cuda", num_kv_blocks=128, max_model_len=256,
                  enforce_eager=eager, max_num_batched_tokens=16)
        assert bool(llm.engine.runner.graphs) is not eager
        runs[eager] = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        llm.shutdown()
        del llm
    wrong = []  # both runs against transformers, so a failure says which run (and prompt) differs
    for p, e, g in zip(prompts, runs[True], runs[False]):
        want = harness.hf_greedy(ref, p)
        for run, out in (("eager", e), ("CUDA-graph", g)):
            got = out.outputs[0].token_ids
            if got != want:
                at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
                wrong.append(f"{run} run, prompt of {len(p)} tokens: differs at token {at}: {got} != {want}")
    assert not wrong, f"{arch_id}: " + "; ".join(wrong)
    for p, e, g in zip(prompts, runs[True], runs[False]):
        for le, lg in zip(e.outputs[0].logprobs, g.outputs[0].logprobs):
            for t in le:
                assert abs(le[t].logprob - lg[t].logprob) < 1e-4, f"{arch_id}: prompt of {len(p)} tokens: eager " \
                    f"and CUDA-graph logprobs of token {t} differ"
