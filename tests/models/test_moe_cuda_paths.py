"""MoE models on the code paths a GPU takes, run on CPU under the Triton interpreter: the Triton attention
kernels (gpt-oss: sinks, sliding / full layers) and the fused-MoE kernel with the fused elementwise kernels,
in place of the torch backend and reference. Greedy tokens equal transformers' (prefill, then decode steps)."""

from __future__ import annotations

import pytest

from folio import LLM, SamplingParams
from tests.models import harness
from tests.models.architectures import ARCHITECTURES


@pytest.mark.parametrize("arch_id", ["gpt-oss", "qwen2-moe"])
def test_moe_model_on_gpu_kernels_matches_transformers(arch_id, tmp_path):
    arch = next(a for a in ARCHITECTURES if a.id == arch_id)
    ref = harness.build_checkpoint(arch, tmp_path)
    llm = LLM(str(tmp_path), dtype="float32", attention_backend="triton", max_num_batched_tokens=16,
              num_kv_blocks=32, max_model_len=128)
    try:
        model = llm.engine.runner.model
        model.set_fused_elementwise(True)  # as on CUDA (registry.build_model): FusedMoE runs the kernel
        assert all(m.fused for m in model.modules() if type(m).__name__ == "FusedMoE")
        batch = harness.prompts(arch.config["vocab_size"], lens=(1, 11))  # a 1-token prompt: the GPU failure's
        outs = llm.generate([{"prompt_token_ids": p} for p in batch],
                            SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)
        for p, o in zip(batch, outs):
            assert o.outputs[0].token_ids == harness.hf_greedy(ref, p, n=3), f"{arch_id}: prompt of {len(p)} tokens"
    finally:
        llm.shutdown()
