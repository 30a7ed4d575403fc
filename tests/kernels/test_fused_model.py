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


def test_rotary_writes_the_cache_on_the_triton_backend(monkeypatch):
    """On the Triton backend a Llama layer turns q and k and writes k and v into the cache in one kernel
    (kernels/rotary.py, rotary_and_cache) and the backend skips its own cache write: logits and the KV pool
    equal the torch backend's unfused forward's, over a prefill step then a decode step."""
    from kernels import rotary as rotary_kernels
    from services.engine.attention.triton_backend import TritonAttentionBackend

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    calls = []
    real = rotary_kernels.rotary_and_cache

    def spy(*args, **kw):
        calls.append(real(*args, **kw))
        return calls[-1]

    monkeypatch.setattr(rotary_kernels, "rotary_and_cache", spy)
    i32 = dict(dtype=torch.int32, device=dev)
    steps = [  # (ids, positions, metadata): two prompts of 5 and 3 tokens, then one decode each
        (torch.tensor([5, 9, 33, 2, 7, 11, 12, 13], device=dev), torch.tensor([0, 1, 2, 3, 4, 0, 1, 2], device=dev),
         AttentionMetadata(num_seqs=2, num_tokens=8, query_start_loc=torch.tensor([0, 5, 8], **i32),
                           seq_lens=torch.tensor([5, 3], **i32), block_tables=torch.tensor([[0, 1], [2, 0]], **i32),
                           slot_mapping=torch.tensor([0, 1, 2, 3, 4, 8, 9, 10], device=dev), max_query_len=5,
                           max_seq_len=5, query_lens_cpu=[5, 3], seq_lens_cpu=[5, 3])),
        (torch.tensor([40, 41], device=dev), torch.tensor([5, 3], device=dev),
         AttentionMetadata(num_seqs=2, num_tokens=2, query_start_loc=torch.tensor([0, 1, 2], **i32),
                           seq_lens=torch.tensor([6, 4], **i32), block_tables=torch.tensor([[0, 1], [2, 0]], **i32),
                           slot_mapping=torch.tensor([5, 11], device=dev), max_query_len=1, max_seq_len=6,
                           query_lens_cpu=[1, 1], seq_lens_cpu=[6, 4])),
    ]
    runs = []
    for backend, fused in ((TorchAttentionBackend(), False), (TritonAttentionBackend(), True)):
        model = build_model(LLAMA, backend, torch.float32, dev)
        model.init_dummy(seed=3)
        model.set_fused_elementwise(fused)
        kv = [torch.zeros(2, 8, 4, 2, 16, device=dev) for _ in range(2)]
        logits = [model.logits(model.forward(ids, pos, kv, meta)) for ids, pos, meta in steps]
        runs.append((logits, kv))
    assert calls == [True] * 4  # two layers, two steps: every layer took the one-kernel path
    for a, b in zip(runs[1][0], runs[0][0]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    for a, b in zip(runs[1][1], runs[0][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cfg", [dict(KERNEL="gemv4", T=8, BLOCK_N=32, num_warps=1, PER_SM=3),
                                 dict(KERNEL="gemv3", T=8, BLOCK_N=32, num_warps=1, SPLIT_K=2)], ids=["gemv4", "gemv3"])
def test_w4a16_swiglu_in_the_gate_up_gemv_at_batch_1(monkeypatch, cfg):
    """A 4-bit Llama decoding one token with the fused path: the gate/up GEMV (gemv4 or gemv3) returns
    silu(gate) * up itself and the MLP passes it on; the logits equal the unfused Triton path's (GEMV, then the
    SwiGLU kernel) and the dequantize-then-matmul reference's."""
    from kernels import w4a16
    from services.engine.model.quantization import int4

    hf = dict(LLAMA, quantization_config={"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": True,
                                          "desc_act": False})
    inter, hidden = LLAMA["intermediate_size"], LLAMA["hidden_size"]
    monkeypatch.setitem(w4a16.TUNED, (1, 2 * inter, hidden), cfg)
    calls = []
    real = w4a16.w4a16

    def spy(*a, **k):
        calls.append(k.get("gated", False))
        return real(*a, **k)

    monkeypatch.setattr(int4, "w4a16", spy)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    outs = {}
    for name, kernels, fuse in (("reference", False, False), ("unfused", True, False), ("fused", True, True)):
        monkeypatch.setattr(int4, "_kernels", lambda x, on=kernels: on)
        monkeypatch.setattr(int4, "FUSE_SWIGLU", fuse)
        model = build_model(hf, TorchAttentionBackend(), torch.float32, dev)
        model.init_dummy(seed=4)
        model.set_fused_elementwise(kernels)
        kv = [torch.zeros(2, 8, 4, 2, 16, device=dev) for _ in range(2)]
        i32 = dict(dtype=torch.int32, device=dev)
        meta = AttentionMetadata(
            num_seqs=1, num_tokens=1, query_start_loc=torch.tensor([0, 1], **i32), seq_lens=torch.tensor([1], **i32),
            block_tables=torch.tensor([[0, 1]], **i32), slot_mapping=torch.tensor([0], device=dev), max_query_len=1,
            max_seq_len=1, query_lens_cpu=[1], seq_lens_cpu=[1])
        calls.clear()
        outs[name] = model.logits(model.forward(torch.tensor([7], device=dev), torch.tensor([0], device=dev), kv, meta))
        assert calls.count(True) == (2 if fuse else 0)  # each layer's gate/up, gated
    torch.testing.assert_close(outs["fused"], outs["unfused"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs["fused"], outs["reference"], atol=1e-4, rtol=1e-4)
