"""What every architecture shares: building on a device, loading a checkpoint by name, the logits step.

An architecture file subclasses `CausalLM`, builds its modules from layers/ with Folio names that
mirror the checkpoint's, and lists how checkpoint tensors stack into fused parameters
(`stacked_params`). Loading is by name through each parameter's `weight_loader`, which knows the
tensor-parallel cut; every checkpoint tensor must land somewhere and every parameter must be filled,
or loading stops with a ValueError naming the tensor.
"""

from __future__ import annotations

import contextlib

import torch

from services.engine.attention.kv_quant import kv_scale_target, read_kv_scale
from services.engine.model.config import ModelConfig
from services.engine.model.layers.linear import replicated_loader


class CausalLM(torch.nn.Module):
    stacked_params: tuple[tuple[str, str, object], ...] = ()
    """(Folio name part, checkpoint name part, shard id): e.g. (".qkv_proj.", ".q_proj.", "q")."""
    skip_tensors: tuple[str, ...] = ("rotary_emb.inv_freq",)
    """Checkpoint tensors that carry nothing Folio needs (suffixes)."""
    config_aliases: dict[str, tuple[str, ...]] = {}
    """config.json spellings of ModelConfig's common fields, for families that name them differently."""

    @classmethod
    def make_config(cls, hf: dict, source: str) -> ModelConfig:
        return ModelConfig.from_hf(hf, source, cls.config_aliases)

    def __init__(self, cfg: ModelConfig, backend, tp=None):
        super().__init__()
        self.cfg, self.backend, self.tp = cfg, backend, tp
        n = tp.world_size if tp is not None else 1
        self.num_kv_heads = cfg.num_key_value_heads // n  # this rank's, for the KV cache
        self.head_dim = cfg.head_dim
        self.num_layers = cfg.num_hidden_layers
        self.kv_scales: dict[int, dict[str, float]] = {}
        """The checkpoint's KV-cache scales by layer ({"k": .., "v": ..} or {"kv": ..}); see apply_kv_scales."""

    # --- the step ----------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                meta) -> torch.Tensor:
        """input_ids, positions [T] -> hidden states [T, hidden] before the final norm."""
        for r in self._rotaries:
            r.reset_cache()
        return self.run(input_ids, positions, kv_caches, meta)

    def run(self, input_ids, positions, kv_caches, meta) -> torch.Tensor:
        raise NotImplementedError

    def logits(self, hidden: torch.Tensor, float32: bool = True) -> torch.Tensor:
        """Final norm + LM head on the selected rows, over the whole vocabulary: float32, or with
        float32=False in the head's dtype (no [rows, vocab] float32 copy)."""
        return self.head(self.final_norm(hidden), float32)

    def head(self, normed: torch.Tensor, float32: bool = True) -> torch.Tensor:
        """The LM head on rows already through the final norm (a CUDA graph ends with it: cuda_graphs.py)."""
        return self.logits_processor(self.lm_head, normed, float32)

    # --- building ------------------------------------------------------------------------------------
    def finish(self, device: torch.device, fused_elementwise: bool) -> None:
        from services.engine.model.layers.attention import Attention
        from services.engine.model.layers.rotary import RotaryEmbedding

        self._rotaries = [m for m in self.modules() if isinstance(m, RotaryEmbedding)]
        attns = [m for m in self.modules() if isinstance(m, Attention)]
        for m in attns:
            m.to_device(device)
        windows = {m.params.sliding_window for m in attns}
        self.kv_sliding_window = windows.pop() if len(windows) == 1 else None
        """The window when every layer slides by the same one (Mistral): the block manager then frees
        blocks behind it. None when any layer sees the whole context (Gemma 2/3 interleave global layers)."""
        self.set_fused_elementwise(fused_elementwise)

    def set_fused_elementwise(self, on: bool) -> None:
        """Use the Triton elementwise kernels (add + RMSNorm, rotary, SiLU-and-mul) where a layer can."""
        for m in self.modules():
            if hasattr(m, "fused"):
                m.fused = on

    # --- loading ---------------------------------------------------------------------------------------
    def checkpoint_name(self, name: str) -> str | None:
        """A checkpoint tensor's name -> the Folio parameter name (before stacking); None to skip it."""
        return name

    def adapt_tensor(self, name: str, t):
        """A checkpoint tensor as Folio's layout wants it (e.g. `t.transposed()` for Conv1D weights)."""
        return t

    def load_weights(self, checkpoint) -> None:
        params = dict(self.named_parameters())
        tied = self.cfg.tie_word_embeddings
        done: set[tuple[str, object]] = set()
        for t in checkpoint:
            kv_scale = kv_scale_target(t.name)
            if kv_scale is not None:  # read by an fp8 KV pool (apply_kv_scales), not a parameter
                self._record_kv_scale(t, *kv_scale)
                continue
            name = self.checkpoint_name(t.name)
            if name is not None:
                t = self.adapt_tensor(name, t)
            if name is None or name.endswith(self.skip_tensors) or (tied and name == "lm_head.weight"):
                continue
            target, shard = self.param_target(name)
            p = params.get(target)
            if p is None:
                raise ValueError(f"{t.where}: tensor {t.name} is not part of a {self.cfg.architecture} model with "
                                 f"this config.json ({self.cfg.source})")
            if (target, shard) in done:
                raise ValueError(f"{t.where}: tensor {t.name} appears twice in the checkpoint")
            getattr(p, "weight_loader", replicated_loader)(p, t, shard)
            done.add((target, shard))
        for mname, m in self.named_modules():  # layers that can say better what is missing (MoE experts)
            if hasattr(m, "check_loaded"):
                m.check_loaded(mname)
        missing = []
        for pname, p in params.items():
            if getattr(p, "optional", False):  # a quantized layer's tensor that some checkpoints omit (GPTQ g_idx)
                continue
            shards = getattr(p, "shard_ids", None) or self._shards_of(pname)
            if (pname, None) not in done and not all((pname, s) in done for s in shards):
                missing.append(pname)
        if missing:
            raise ValueError(f"model: the checkpoint lacks {len(missing)} tensor(s) that a {self.cfg.architecture} "
                             f"with this config.json needs, e.g. {missing[:3]}")
        self.process_weights()

    def process_weights(self) -> None:
        """Turn each linear layer's checkpoint tensors into what its kernel reads (quantized layouts)."""
        from services.engine.model.layers.linear import LinearBase

        for m in self.modules():
            if isinstance(m, LinearBase) and not getattr(m, "processed", False):
                m.method.process_after_loading(m)
                m.processed = True

    def param_target(self, name: str) -> tuple[str, object]:
        """A Folio tensor name -> (parameter name, shard id) through `stacked_params` (shard None: the whole)."""
        for folio_part, ckpt_part, shard_id in self.stacked_params:
            if ckpt_part in name:
                return name.replace(ckpt_part, folio_part), shard_id
        return name, None

    def _record_kv_scale(self, t, layer: int, which: str) -> None:
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"{t.where}: tensor {t.name} is a KV-cache scale of layer {layer}; the model has "
                             f"{self.num_layers} layers")
        self.kv_scales.setdefault(layer, {})[which] = read_kv_scale(t.name, t.where, t.load())

    def apply_kv_scales(self) -> int:
        """Give every attention layer the checkpoint's k/v scales for an fp8 KV pool (1.0 where it has none,
        as vLLM does); returns how many layers the checkpoint had scales for."""
        from services.engine.model.layers.attention import Attention

        for m in self.modules():
            if isinstance(m, Attention):
                s = self.kv_scales.get(m.layer_index, {})
                m.set_kv_scales(s.get("k", s.get("kv", 1.0)), s.get("v", s.get("kv", 1.0)))
        return len(self.kv_scales)

    def _shards_of(self, pname: str) -> list:
        shards = [s for fp, _, s in self.stacked_params if fp in pname]
        return shards or [None]

    def init_dummy(self, seed: int = 0) -> None:
        """Random weights of the real shapes (vLLM's load_format="dummy"): for speed runs without a checkpoint."""
        from services.engine.model.layers.linear import LinearBase

        g = torch.Generator(device=next(self.parameters()).device).manual_seed(seed)
        for m in self.modules():  # quantized layers make random weights in their loaded form
            if isinstance(m, LinearBase) and hasattr(m.method, "init_dummy"):
                m.method.init_dummy(m, g)
                m.processed = True
        for name, p in self.named_parameters():
            if getattr(p, "quantized", False):
                continue
            if p.dim() == 1 and "norm" in name:
                p.data.fill_(1.0)
            elif name.endswith("bias"):
                p.data.zero_()
            else:
                p.data.copy_(torch.randn(p.shape, generator=g, device=p.device) * 0.02)

    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())


@contextlib.contextmanager
def build_context(dtype: torch.dtype, device: torch.device):
    """Parameters are created directly on the device in the model dtype (never a CPU float32 copy first)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old)
