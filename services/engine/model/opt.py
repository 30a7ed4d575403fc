"""OPT: learned positions offset by 2, LayerNorm before (or, OPT-350m, after) each block, q/k/v/out and
fc1/fc2 with biases, ReLU MLP; where word_embed_proj_dim differs from hidden_size the embeddings are
projected in and the final hidden states out (project_in / project_out); tied LM head."""

from __future__ import annotations

import torch

from services.engine.model.base import CausalLM
from services.engine.model.gpt2 import GPTAttention, tie_default
from services.engine.model.gptj import STACKED_QKV
from services.engine.model.layers.embedding import (LogitsProcessor, ParallelLMHead, PositionEmbedding,
                                                    VocabParallelEmbedding)
from services.engine.model.layers.activation import get_activation
from services.engine.model.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from services.engine.model.layers.norm import LayerNorm


class OPTDecoderLayer(torch.nn.Module):
    def __init__(self, m: "OPTForCausalLM", i: int):
        super().__init__()
        cfg = m.cfg
        h, bias, affine = cfg.hidden_size, cfg.get("enable_bias", True), cfg.get("layer_norm_elementwise_affine", True)
        self.pre_norm = cfg.get("do_layer_norm_before", True)
        self.self_attn = GPTAttention(m, i, "qkv_proj", "out_proj", qkv_bias=bias, out_bias=bias)
        self.self_attn_layer_norm = LayerNorm(h, 1e-5, affine=affine)
        self.fc1 = ColumnParallelLinear(h, cfg.intermediate_size, bias=bias, tp=m.tp, what="ffn_dim")
        self.act = get_activation(cfg.get("activation_function", "relu"), cfg.source)
        self.fc2 = RowParallelLinear(cfg.intermediate_size, h, bias=bias, tp=m.tp, what="ffn_dim")
        self.final_layer_norm = LayerNorm(h, 1e-5, affine=affine)

    def mlp(self, x):
        return self.fc2(self.act(self.fc1(x)))

    def forward(self, positions, h, kv_cache, meta):
        if self.pre_norm:
            h = h + self.self_attn(positions, self.self_attn_layer_norm(h), kv_cache, meta)
            return h + self.mlp(self.final_layer_norm(h))
        h = self.self_attn_layer_norm(h + self.self_attn(positions, h, kv_cache, meta))
        return self.final_layer_norm(h + self.mlp(h))


class OPTDecoder(torch.nn.Module):
    def __init__(self, m: "OPTForCausalLM"):
        super().__init__()
        cfg = m.cfg
        h, proj = cfg.hidden_size, m.proj_dim
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, proj, m.tp)
        self.embed_positions = PositionEmbedding(cfg.max_position_embeddings, h, offset=2)
        self.project_in = ReplicatedLinear(proj, h) if proj != h else None
        self.project_out = ReplicatedLinear(h, proj) if proj != h else None
        self.layers = torch.nn.ModuleList(OPTDecoderLayer(m, i) for i in range(cfg.num_hidden_layers))
        final = cfg.get("do_layer_norm_before", True) and not cfg.get("_remove_final_layer_norm", False)
        self.final_layer_norm = (LayerNorm(h, 1e-5, affine=cfg.get("layer_norm_elementwise_affine", True))
                                 if final else None)


class OPTModel(torch.nn.Module):
    def __init__(self, m: "OPTForCausalLM"):
        super().__init__()
        self.decoder = OPTDecoder(m)


class OPTForCausalLM(CausalLM):
    config_aliases = {"intermediate_size": ("ffn_dim",)}
    stacked_params = STACKED_QKV

    @classmethod
    def make_config(cls, hf, source):
        return tie_default(cls, hf, source)

    def __init__(self, cfg, backend, tp=None):
        super().__init__(cfg, backend, tp)
        self.proj_dim = cfg.get("word_embed_proj_dim", cfg.hidden_size)
        self.model = OPTModel(self)
        dec = self.model.decoder
        self.lm_head = ParallelLMHead(cfg.vocab_size, self.proj_dim, tp,
                                      tie_to=dec.embed_tokens if cfg.tie_word_embeddings else None)
        self.logits_processor = LogitsProcessor(cfg.vocab_size, tp=tp)

    def checkpoint_name(self, name):
        return name if name.startswith(("model.", "lm_head.")) else "model." + name  # older: "decoder.layers..."

    def final_norm(self, h):
        dec = self.model.decoder
        if dec.final_layer_norm is not None:
            h = dec.final_layer_norm(h)
        return dec.project_out(h) if dec.project_out is not None else h

    def run(self, input_ids, positions, kv_caches, meta):
        dec = self.model.decoder
        h = dec.embed_tokens(input_ids)
        if dec.project_in is not None:
            h = dec.project_in(h)
        h = h + dec.embed_positions(positions)
        for i, layer in enumerate(dec.layers):
            h = layer(positions, h, kv_caches[i], meta)
        return h
