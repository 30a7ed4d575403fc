"""Everything an attention backend needs for one engine step (see docs/attention-seam.md)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    num_seqs: int
    num_tokens: int
    query_start_loc: torch.Tensor  # int32 [num_seqs + 1]: prefix sums of new-token counts
    seq_lens: torch.Tensor  # int32 [num_seqs]: context length including this step's tokens
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks_per_seq], padded with 0
    slot_mapping: torch.Tensor  # int64 [num_tokens]: cache slot of each new token; < 0 = padding
    max_query_len: int
    max_seq_len: int
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    chunk_list: torch.Tensor | None = None
    """int32 [2, num_seqs + 1] (kernels/paged_prefill.py, make_chunk_list): the sequences with more than one new
    token, for a prefill launch that walks their tiles alone; None in decode-only steps."""
    captured: bool = False
    """Built to capture a CUDA graph (services/engine/cuda_graphs.py): the host-side fields above (`*_cpu`,
    `max_*`, the counts) describe the graph's bucket, not any one step it will replay. A backend must then
    read only the device tensors and shapes, and write zeros in padding rows (slot < 0; after
    query_start_loc[-1]), whose number only the device knows."""

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1
