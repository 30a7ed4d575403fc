"""Building an engine's device side: load the model runner, size the KV pool, compile and capture before serving.

LLMEngine.__init__ (services/engine/engine.py) calls these in order: `load_runner`, `fit_kv_pool` (which sizes the
pool with `size_kv_pool` and settles max_model_len against it), `prepare_runner`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from services.engine.config import EngineConfig
from services.engine.model_runner import ModelRunner, kv_bytes_per_block

log = logging.getLogger("folio.engine")


def load_runner(c: EngineConfig, model_dir: Path, hf_config: dict, dtype: torch.dtype, device: torch.device,
                attention_backend: str):
    """The model on its device(s): one ModelRunner, or rank 0 of a tensor-parallel group of processes
    (services/engine/parallel.py)."""
    if c.tensor_parallel_size > 1:
        from services.engine.parallel import TensorParallelRunner

        runner = TensorParallelRunner(model_dir, hf_config, dtype, device,
                                      attention_backend, c.block_size, c.load_format, c.tensor_parallel_size,
                                      c.seed, c.tp_collective_timeout_s, c.kv_cache_dtype,
                                      quantization=c.quantization)
    else:
        runner = ModelRunner(model_dir, hf_config, dtype, device, attention_backend,
                             c.block_size, c.load_format, kv_cache_dtype=c.kv_cache_dtype,
                             quantization=c.quantization)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # give loading's transient copies back before sizing the KV pool
    return runner


def fit_kv_pool(c: EngineConfig, runner, device: torch.device, max_num_batched_tokens: int) -> tuple[int, int]:
    """Size the KV pool (in blocks) and settle `max_model_len` against it and the model's context:
    (num_blocks, max_model_len)."""
    context = runner.cfg.max_position_embeddings
    max_model_len = c.max_model_len or context
    if max_model_len > context:
        raise ValueError(f"max_model_len ({max_model_len}) exceeds the model's context length ({context})")
    num_blocks = size_kv_pool(c, runner, device, max_num_batched_tokens)
    capacity = num_blocks * c.block_size
    if capacity < max_model_len and c.max_model_len is None:
        # Not asked for explicitly: fit the context limit to the pool rather than refuse to start.
        log.warning("max_model_len lowered from %d to %d to fit the KV pool", max_model_len, capacity)
        max_model_len = capacity
    if capacity < max_model_len:
        raise ValueError(
            f"num_kv_blocks: {num_blocks} blocks of {c.block_size} tokens cannot hold one sequence of "
            f"max_model_len {max_model_len}; give more KV memory or a smaller max_model_len")
    return num_blocks, max_model_len


def size_kv_pool(c: EngineConfig, runner, device: torch.device, max_num_batched_tokens: int) -> int:
    """Blocks the KV pool gets: num_kv_blocks if given; on CPU cpu_kv_cache_bytes' worth; on CUDA what
    gpu_memory_utilization leaves after the weights, the largest step's activations and a margin."""
    # Per rank: each holds 1/tensor_parallel_size of the KV heads (and of the pool's bytes).
    per_block = kv_bytes_per_block(runner.cfg, c.block_size, runner.kv_dtype) // c.tensor_parallel_size
    if c.num_kv_blocks is not None:
        return c.num_kv_blocks
    if device.type != "cuda":
        return max(1, c.cpu_kv_cache_bytes // per_block)
    free, total = torch.cuda.mem_get_info(device)
    # Memory torch's allocator holds but no tensor uses (an earlier engine in this process, load-time
    # temporaries) is free for the pool: cudaMemGetInfo counts it as used.
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    used_now = total - free  # weights and anything else already resident
    m = runner.cfg
    # Activations of the largest step: hidden states, fused qkv and gate/up, logits, in float32 at worst.
    act = max_num_batched_tokens * (4 * m.hidden_size + 2 * m.intermediate_size
                                    + (m.num_attention_heads + 2 * m.num_key_value_heads) * m.head_dim) * 4
    act += c.max_num_seqs * m.vocab_size * 4 * 4
    budget = int(total * c.gpu_memory_utilization) - used_now - act - (512 << 20)
    if budget < per_block:
        raise ValueError(f"gpu_memory_utilization {c.gpu_memory_utilization}: no GPU memory left for the KV pool")
    n = budget // per_block
    log.info("KV pool: %.2f GiB (%d blocks); weights %.2f GiB", n * per_block / 2**30, n,
             runner.weight_bytes() / 2**30)
    return n


def prepare_runner(c: EngineConfig, runner, device: torch.device, num_blocks: int, max_model_len: int,
                   max_num_batched_tokens: int) -> None:
    """Allocate the KV pool; on CUDA compile every kernel (warm-up) and capture the step graphs."""
    runner.allocate_kv_cache(num_blocks)
    if device.type != "cuda":
        return
    runner.warmup(max_model_len, c.max_num_seqs, max_num_batched_tokens)
    if not c.enforce_eager:
        runner.capture_decode_graphs(min(c.max_num_seqs, max_num_batched_tokens), max_model_len)
        if c.mixed_cuda_graphs:
            runner.capture_mixed_graphs(min(c.max_mixed_graph_tokens, max_num_batched_tokens),
                                        c.max_num_seqs, max_model_len)


def eos_from_config(hf_config: dict) -> frozenset[int]:
    """The model config's eos_token_id(s), for a model without a tokenizer."""
    e = hf_config.get("eos_token_id")
    return frozenset(e if isinstance(e, list) else ([e] if e is not None else []))
