"""Megatron-style tensor-parallel sharding of a Llama checkpoint (HF tensor names) for one rank.

Column-parallel (output rows split): q/k/v by heads (KV heads split, so each rank caches only its
KV heads), gate/up by the FFN dimension. Row-parallel (input columns split; the outputs are partial
sums that the model all-reduces): o_proj, down_proj. Embedding and LM head are split by vocabulary
rows; the vocabulary is padded with zero rows to a multiple of the TP size (padded logits are cut
after the gather). Norms are replicated.
"""

from __future__ import annotations

import torch




def check_tensor_parallel(cfg, tp: int) -> None:
    """Refuse, at start, a model whose heads or FFN cannot be split evenly over `tp` ranks."""
    if tp < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {tp}")
    hq, hkv, ffn = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size
    if hq % tp or hkv % tp:
        raise ValueError(
            f"tensor_parallel_size {tp} must divide the model's attention heads: it has {hq} query heads "
            f"and {hkv} KV heads (choose a tensor_parallel_size that divides both, e.g. "
            f"{[d for d in range(1, hkv + 1) if hq % d == 0 and hkv % d == 0]})")
    if ffn % tp:
        raise ValueError(f"tensor_parallel_size {tp} must divide the model's intermediate_size {ffn}")


def vocab_shard_size(vocab_size: int, tp: int) -> int:
    """Rows of the embedding / LM head each rank holds (the vocabulary padded up to tp * this)."""
    return -(-vocab_size // tp)


def shard_checkpoint(tensors: dict[str, torch.Tensor], cfg, rank: int, tp: int) -> dict[str, torch.Tensor]:
    """HF-named full tensors -> this rank's shards (same names). Consumes `tensors`: each full tensor
    is dropped as soon as its shard is cut, so peak memory stays near one full copy."""
    d = cfg.head_dim
    q_rows = cfg.num_attention_heads // tp * d
    kv_rows = cfg.num_key_value_heads // tp * d
    ffn = cfg.intermediate_size // tp
    vshard = vocab_shard_size(cfg.vocab_size, tp)

    def rows(t, n):
        return t.narrow(0, rank * n, n).clone()  # clone: a view would keep the full tensor alive

    def cols(t, n):
        return t.narrow(1, rank * n, n).contiguous()

    def vocab_rows(t):
        start, stop = rank * vshard, min((rank + 1) * vshard, t.shape[0])
        part = t[start:stop]
        if stop - start < vshard:  # the last shard's padding rows: never looked up, logits cut
            part = torch.cat([part, part.new_zeros(vshard - (stop - start), *t.shape[1:])])
        return part.clone()

    out = {}
    for name in list(tensors):
        t = tensors.pop(name)
        leaf = name.rsplit(".", 2)[-2:]  # e.g. ["q_proj", "weight"]
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            out[name] = vocab_rows(t)
        elif leaf[0] == "q_proj":
            out[name] = rows(t, q_rows)
        elif leaf[0] in ("k_proj", "v_proj"):
            out[name] = rows(t, kv_rows)
        elif leaf[0] in ("gate_proj", "up_proj"):
            out[name] = rows(t, ffn)
        elif leaf == ["o_proj", "weight"]:
            out[name] = cols(t, q_rows)
        elif leaf == ["down_proj", "weight"]:
            out[name] = cols(t, ffn)
        elif leaf[0] in ("o_proj", "down_proj"):
            raise ValueError(f"model: tensor parallelism does not support a bias on row-parallel {name}")
        else:
            out[name] = t  # norms: replicated
    return out
