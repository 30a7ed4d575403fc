"""The model's fused-kernel forward (the GPU path) equals its torch forward, under the interpreter on CPU."""

import pytest
import torch

from services.engine.attention.metadata import AttentionMetadata
from services.engine.attention.torch_backend import TorchAttentionBackend
from services.engine.model.registry import build_model

LLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=300, hidden_size=64,
             intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=256, tie_word_embeddings=False)
# Qwen3: per-head q/k norm between the projection and the in-place rotary kernel.
QWEN3 = dict(LLAMA, architectures=["Qwen3ForCausalLM"], model_type="qwen3")
# Mixtures of experts: the fused-MoE kernel in place of the torch reference (SwiGLU; gpt-oss's clamped
# SwiGLU with expert biases, a limit small enough to clamp the dummy weights' activations).
MIXTRAL = dict(LLAMA, architectures=["MixtralForCausalLM"], model_type="mixtral", num_local_experts=4,
               num_experts_per_tok=2)
GPT_OSS = dict(MIXTRAL, architectures=["GptOssForCausalLM"], model_type="gpt_oss", attention_bias=True,
               layer_types=["sliding_attention", "full_attention"], sliding_window=4, swiglu_limit=0.01)


@pytest.mark.parametrize("hf", [LLAMA, QWEN3, MIXTRAL, GPT_OSS], ids=["llama", "qwen3", "mixtral", "gpt-oss"])
def test_fused_forward_matches_torch_forward(hf):
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    outs = []
    for fused in (False, True):
        model = build_model(hf, TorchAttentionBackend(), torch.float32, dev)
        model.init_dummy(seed=3)
        model.set_fused_elementwise(fused)
        kv = [torch.zeros(2, 8, 4, 2, 16, device=dev) for _ in range(2)]
        # two sequences: a 5-token prefill and a 3-token prefill
        ids = torch.tensor([5, 9, 33, 2, 7, 11, 12, 13], device=dev)
        pos = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2], device=dev)
        i32 = dict(dtype=torch.int32, device=dev)
        meta = AttentionMetadata(
            num_seqs=2, num_tokens=8, query_start_loc=torch.tensor([0, 5, 8], **i32),
            seq_lens=torch.tensor([5, 3], **i32), block_tables=torch.tensor([[0, 1], [2, 0]], **i32),
            slot_mapping=torch.tensor([0, 1, 2, 3, 4, 8, 9, 10], device=dev), max_query_len=5, max_seq_len=5,
            query_lens_cpu=[5, 3], seq_lens_cpu=[5, 3])
        outs.append(model.logits(model.forward(ids, pos, kv, meta)))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=1e-4)
