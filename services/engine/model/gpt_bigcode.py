"""GPT BigCode (StarCoder, SantaCoder): GPT-2's blocks with ordinary Linear weights and multi-query attention
(one K/V head; c_attn's rows are all q heads, then k, then v). Without multi_query, c_attn's rows are per
head [q, k, v] and are regrouped at load."""

from __future__ import annotations

from services.engine.model.gpt2 import GPT2LMHeadModel, tie_default
from services.engine.model.layers.linear import per_head_qkv_to_blocks


class GPTBigCodeForCausalLM(GPT2LMHeadModel):
    conv1d = ()

    @classmethod
    def make_config(cls, hf, source):
        cfg = tie_default(cls, hf, source)
        if hf.get("multi_query", True):
            cfg.num_key_value_heads = 1
        return cfg

    def adapt_tensor(self, name, t):
        if ".c_attn." in name and self.cfg.num_key_value_heads != 1:
            h, d = self.cfg.num_attention_heads, self.cfg.head_dim
            return t.mapped(lambda x: per_head_qkv_to_blocks(x, h, d))
        return t
