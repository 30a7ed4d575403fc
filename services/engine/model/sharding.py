"""The start-up check that a model splits evenly over tensor-parallel ranks (the cuts themselves are in
layers/linear.py and layers/embedding.py, applied while loading)."""

from __future__ import annotations


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
