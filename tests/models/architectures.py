"""The architectures Folio serves, as the test suite builds them: each a tiny random-weight model made from
transformers' own config class, with shapes that exercise what is peculiar about it.

This list is the source of docs/models.md's table (scripts/models_table.py; a test checks they agree).
Adding an architecture: its file under services/engine/model/, one line in the registry, one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# hidden 64, 2 layers: big enough for GQA and real head sizes, small enough for ~30 of them on 2 cores.
BASE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=512, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)


@dataclass(frozen=True)
class Arch:
    id: str
    """Test id and table row."""
    architecture: str
    """config.json's `architectures` name."""
    config_class: str
    """transformers' config class that builds the reference model."""
    config: dict
    """Overrides on transformers' defaults: the tiny shape plus the peculiarities to exercise."""
    exercises: str
    """What the test shape covers, for the table."""
    attention: tuple[str, ...] = ()
    """Attention variants this model needs from the backend (sliding_window, softcap, alibi, odd_head_dim):
    each gets a pass through the Triton backend under the interpreter."""
    tp2: bool = False
    """Also checked with tensor_parallel_size=2 on CPU (gloo)."""
    extra: dict = field(default_factory=dict)


def cfg(**overrides) -> dict:
    return {**BASE, **overrides}


ARCHITECTURES: list[Arch] = [
    Arch("llama", "LlamaForCausalLM", "LlamaConfig", cfg(tie_word_embeddings=False),
         "GQA 4/2, head 16, untied LM head", tp2=True),
    Arch("llama-3.1", "LlamaForCausalLM", "LlamaConfig",
         cfg(tie_word_embeddings=True, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
             "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
         "llama3 rope scaling, tied embeddings"),
    Arch("llama-linear-rope", "LlamaForCausalLM", "LlamaConfig",
         cfg(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}, num_key_value_heads=1,
             attention_bias=True, mlp_bias=True),
         "linear rope scaling, MQA, attention and MLP biases"),
    Arch("llama-dynamic-rope", "LlamaForCausalLM", "LlamaConfig",
         cfg(rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}),
         "dynamic-NTK rope (within the original context)"),
    Arch("llama-yarn", "LlamaForCausalLM", "LlamaConfig",
         cfg(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
             "original_max_position_embeddings": 128}),
         "YaRN rope scaling (attention factor on cos/sin)"),
    Arch("mistral", "MistralForCausalLM", "MistralConfig", cfg(sliding_window=8, head_dim=32),
         "sliding window 8 (shorter than the prompts), head_dim 32 != hidden / heads", attention=("sliding_window",)),
    Arch("qwen2", "Qwen2ForCausalLM", "Qwen2Config", cfg(tie_word_embeddings=True),
         "q/k/v biases without o bias, tied embeddings", tp2=True),
    Arch("qwen3", "Qwen3ForCausalLM", "Qwen3Config", cfg(head_dim=24),
         "per-head q/k RMSNorm, head_dim 24"),
    Arch("aquila", "AquilaForCausalLM", "LlamaConfig", cfg(num_key_value_heads=4),
         "Llama layout under Aquila's name, MHA"),
    Arch("phi3", "Phi3ForCausalLM", "Phi3Config",
         cfg(original_max_position_embeddings=64, rope_parameters={
             "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
             "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5], "long_factor": [1.0, 2.0, 3.0, 4.0, 6.0, 8.0]}),
         "pre-fused qkv_proj / gate_up_proj, longrope (short factors, attention factor), partial rotary 0.75"),
    Arch("granite", "GraniteForCausalLM", "GraniteConfig",
         cfg(embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.2, logits_scaling=4.0),
         "embedding / residual / attention multipliers, logits scaling"),
    Arch("smollm3", "SmolLM3ForCausalLM", "SmolLM3Config", cfg(no_rope_layers=[1, 0]),
         "a layer without rotary (NoPE)"),
    Arch("internlm3", "InternLM3ForCausalLM", "InternLM3Config", cfg(attention_bias=True, mlp_bias=True),
         "q/k/v/o and MLP biases"),
    Arch("olmo2", "Olmo2ForCausalLM", "Olmo2Config", cfg(),
         "post-block norms, RMSNorm over all q / all k heads", tp2=True),
    Arch("cohere", "CohereForCausalLM", "CohereConfig", cfg(use_qk_norm=True, logit_scale=0.5),
         "parallel attention + MLP, bias-free LayerNorm, per-head q/k LayerNorm, interleaved rotary, logit scale"),
    Arch("glm", "GlmForCausalLM", "GlmConfig", cfg(head_dim=16),
         "interleaved rotary on half the head, q/k/v biases, pre-fused gate_up_proj"),
    Arch("glm4", "Glm4ForCausalLM", "Glm4Config", cfg(head_dim=16),
         "GLM + norms after attention and MLP"),
    Arch("gemma", "GemmaForCausalLM", "GemmaConfig", cfg(head_dim=32, num_key_value_heads=1),
         "(1 + w) RMSNorm, sqrt(hidden) embedding scale, GELU-tanh-and-mul, MQA, head_dim 32"),
    Arch("gemma2", "Gemma2ForCausalLM", "Gemma2Config",
         cfg(head_dim=16, sliding_window=8, attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
             query_pre_attn_scalar=24),
         "sliding / global layers, attention and final logit soft-caps, query_pre_attn_scalar, sandwich norms",
         attention=("sliding_window", "softcap")),
    Arch("gemma3", "Gemma3ForCausalLM", "Gemma3TextConfig",
         cfg(head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
             query_pre_attn_scalar=16, rope_parameters={
                 "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                 "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 8.0}}),
         "per-head (1 + w) q/k norms, local rope base for sliding layers, linear-scaled global rope",
         attention=("sliding_window",)),
]

