"""EngineConfig: every option of one engine, documented once; the offline LLM's keywords and the engine's flags.

Torch-free, so launchers (`folio up`) can derive flags from it without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from services.common.config import check_choices
from services.engine.attention import BackendName

# A served engine bounds its queue: overload is an error the caller sees, never a hang. The engine
# service and `folio up` show and apply these in place of EngineConfig's defaults.
SERVED_DEFAULTS = {"max_waiting_requests": 1024}


@dataclass
class EngineConfig:
    model: str | None = None
    """HF model directory or hub id; None means the bundled SmolLM2-135M-Instruct."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights' and activations' dtype; "auto": float32 on CPU, the checkpoint's dtype on GPU."""
    device: str = "auto"
    """"cpu", "cuda", "cuda:N" or "auto" (CUDA when available)."""
    block_size: int = 16
    """Tokens per KV block (a power of two, 1 to 128)."""
    max_model_len: int | None = None
    """Longest sequence (prompt + output); defaults to the model's context length."""
    max_num_seqs: int = 256
    """Most sequences in the running batch."""
    max_num_batched_tokens: int | None = None
    """Per-step token budget; defaults to 2048 on CPU, 8192 on GPU."""
    num_kv_blocks: int | None = None
    """KV pool size in blocks; overrides the memory-based sizing below."""
    gpu_memory_utilization: float = 0.9
    """On CUDA: fraction of the GPU's memory Folio may use (weights, activations and KV pool)."""
    cpu_kv_cache_bytes: int = 1 << 30
    """On CPU: bytes of KV pool."""
    kv_cache_dtype: Literal["auto", "fp8", "fp8_e4m3"] = "auto"
    """KV pool storage: "auto" (the model's dtype) or "fp8" / "fp8_e4m3" (float8 e4m3 with per-layer k/v
    scales from the checkpoint, else 1.0: twice the tokens of bf16 in the same memory; see docs/quantization.md)."""
    seed: int = 0
    """Seed of the random weights (load_format dummy) and of unseeded sampling."""
    attention_backend: BackendName | None = None
    """Attention implementation; None picks triton on CUDA, torch elsewhere."""
    enable_prefix_caching: bool = True
    """Reuse the KV blocks of a prompt prefix already computed (automatic prefix caching)."""
    max_waiting_requests: int | None = None
    """Bound on queued requests (None: unbounded); beyond it add_request raises QueueFullError."""
    load_format: Literal["safetensors", "dummy"] = "safetensors"
    """"safetensors", or "dummy": random weights of the checkpoint's shapes (speed measurements)."""
    quantization: str | None = None
    """Weight quantization; None reads config.json's quantization_config. "fp8" on a 16-bit checkpoint
    quantizes its linear weights at load; other values must match the checkpoint (docs/quantization.md)."""
    enforce_eager: bool = False
    """On CUDA, capture no CUDA graphs: every step runs eagerly, op by op."""
    mixed_cuda_graphs: bool = True
    """On CUDA (unless enforce_eager), also replay mixed steps (prefill chunks with decodes) from CUDA graphs
    captured per token-count bucket up to max_mixed_graph_tokens; off: only decode steps are graphed."""
    max_mixed_graph_tokens: int = 8192
    """Largest token-count bucket of the mixed-step graphs (buckets 16, 32, 48, ... up to it); a larger step
    runs eagerly. 8192 covers the default GPU step budget: an eager step of a small model takes as long to
    launch as to run (Llama-3.2-1B shape, 8,192 tokens: ~29 ms of launch for ~25 ms of kernels, so the device
    waits on the host), docs/engine.md, "CUDA graphs"."""
    async_scheduling: bool = True
    """Schedule and prepare step N+1 while step N runs on the device (its sampled tokens feed step N+1's
    inputs on the device and reach the host one step late); outputs are the same either way. Off: the
    steps run in series. See docs/engine.md."""
    tensor_parallel_size: int = 1
    """Shard the model over this many GPUs (processes), Megatron-style; see docs/tensor-parallel.md."""
    tp_collective_timeout_s: float = 120.0
    """Tensor parallel: a step whose collectives have not completed after this many seconds ends the
    engine with an error naming the ranks behind and the step (a hung group never stalls silently)."""

    def __post_init__(self) -> None:
        check_choices(self)
        if self.block_size not in (1, 2, 4, 8, 16, 32, 64, 128):
            raise ValueError(f"block_size must be a power of two in [1, 128], got {self.block_size}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if not self.tp_collective_timeout_s > 0:
            raise ValueError(f"tp_collective_timeout_s must be > 0, got {self.tp_collective_timeout_s}")
        if not 16 <= self.max_mixed_graph_tokens <= 8192:
            raise ValueError(f"max_mixed_graph_tokens must be in [16, 8192], got {self.max_mixed_graph_tokens}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
