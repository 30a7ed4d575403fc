"""A bfloat16 model whose every projection and LM head go through kernels/dense_gemm.py (a dispatch table
listing the model's shapes; the kernel under the Triton interpreter on CPU): the same greedy tokens as with
torch's matmul, and prefill logits as close to transformers' (float32) as torch's own bfloat16 path."""

from __future__ import annotations

import pytest
import torch

from folio import LLM, SamplingParams
from tests.models import harness
from tests.models.architectures import ARCHITECTURES

LLAMA = next(a for a in ARCHITECTURES if a.id == "llama")


def test_projections_through_dense_gemm_keep_tokens_and_logits(tmp_path, monkeypatch):
    pytest.importorskip("triton")
    from kernels import dense_gemm as dg
    from services.engine.model.layers import dense_dispatch as dd

    ref = harness.build_checkpoint(LLAMA, tmp_path)
    llm = LLM(str(tmp_path), dtype="bfloat16", device="cpu", num_kv_blocks=32, max_model_len=128)
    try:
        shapes = {tuple(m.weight.shape) for m in llm.engine.runner.model.modules()
                  if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2
                  and type(m).__name__ != "VocabParallelEmbedding"}
        assert len(shapes) == 5  # qkv, o, gate_up, down, LM head
        cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, SWAP=True, SPLIT_K=None, num_warps=4, num_stages=2)
        for n, k in shapes:
            monkeypatch.setitem(dd.TABLE, ("cpu", n, k), ((4096, cfg),))
        calls = []
        real = dg.dense_gemm
        monkeypatch.setattr(dg, "dense_gemm", lambda *a, **kw: calls.append(a[1].shape) or real(*a, **kw))
        # Prompts whose reference greedy tokens each lead the runner-up by >= 0.03 (4 bfloat16 steps at these
        # logits' size): a near-tie would let either path's rounding flip a token, whichever matmul runs.
        batch = harness.prompts(LLAMA.config["vocab_size"], lens=(5, 11), seed=7)
        want_tokens = []
        for p in batch:
            toks, margin = greedy_with_margin(ref, p, 4)
            assert margin >= 0.03, margin
            want_tokens.append(toks)
        params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)

        def run():
            logits = harness.folio_prefill_logits(llm.engine.runner, batch)
            outs = llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)
            return logits, [o.outputs[0].token_ids for o in outs]

        table_logits, table_tokens = run()
        assert {tuple(s) for s in calls} == shapes  # every projection and the LM head went through the kernel
        monkeypatch.setattr(dd, "ENABLED", False)
        n_calls = len(calls)
        torch_logits, torch_tokens = run()
        assert len(calls) == n_calls
        assert table_tokens == torch_tokens == want_tokens
        for p, a, b in zip(batch, table_logits, torch_logits):
            want = harness.hf_logits(ref, p)
            err_table, err_torch = (a - want).abs().max().item(), (b - want).abs().max().item()
            assert err_table <= max(2 * err_torch, 0.05), (err_table, err_torch)
    finally:
        llm.shutdown()


@torch.no_grad()
def greedy_with_margin(model, prompt: list[int], n: int) -> tuple[list[int], float]:
    """transformers' greedy tokens (float32) and the smallest lead of a chosen token over the runner-up."""
    ids, margin = list(prompt), float("inf")
    for _ in range(n):
        top = model(torch.tensor([ids])).logits[0, -1].topk(2)
        margin = min(margin, float(top.values[0] - top.values[1]))
        ids.append(int(top.indices[0]))
    return ids[len(prompt):], margin
