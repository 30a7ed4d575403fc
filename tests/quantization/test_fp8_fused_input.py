"""FP8 activations quantized by the layer that produces them (fused add + RMSNorm + FP8, SwiGLU + FP8) give the
same model output as each FP8 linear quantizing its own input, and FP8 outputs whose scales the next kernel
applies (FP8Output) the same as scaled outputs, within rounding: the GPU's paths, run on CPU under the Triton
interpreter (quantization/fp8.py's on_fp8_gpu pointed at the CPU; nothing else is replaced)."""

import pytest
import torch

from kernels import fp8_w8a8
from services.engine.attention.metadata import AttentionMetadata
from services.engine.attention.torch_backend import TorchAttentionBackend, paged_attention_ref
from services.engine.model.quantization import fp8
from services.engine.model.registry import build_model

LLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=300, hidden_size=64,
             intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=256, tie_word_embeddings=False)
T = 20  # tokens: above fp8.WEIGHT_ONLY_MAX_M, so the FP8 layers take quantized activations


class RotaryCacheBackend(TorchAttentionBackend):
    """The torch backend with the Triton backend's fused rotary + cache write (kernels/rotary.py, under the
    interpreter): the layer runs rotary_and_cache, which applies q/k/v's deferred FP8 scales."""

    fuses_rotary_cache = True

    def forward(self, q, k, v, kv_cache, meta, params, cache_written=False):
        if cache_written:
            return paged_attention_ref(q, kv_cache, meta, params)
        return super().forward(q, k, v, kv_cache, meta, params)


def forward(fuse: bool, monkeypatch, defer: bool = False, backend=TorchAttentionBackend):
    """The logits of 20 tokens (two prefills), and the types of each FP8 layer's input and output in call order."""
    monkeypatch.setattr(fp8, "FUSE_INPUT_QUANT", fuse)
    monkeypatch.setattr(fp8, "DEFER_SCALES", defer)
    model = build_model(LLAMA, backend(), torch.float32, "cpu", quantization="fp8")
    model.init_dummy(seed=5)
    model.set_fused_elementwise(True)
    seen = []
    apply = fp8.FP8Method.apply

    def spy(self, layer, x, bias):
        y = apply(self, layer, x, bias)
        seen.append(f"{type(x).__name__}->{type(y).__name__}")
        return y

    monkeypatch.setattr(fp8.FP8Method, "apply", spy)
    try:
        return run(model), seen
    finally:
        monkeypatch.setattr(fp8.FP8Method, "apply", apply)


def run(model):
    kv = [torch.zeros(2, 8, 4, 2, 16) for _ in range(2)]
    ids = torch.arange(T) * 7 % 300
    pos = torch.cat([torch.arange(12), torch.arange(8)])
    i32 = dict(dtype=torch.int32)
    meta = AttentionMetadata(
        num_seqs=2, num_tokens=T, query_start_loc=torch.tensor([0, 12, T], **i32), seq_lens=torch.tensor([12, 8], **i32),
        block_tables=torch.tensor([[0, 1, 2], [3, 4, 0]], **i32),
        slot_mapping=torch.cat([torch.arange(12), torch.arange(12, 20)]), max_query_len=12, max_seq_len=12,
        query_lens_cpu=[12, 8], seq_lens_cpu=[12, 8])
    return model.logits(model.forward(ids, pos, kv, meta))


