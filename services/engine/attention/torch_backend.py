"""Reference attention over the paged KV cache in plain torch (CPU default, and the kernels' oracle).

K/V are read through the block tables from the pool: each sequence's blocks are gathered into a
padded [num_seqs, max_seq_len] view for this step only; there is no per-sequence contiguous cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from services.engine.attention.metadata import AttentionMetadata
from services.engine.attention.params import AttentionParams


def write_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    # kv_cache [2, num_blocks, block_size, Hkv, D] viewed as [2, num_slots, Hkv, D]
    flat = kv_cache.view(2, -1, kv_cache.shape[-2], kv_cache.shape[-1])
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        k, v, slot_mapping = k[valid], v[valid], slot_mapping[valid]
    flat[0].index_copy_(0, slot_mapping, k)
    flat[1].index_copy_(0, slot_mapping, v)


def paged_attention_ref(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q [num_tokens, Hq, D] -> [num_tokens, Hq, D]: causal attention of each new token over its
    sequence's cached tokens (which already include this step's K/V)."""
    num_seqs = meta.num_seqs
    block_size = kv_cache.shape[2]
    hq, d = q.shape[1], q.shape[2]
    hkv = kv_cache.shape[3]
    max_len, max_q = meta.max_seq_len, meta.max_query_len
    nblk = -(-max_len // block_size)
    tables = meta.block_tables[:, :nblk].long()
    # [num_seqs, nblk, block_size, Hkv, D] -> [num_seqs, Hkv, L, D]
    k = kv_cache[0][tables].reshape(num_seqs, nblk * block_size, hkv, d)[:, :max_len].transpose(1, 2)
    v = kv_cache[1][tables].reshape(num_seqs, nblk * block_size, hkv, d)[:, :max_len].transpose(1, 2)

    q_lens = torch.tensor(meta.query_lens_cpu, device=q.device)
    s_lens = torch.tensor(meta.seq_lens_cpu, device=q.device)
    starts = meta.query_start_loc[:-1].long()
    # Padded queries [num_seqs, max_q, Hq, D]; row r of seq i is new token i's r-th.
    r = torch.arange(max_q, device=q.device)
    row_valid = r[None, :] < q_lens[:, None]
    src = (starts[:, None] + r[None, :]).clamp(max=q.shape[0] - 1)
    qp = q[src]  # [num_seqs, max_q, Hq, D]
    pos = s_lens[:, None] - q_lens[:, None] + r[None, :]  # absolute position of each query row
    key = torch.arange(max_len, device=q.device)
    mask = (key[None, None, :] <= pos[:, :, None]) & row_valid[:, :, None]  # [num_seqs, max_q, L]
    mask[:, :, 0] |= ~row_valid  # padding rows: attend to something so softmax stays finite
    out = F.scaled_dot_product_attention(
        qp.transpose(1, 2), k, v, attn_mask=mask[:, None], scale=scale, enable_gqa=(hq != hkv),
    ).transpose(1, 2)  # [num_seqs, max_q, Hq, D]
    return out[row_valid]


class TorchAttentionBackend:
    name = "torch"

    def forward(self, q, k, v, kv_cache, meta: AttentionMetadata, params: AttentionParams) -> torch.Tensor:
        if params.sliding_window or params.logit_softcap or params.alibi_slopes is not None or params.sinks is not None:
            raise NotImplementedError("torch attention backend: sliding window, soft-cap, ALiBi and sinks are not implemented yet")
        write_kv(k, v, kv_cache, meta.slot_mapping)
        return paged_attention_ref(q, kv_cache, meta, params.scale)

    def copy_blocks(self, kv_caches: list[torch.Tensor], src: torch.Tensor, dst: torch.Tensor) -> None:
        for cache in kv_caches:
            cache[:, dst] = cache[:, src]