# The GPT-style families: config classes that spell the shape their own way (GPT-2's n_embd...).
GPT2_SHAPE = dict(n_embd=64, n_layer=2, n_head=4, n_inner=96, n_positions=512, vocab_size=512, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0)
FALCON_SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_hidden_size=96, vocab_size=512,
                    max_position_embeddings=512, alibi=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
ARCHITECTURES += [
    Arch("gpt2", "GPT2LMHeadModel", "GPT2Config", dict(GPT2_SHAPE, scale_attn_by_inverse_layer_idx=True),
         "Conv1D weights read transposed, learned positions, LayerNorm with bias, GELU-new MLP, tied LM head, "
         "attention scale by 1 / layer"),
    Arch("gpt-bigcode", "GPTBigCodeForCausalLM", "GPTBigCodeConfig", dict(GPT2_SHAPE, multi_query=True),
         "multi-query attention (1 KV head) from one fused c_attn, learned positions, tied LM head"),
    Arch("gptj", "GPTJForCausalLM", "GPTJConfig", dict(GPT2_SHAPE, rotary_dim=6),
         "parallel attention + MLP from one LayerNorm, interleaved rotary on 6 of 16 features, LM head bias"),
    Arch("gpt-neox", "GPTNeoXForCausalLM", "GPTNeoXConfig",
         cfg(num_key_value_heads=4, use_parallel_residual=True, attention_bias=True,
             rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}),
         "parallel residual with two LayerNorms, per-head fused q/k/v regrouped at load, NeoX rotary on 1/4 of the head"),
    Arch("opt", "OPTForCausalLM", "OPTConfig",
         dict(hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=512,
              max_position_embeddings=512, word_embed_proj_dim=32, bos_token_id=1, eos_token_id=2, pad_token_id=0),
         "learned positions offset by 2, ReLU MLP, embeddings of 32 projected in and out, tied LM head"),
    Arch("opt-350m", "OPTForCausalLM", "OPTConfig",
         dict(hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=512,
              max_position_embeddings=512, do_layer_norm_before=False, bos_token_id=1, eos_token_id=2, pad_token_id=0),
         "LayerNorm after each block (OPT-350m), no final norm"),
    Arch("bloom", "BloomForCausalLM", "BloomConfig",
         dict(hidden_size=80, n_layer=2, n_head=5, vocab_size=512, bos_token_id=1, eos_token_id=2, pad_token_id=0),
         "ALiBi over 5 heads (slopes past the power of two), embedding LayerNorm, per-head fused q/k/v, tied LM head",
         attention=("alibi",)),
    Arch("falcon-7b", "FalconForCausalLM", "FalconConfig",
         dict(FALCON_SHAPE, new_decoder_architecture=False, multi_query=True, parallel_attn=True, bias=False),
         "old layout: multi-query, attention and MLP in parallel from one LayerNorm, no linear biases"),
    Arch("falcon-40b", "FalconForCausalLM", "FalconConfig",
         dict(FALCON_SHAPE, new_decoder_architecture=True, num_kv_heads=2, num_ln_in_parallel_attn=2),
         "new layout: 2 KV groups stored per group (regrouped at load), ln_attn / ln_mlp", tp2=True),
    Arch("falcon-seq", "FalconForCausalLM", "FalconConfig",
         dict(FALCON_SHAPE, new_decoder_architecture=False, multi_query=False, parallel_attn=False, bias=True),
         "old layout without multi-query: per-head fused q/k/v, sequential attention then MLP, biases"),
    Arch("mpt", "MptForCausalLM", "MptConfig",
         dict(d_model=96, n_heads=6, n_layers=2, max_seq_len=512, vocab_size=512,
              attn_config={"alibi": True, "clip_qkv": 0.3}, bos_token_id=1, eos_token_id=2, pad_token_id=0),
         "ALiBi with MPT's slopes over 6 heads, clip_qkv, bias-free LayerNorms and linears, tied LM head",
         attention=("alibi",)),
    Arch("phi", "PhiForCausalLM", "PhiConfig",
         cfg(num_key_value_heads=4, qk_layernorm=True, tie_word_embeddings=False,
             rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
         "parallel attention + MLP from one LayerNorm, NeoX rotary on half the head, q/k LayerNorm, LM head bias"),
    Arch("stablelm", "StableLmForCausalLM", "StableLmConfig",
         cfg(use_qkv_bias=True, qk_layernorm=True, use_parallel_residual=False,
             rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}),
         "q/k/v biases, per-head q/k LayerNorm weights, NeoX rotary on 1/4 of the head, sequential residual"),
    Arch("stablelm-parallel", "StableLmForCausalLM", "StableLmConfig",
         cfg(use_parallel_residual=True, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                          "partial_rotary_factor": 0.5}),
         "parallel residual (StableLM 2 12B)"),
    Arch("starcoder2", "Starcoder2ForCausalLM", "Starcoder2Config", cfg(sliding_window=8, use_bias=True),
         "sliding window 8 (shorter than the prompts), LayerNorm and linear biases, GELU-tanh MLP, GQA, tied",
         attention=("sliding_window",)),
    Arch("olmo", "OlmoForCausalLM", "OlmoConfig", cfg(clip_qkv=0.3),
         "parameter-free LayerNorms, clip_qkv, SwiGLU"),
    Arch("jais2", "Jais2ForCausalLM", "Jais2Config", cfg(head_dim=16, hidden_act="relu2"),
         "LayerNorm with bias, squared-ReLU ungated MLP with biases, q/k/v/o biases"),
]