@pytest.mark.parametrize("w8a8", [False, True], ids=["scaled_mm", "triton_w8a8"])
def test_fp8_producer_quantization_equals_linear_quantization_gpu_paths_on_cpu(w8a8, monkeypatch):
    monkeypatch.setattr(fp8, "on_fp8_gpu", lambda t: True)
    if w8a8:  # the Triton FP8 x FP8 GEMM for every layer at this M
        cfg = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, SPLIT_K=2, num_warps=4, num_stages=1)
        monkeypatch.setattr(fp8_w8a8, "TUNED", {(64, n, k): cfg for n, k in ((128, 64), (64, 64), (192, 64), (64, 96))})
    fused, seen_fused = forward(True, monkeypatch)
    plain, seen_plain = forward(False, monkeypatch)
    # per layer: qkv (from the input norm) and gate_up, down (from SwiGLU) arrive quantized; o does not
    assert seen_fused == ["FP8Input->Tensor", "Tensor->Tensor", "FP8Input->Tensor", "FP8Input->Tensor"] * 2
    assert seen_plain == ["Tensor->Tensor"] * 8
    assert torch.equal(fused, plain)
    assert torch.isfinite(fused).all() and fused.abs().max() > 0
    if w8a8:  # the Triton GEMM against torch._scaled_mm on the same quantized activations
        monkeypatch.setattr(fp8_w8a8, "TUNED", {})
        torch.testing.assert_close(forward(True, monkeypatch)[0], fused, rtol=1e-4, atol=1e-4)


def test_fp8_deferred_scales_equal_scaled_outputs_gpu_paths_on_cpu(monkeypatch):
    monkeypatch.setattr(fp8, "on_fp8_gpu", lambda t: True)
    deferred, seen = forward(True, monkeypatch, defer=True)
    scaled, _ = forward(True, monkeypatch, defer=False)
    # o, gate_up and down leave their scales to the next kernel (the norm, SwiGLU); qkv's output is split; the last
    # layer's down feeds a plain add (LlamaForCausalLM.run) and is scaled by its GEMM
    layer = ["FP8Input->Tensor", "Tensor->FP8Output", "FP8Input->FP8Output", "FP8Input->FP8Output"]
    assert seen == layer + layer[:3] + ["FP8Input->Tensor"]
    torch.testing.assert_close(deferred, scaled, rtol=1e-4, atol=1e-4)


