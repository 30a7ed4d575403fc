"""Rope scalings against transformers' own frequency functions, including past the original context
(where the end-to-end tests, on short prompts, do not reach): long factors, dynamic NTK's grown base."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from services.engine.model.config import ModelConfig
from services.engine.model.layers.rotary import RotaryEmbedding, rope_parameters

HEAD = 32
CASES = {
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128},
    "yarn-mscale": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "mscale": 1.0, "mscale_all_dim": 0.5,
                    "beta_fast": 16, "beta_slow": 2, "original_max_position_embeddings": 64},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    "longrope": {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 64,
                 "short_factor": [1.0 + i / 10 for i in range(HEAD // 2)],
                 "long_factor": [1.0 + i for i in range(HEAD // 2)]},
}


def _pair(params: dict):
    hf = LlamaConfig(hidden_size=HEAD * 2, num_attention_heads=2, num_hidden_layers=1, vocab_size=8,
                     max_position_embeddings=512, rope_parameters=dict(params))
    cfg = ModelConfig.from_hf({**hf.to_dict(), "architectures": ["LlamaForCausalLM"]})
    return hf, RotaryEmbedding(cfg, HEAD, rope_parameters(cfg))


@pytest.mark.parametrize("name", list(CASES))
def test_frequencies_and_attention_factor_match_transformers(name):
    hf, rope = _pair(CASES[name])
    inv, factor = ROPE_INIT_FUNCTIONS[hf.rope_parameters["rope_type"]](hf, "cpu")
    torch.testing.assert_close(rope.inv_freq, inv.float(), rtol=1e-6, atol=0)
    assert rope.attention_factor == pytest.approx(factor)


def test_longrope_uses_the_long_factors_past_the_original_context():
    hf, rope = _pair(CASES["longrope"])
    long_inv, factor = ROPE_INIT_FUNCTIONS["longrope"](hf, "cpu", seq_len=65)
    pos = torch.tensor([10, 63, 64, 300])
    cos, _ = rope.cos_sin(pos)
    short_inv, _ = ROPE_INIT_FUNCTIONS["longrope"](hf, "cpu")
    want = torch.stack([(p * (long_inv if p >= 64 else short_inv)).cos() * factor for p in pos.tolist()])
    torch.testing.assert_close(cos, want.float(), rtol=1e-5, atol=1e-6)


def test_dynamic_ntk_grows_the_base_per_token_past_max_position_embeddings():
    hf, rope = _pair(CASES["dynamic"])
    pos = torch.tensor([5, 511, 512, 900])
    cos, _ = rope.cos_sin(pos)
    want = []
    for p in pos.tolist():
        inv, _ = ROPE_INIT_FUNCTIONS["dynamic"](hf, "cpu", seq_len=p + 1)
        want.append((p * inv).cos())
    torch.testing.assert_close(cos, torch.stack(want).float(), rtol=1e-5, atol=1e-5)