# Mixtures of experts: several experts, top-k >= 2, expert intermediate size != the dense one where the family
# has both; every router rule and checkpoint layout of layers/moe.py.
MOE = dict(num_experts_per_tok=2)
ARCHITECTURES += [
    Arch("mixtral", "MixtralForCausalLM", "MixtralConfig", cfg(**MOE, num_local_experts=4),
         "4 experts, top-2 renormalised softmax routing, per-expert w1/w2/w3 tensors"),
    Arch("qwen2-moe", "Qwen2MoeForCausalLM", "Qwen2MoeConfig",
         cfg(**MOE, num_experts=6, moe_intermediate_size=32, shared_expert_intermediate_size=48,
             norm_topk_prob=False, mlp_only_layers=[1]),
         "6 experts of 32, top-2 without renormalising, sigmoid-gated shared expert of 48, a dense layer "
         "(mlp_only_layers), q/k/v biases", tp2=True),
    Arch("qwen3-moe", "Qwen3MoeForCausalLM", "Qwen3MoeConfig",
         cfg(num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32, norm_topk_prob=True, head_dim=24),
         "8 experts, top-3 renormalised, per-head q/k RMSNorm, head_dim 24"),
    Arch("olmoe", "OlmoeForCausalLM", "OlmoeConfig", cfg(**MOE, num_experts=4, clip_qkv=0.5, norm_topk_prob=False),
         "RMSNorm over all q / all k heads, clip_qkv after the norms, top-2 without renormalising"),
    Arch("phimoe", "PhimoeForCausalLM", "PhimoeConfig",
         cfg(**MOE, num_local_experts=4, attention_bias=True, lm_head_bias=True, router_jitter_noise=0.3),
         "sparsemixer top-2 routing (jitter threshold 0.3), LayerNorms with bias, q/k/v/o and LM head biases"),
    Arch("granitemoe", "GraniteMoeForCausalLM", "GraniteMoeConfig",
         cfg(**MOE, num_local_experts=4, embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.2,
             logits_scaling=4.0),
         "stacked input_linear / output_linear experts, softmax over the top-2 logits, Granite multipliers"),
    Arch("granitemoe-shared", "GraniteMoeSharedForCausalLM", "GraniteMoeSharedConfig",
         cfg(**MOE, num_local_experts=4, shared_intermediate_size=48, residual_multiplier=0.5),
         "GraniteMoE plus an ungated shared MLP of 48 stored pre-fused (shared_mlp.input_linear)"),
    Arch("gpt-oss", "GptOssForCausalLM", "GptOssConfig",
         cfg(**MOE, num_local_experts=4, head_dim=16, sliding_window=8, swiglu_limit=0.2,
             rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 32.0,
                              "beta_slow": 1.0, "original_max_position_embeddings": 128, "truncate": False}),
         "attention sinks, sliding (8) / full layers alternating, YaRN, expert and router biases, clamped SwiGLU "
         "(limit 0.2, so the clamps bite), interleaved stacked gate_up_proj", attention=("sliding_window", "sinks")),
]