def test_fp8_qkv_scales_deferred_to_the_rotary_cache_kernel_gpu_paths_on_cpu(monkeypatch):
    """Where the backend turns q/k and writes the cache in one kernel, qkv leaves its scales to that kernel too
    (FP8Output; kernels/rotary.py applies them): the logits equal the scaled forward's within rounding, and an
    fp8 KV pool (written by reshape_and_cache) keeps qkv scaled by its GEMM."""
    monkeypatch.setattr(fp8, "on_fp8_gpu", lambda t: True)
    scaled, _ = forward(True, monkeypatch, defer=False, backend=RotaryCacheBackend)
    deferred, seen = forward(True, monkeypatch, defer=True, backend=RotaryCacheBackend)
    layer = ["FP8Input->FP8Output", "Tensor->FP8Output", "FP8Input->FP8Output", "FP8Input->FP8Output"]
    assert seen == layer + layer[:3] + ["FP8Input->Tensor"]
    torch.testing.assert_close(deferred, scaled, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(deferred, forward(True, monkeypatch, defer=True)[0], rtol=1e-4, atol=1e-4)
    model = build_model(LLAMA, RotaryCacheBackend(), torch.float32, "cpu", quantization="fp8")
    model.set_fused_elementwise(True)
    attn = model.model.layers[0].self_attn
    fp8_pool = torch.zeros(2, 8, 4, 2, 16, dtype=torch.float8_e4m3fn)
    assert attn.attn.applies_qkv_scales(attn.rotary_emb, torch.zeros(2, 8, 4, 2, 16), torch.float32)
    assert not attn.attn.applies_qkv_scales(attn.rotary_emb, fp8_pool, torch.float32)


def test_fp8_deferred_scales_only_up_to_the_shape_bound_gpu_paths_on_cpu(monkeypatch):
    """DEFER_MAX_M: down (N 64, K 96) above 10 rows scales its own output; the logits do not change."""
    monkeypatch.setattr(fp8, "on_fp8_gpu", lambda t: True)
    scaled, _ = forward(True, monkeypatch, defer=False)
    monkeypatch.setattr(fp8, "DEFER_MAX_M", {(64, 96): 10})
    bounded, seen = forward(True, monkeypatch, defer=True)
    assert seen == ["FP8Input->Tensor", "Tensor->FP8Output", "FP8Input->FP8Output", "FP8Input->Tensor"] * 2
    torch.testing.assert_close(bounded, scaled, rtol=1e-4, atol=1e-4)


def test_fp8_o_proj_input_quantized_by_the_decode_kernel_gpu_paths_on_cpu(monkeypatch):
    """On the Triton backend a decode step's attention kernel quantizes its output for the FP8 o_proj
    (kernels/paged_decode.py, fp8_out): o receives an FP8Input there (not in the prefill step), and the logits are
    the same bits as with o quantizing its own input (ATTENTION_QUANT off)."""
    from services.engine.attention.triton_backend import TritonAttentionBackend

    monkeypatch.setattr(fp8, "on_fp8_gpu", lambda t: True)
    i32 = dict(dtype=torch.int32)
    steps = [  # two prompts of 5 and 3 tokens (20 rows with padding: above WEIGHT_ONLY_MAX_M), then 20 decodes
        (torch.arange(T) % 50, torch.cat([torch.arange(5), torch.arange(3), torch.zeros(12, dtype=torch.long)]),
         AttentionMetadata(num_seqs=2, num_tokens=T, query_start_loc=torch.tensor([0, 5, 8], **i32),
                           seq_lens=torch.tensor([5, 3], **i32), block_tables=torch.tensor([[0, 1], [2, 0]], **i32),
                           slot_mapping=torch.cat([torch.tensor([0, 1, 2, 3, 4, 8, 9, 10]), torch.full((12,), -1)]),
                           max_query_len=5, max_seq_len=5, query_lens_cpu=[5, 3], seq_lens_cpu=[5, 3])),
        (torch.arange(T) + 40, torch.tensor([5, 3] * 10),
         AttentionMetadata(num_seqs=T, num_tokens=T, query_start_loc=torch.arange(T + 1, **i32),
                           seq_lens=torch.tensor([6, 4] * 10, **i32),
                           block_tables=torch.tensor([[0, 1], [2, 0]] * 10, **i32),
                           slot_mapping=torch.tensor([5, 11] + [-1] * 18), max_query_len=1, max_seq_len=6,
                           query_lens_cpu=[1] * T, seq_lens_cpu=[6, 4] * 10)),
    ]
    runs = []
    for fused in (True, False):
        monkeypatch.setattr(fp8, "ATTENTION_QUANT", fused)
        model = build_model(LLAMA, TritonAttentionBackend(), torch.float32, "cpu", quantization="fp8")
        model.init_dummy(seed=5)
        model.set_fused_elementwise(True)
        kv = [torch.zeros(2, 8, 4, 2, 16) for _ in range(2)]
        seen, apply = [], fp8.FP8Method.apply

        def spy(self, layer, x, bias, seen=seen, apply=apply):
            seen.append(type(x).__name__)
            return apply(self, layer, x, bias)

        monkeypatch.setattr(fp8.FP8Method, "apply", spy)
        runs.append(([model.logits(model.forward(ids, pos, kv, meta)) for ids, pos, meta in steps], seen))
        monkeypatch.setattr(fp8.FP8Method, "apply", apply)
    (fused_logits, seen), (plain_logits, plain_seen) = runs
    # o is the second FP8 layer of each layer's four; 2 layers per step, prefill then decode
    assert [seen[i] for i in (1, 5, 9, 13)] == ["Tensor", "Tensor", "FP8Input", "FP8Input"]
    assert [plain_seen[i] for i in (1, 5, 9, 13)] == ["Tensor"] * 4
    for a, b in zip(fused_logits, plain_logits):
        assert torch.equal(a, b) and torch.isfinite(a).all()
