"""Owns the weights and the paged KV pool on one device; turns a scheduled step into logits."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from services.engine.attention import get_attention_backend
from services.engine.attention.metadata import AttentionMetadata
from services.engine.model.llama import LlamaConfig, LlamaModel
from services.engine.model.loader import load_safetensors
from services.engine.scheduler import SchedulerOutput

log = logging.getLogger("folio.engine")


@dataclass
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    logit_rows: torch.Tensor
    """Flat token indices whose logits are needed: the last token of each sequence that caught up
    (to sample), and every token of a prompt whose prompt_logprobs were asked for."""


def kv_bytes_per_block(cfg: LlamaConfig, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim * elem


class ModelRunner:
    def __init__(self, model_dir, hf_config: dict, dtype: torch.dtype, device: torch.device,
                 attention_backend: str, block_size: int):
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.cfg = LlamaConfig.from_hf(hf_config)
        self.backend = get_attention_backend(attention_backend)
        self.model = LlamaModel(self.cfg, self.backend, dtype, device)
        self.model.load_weights(load_safetensors(model_dir))
        self.kv_caches: list[torch.Tensor] = []

    def allocate_kv_cache(self, num_blocks: int) -> None:
        c = self.cfg
        shape = (2, num_blocks, self.block_size, c.num_key_value_heads, c.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(c.num_hidden_layers)]

    def weight_bytes(self) -> int:
        seen, total = set(), 0
        for t in self.model.weights.values():
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        return total

    # --- one step ------------------------------------------------------------------------------
    def prepare(self, out: SchedulerOutput, block_tables: list[list[int]]) -> StepInputs:
        bs = self.block_size
        ids, pos, slots, q_lens, s_lens, rows = [], [], [], [], [], []
        for s, table in zip(out.scheduled, block_tables):
            seq, n = s.seq, s.num_new_tokens
            start = seq.num_computed_tokens
            base = len(ids)
            ids += seq.token_ids[start:start + n]
            rng = range(start, start + n)
            pos += rng
            slots += [table[p // bs] * bs + p % bs for p in rng]
            q_lens.append(n)
            s_lens.append(start + n)
            if seq.params.prompt_logprobs is not None and start < seq.num_prompt_tokens:
                # Logits of every prompt position in this chunk (the last one also samples if caught up).
                rows += range(base, base + n)
            elif start + n == seq.num_tokens:
                rows.append(base + n - 1)
        max_blocks = max(len(t) for t in block_tables)
        tables = torch.zeros((len(block_tables), max_blocks), dtype=torch.int32)
        for i, t in enumerate(block_tables):
            tables[i, :len(t)] = torch.tensor(t, dtype=torch.int32)
        qsl = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
        qsl[1:] = torch.tensor(q_lens, dtype=torch.int32).cumsum(0)
        dev = self.device
        meta = AttentionMetadata(
            num_seqs=len(q_lens), num_tokens=len(ids),
            query_start_loc=qsl.to(dev), seq_lens=torch.tensor(s_lens, dtype=torch.int32, device=dev),
            block_tables=tables.to(dev), slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            max_query_len=max(q_lens), max_seq_len=max(s_lens), query_lens_cpu=q_lens, seq_lens_cpu=s_lens,
        )
        return StepInputs(
            torch.tensor(ids, dtype=torch.long, device=dev), torch.tensor(pos, dtype=torch.long, device=dev),
            meta, torch.tensor(rows, dtype=torch.long, device=dev),
        )

    @torch.inference_mode()
    def execute(self, inputs: StepInputs) -> torch.Tensor:
        """Logits [len(logit_rows), vocab] in float32."""
        hidden = self.model.forward(inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta)
        return self.model.logits(hidden[inputs.logit_rows])

    @torch.inference_mode()
    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        src = torch.tensor([a for a, _ in pairs], dtype=torch.long, device=self.device)
        dst = torch.tensor([b for _, b in pairs], dtype=torch.long, device=self.device)
        self.backend.copy_blocks(self.kv_caches, src, dst)