# Registry names served by the same code as a tested entry, with no separate test model.
ALIASES: dict[str, str] = {"AquilaModel": "AquilaForCausalLM", "MPTForCausalLM": "MptForCausalLM"}

TABLE_BEGIN, TABLE_END = "<!-- models-table:begin -->", "<!-- models-table:end -->"
GPU_RESULTS = "bench/results/models_gpu_bf16.json"


def table_markdown(root=None) -> str:
    """docs/models.md's table: one row per test model, with what is verified for it and where."""
    import json
    from pathlib import Path

    from services.engine.model.registry import ARCHITECTURES as REGISTRY

    root = Path(root or Path(__file__).resolve().parents[2])
    gpu_file = root / GPU_RESULTS
    gpu = json.loads(gpu_file.read_text())["models"] if gpu_file.exists() else {}
    triton = {a.id for a in ARCHITECTURES if triton_pass(a)}
    rows = ["| Architecture | Code | Test model: what it exercises | CPU fp32 vs transformers | Triton (interpreter) "
            "| Tensor parallel (CPU, 2 ranks) | GPU bf16 vs transformers |",
            "|---|---|---|---|---|---|---|"]
    for a in ARCHITECTURES:
        module = REGISTRY[a.architecture][0]
        g = gpu.get(a.id)
        gpu_cell = "yes (greedy + prompt logprobs, H200)" if g and g.get("ok") else ("**differs**" if g else "")
        rows.append(f"| `{a.architecture}` | `model/{module}.py` | `{a.id}`: {a.exercises} | yes | "
                    f"{'yes' if a.id in triton else ''} | {'yes' if a.tp2 else ''} | {gpu_cell} |")
    aliases = ", ".join(f"`{k}` (as `{v}`)" for k, v in sorted(ALIASES.items()))
    return "\n".join(rows) + f"\n\nAlso accepted: {aliases}.\n"


def triton_pass(a: Arch) -> bool:
    """Whether tests/models/test_triton_backend.py runs this model through the Triton backend."""
    return a.id in TRITON_MODELS


TRITON_MODELS: set[str] = {"llama", "gemma", "qwen3", "mistral", "gemma2", "bloom", "mpt", "starcoder2"}
"""Also run through the Triton backend, one model per attention variant: GQA (llama), MQA with head_dim 32
(gemma), head_dim 24, not a power of two (qwen3), sliding window (mistral), soft-cap with interleaved
sliding layers (gemma2), ALiBi with BLOOM's and MPT's slopes over 5 and 6 heads (bloom, mpt), sliding window
with biases and GQA (starcoder2)."""


if __name__ == "__main__":  # python -m tests.models.architectures: rewrite docs/models.md's table
    import re
    from pathlib import Path

    doc = Path(__file__).resolve().parents[2] / "docs" / "models.md"
    text = doc.read_text()
    new = re.sub(f"{TABLE_BEGIN}.*?{TABLE_END}", lambda _: f"{TABLE_BEGIN}\n{table_markdown()}{TABLE_END}", text,
                 flags=re.S)
    doc.write_text(new)
    print(f"wrote {doc}")
