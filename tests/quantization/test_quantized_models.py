"""Quantized checkpoints of two architectures (Llama; Qwen2 with q/k/v biases and tied embeddings), each
written by tests/quantization/quantizer.py, served by Folio and compared with transformers running the
dequantized weights in float32: prefill logits within 1e-3 and greedy tokens equal on 6 prompts."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from folio import LLM, SamplingParams
from tests.models import harness
from tests.models.architectures import Arch
from tests.quantization import quantizer as qz

SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=512, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
             pad_token_id=0)
"""K = 128 and 256: every group size of the formats (32, 64, 128, whole row) divides it."""
ARCHS = {"llama": Arch("llama", "LlamaForCausalLM", "LlamaConfig", dict(SHAPE, tie_word_embeddings=False), ""),
         "qwen2": Arch("qwen2", "Qwen2ForCausalLM", "Qwen2Config", dict(SHAPE, tie_word_embeddings=True), "")}

SCHEMES = {
    "gptq-g128-sym-act-order": lambda s: qz.gptq(s, 128, sym=True, desc_act=True),
    "gptq-g32-asym": lambda s: qz.gptq(s, 32, sym=False, desc_act=False),
    "gptq-whole-row-asym-act-order": lambda s: qz.gptq(s, -1, sym=False, desc_act=True),
    "awq-g64": lambda s: qz.awq(s, 64),
    "awq-g32": lambda s: qz.awq(s, 32),
    "ct-w4a16-g32-sym": lambda s: qz.compressed_int4(s, 32, sym=True),
    "ct-w4a16-g128-asym": lambda s: qz.compressed_int4(s, 128, sym=False),
    "ct-w4a16-channel-sym": lambda s: qz.compressed_int4(s, -1, sym=True),
    "fp8-static": lambda s: qz.fp8_vllm(s, static=True),
    "fp8-dynamic": lambda s: qz.fp8_vllm(s, static=False),
    "fbgemm-fp8": qz.fbgemm,
    "ct-fp8-channel-dynamic": lambda s: qz.compressed_fp8(s, per_channel=True, static=False),
    "ct-fp8-tensor-static": lambda s: qz.compressed_fp8(s, per_channel=False, static=True),
}
CASES = [("llama", "gptq-g128-sym-act-order"), ("qwen2", "gptq-g32-asym"), ("qwen2", "gptq-whole-row-asym-act-order"),
         ("llama", "awq-g64"), ("qwen2", "awq-g32"),
         ("llama", "ct-w4a16-g32-sym"), ("qwen2", "ct-w4a16-g128-asym"), ("llama", "ct-w4a16-channel-sym"),
         ("llama", "fp8-static"), ("qwen2", "fp8-dynamic"), ("llama", "fbgemm-fp8"), ("qwen2", "fbgemm-fp8"),
         ("llama", "ct-fp8-channel-dynamic"), ("qwen2", "ct-fp8-tensor-static")]
PROMPT_LENS = (1, 3, 6, 11, 19, 30)
NEW_TOKENS = 6


def serve(directory, **kw) -> LLM:
    return LLM(str(directory), dtype="float32", attention_backend="torch", num_kv_blocks=64, max_model_len=128,
               enable_prefix_caching=False, **kw)


def compare(llm: LLM, ref, vocab: int, what: str) -> None:
    batch = harness.prompts(vocab, lens=PROMPT_LENS, seed=3)
    got = harness.folio_prefill_logits(llm.engine.runner, batch)
    for p, g in zip(batch, got):
        err = (g - harness.hf_logits(ref, p)).abs().max().item()
        assert err <= 1e-3, f"{what}: prompt of {len(p)} tokens: max |logit diff| {err:.2e} > 1e-3"
    outs = llm.generate([{"prompt_token_ids": p} for p in batch],
                        SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True), use_tqdm=False)
    for p, o, want in zip(batch, outs, harness.hf_greedy_many(ref, batch, NEW_TOKENS)):
        assert o.outputs[0].token_ids == want, f"{what}: prompt of {len(p)} tokens"


def quantized_checkpoint(tmp_path, arch_id: str, make):
    arch = ARCHS[arch_id]
    ref = harness.build_checkpoint(arch, tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    tensors, qc, deq = make(state)
    qz.write(tmp_path, tensors, qc)
    ref.load_state_dict({k: v for k, v in deq.items()}, strict=False)  # the dequantized weights, float32
    return arch, ref


@pytest.mark.parametrize("arch_id, scheme", CASES, ids=[f"{a}-{s}" for a, s in CASES])
def test_quantized_checkpoint_matches_dequantized_reference(tmp_path, arch_id, scheme):
    arch, ref = quantized_checkpoint(tmp_path, arch_id, SCHEMES[scheme])
    llm = serve(tmp_path)
    try:
        assert llm.engine.runner.model.quant_config is not None
        compare(llm, ref, arch.config["vocab_size"], f"{arch_id} {scheme}")
    finally:
        llm.shutdown()


def test_fp8_at_load_from_a_float_checkpoint(tmp_path):
    """quantization="fp8" on a 16/32-bit checkpoint: per-channel FP8 weights made at load."""
    arch = ARCHS["llama"]
    ref = harness.build_checkpoint(arch, tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    deq = {}
    for name in qz.linear_names(state):  # per output row: scale = max |w| / 448, round to e4m3
        w = state[name + ".weight"]
        s = w.abs().amax(1, keepdim=True) / 448.0
        deq[name + ".weight"] = (w / s).to(torch.float8_e4m3fn).float() * s
    ref.load_state_dict(deq, strict=False)
    llm = serve(tmp_path, quantization="fp8")
    try:
        compare(llm, ref, arch.config["vocab_size"], "llama fp8 at load")
    finally:
        llm.shutdown()


def test_fp8_gemm_path_matches_compressed_tensors_own_forward(tmp_path, monkeypatch):
    """The GPU path's arithmetic (FP8 activations per token, torch._scaled_mm, which also runs on CPU)
    against transformers loading the same compressed-tensors checkpoint, whose forward quantizes the
    activations itself: an independent implementation of the whole W8A8 scheme."""
    import transformers

    from services.engine.model.quantization import fp8

    arch, _ = quantized_checkpoint(tmp_path, "llama", lambda s: qz.compressed_fp8(s, per_channel=True, static=False))
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    monkeypatch.setattr(fp8.FP8Method, "use_scaled_mm", staticmethod(lambda x, n, k: True))
    monkeypatch.setattr(fp8, "WEIGHT_ONLY_MAX_M", 0)  # every M on the W8A8 path (decode's weight-only one aside)
    llm = serve(tmp_path)
    try:
        batch = harness.prompts(arch.config["vocab_size"], lens=(5, 17), seed=4)
        for p, g in zip(batch, harness.folio_prefill_logits(llm.engine.runner, batch)):
            err = (g - harness.hf_logits(ref, p)).abs().max().item()
            assert err <= 1e-3, f"prompt of {len(p)} tokens: max |logit diff| {err:.2e}"
    finally:
        llm.shutdown()


def test_compressed_tensors_w4a16_matches_transformers_own_loader(tmp_path):
    """transformers' compressed-tensors integration decompresses the same checkpoint itself (symmetric:
    its asymmetric path does not load compressed-tensors 0.20's packed zero points)."""
    import transformers

    arch, _ = quantized_checkpoint(tmp_path, "qwen2", lambda s: qz.compressed_int4(s, 32, sym=True))
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    llm = serve(tmp_path)
    try:
        compare(llm, ref, arch.config["vocab_size"], "qwen2 ct-w4a16 vs transformers")
    finally:
        llm.shutdown()


@pytest.mark.parametrize("scheme", ["gptq-g32-asym"])
def test_tensor_parallel_cuts_quantized_tensors(tmp_path, scheme):
    """tensor_parallel_size=2 (CPU, gloo): packed words, packed zero points and group scales are cut by the
    linear layers' loaders (output features for q/k/v and gate/up, input groups for o and down)."""
    arch, ref = quantized_checkpoint(tmp_path, "qwen2", SCHEMES[scheme])
    batch = harness.prompts(arch.config["vocab_size"], lens=PROMPT_LENS, seed=3)
    llm = serve(tmp_path, tensor_parallel_size=2)
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in batch],
                            SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True), use_tqdm=False)
    finally:
        llm.shutdown()
    for p, o, want in zip(batch, outs, harness.hf_greedy_many(ref, batch, NEW_TOKENS)):
        assert o.outputs[0].token_ids == want, f"{scheme}: prompt of {len(p)} tokens"
