"""Torch reference of kernels/paged_prefill.py (the tests and benches compare the kernel with it)."""

import torch


def paged_prefill_ref(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                      seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float,
                      k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """Torch reference of paged_prefill (float32 math, output in q's dtype; padding rows are zero; an fp8
    cache dequantized first)."""
    fp8 = kv_cache.dtype == torch.float8_e4m3fn
    if not fp8:
        k_scale = v_scale = 1.0
    pool = kv_cache.view(torch.uint8) if fp8 else kv_cache  # gather bytes: float8 indexing is missing on some devices
    num_heads, head_dim = q.shape[1:]
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    out = torch.zeros_like(q)
    for i in range(query_start_loc.shape[0] - 1):
        start, end = int(query_start_loc[i]), int(query_start_loc[i + 1])
        n, q_len = int(seq_lens[i]), end - start
        blocks = block_tables[i, : (n + block_size - 1) // block_size].long()
        k = pool[0, blocks].reshape(-1, num_kv_heads, head_dim)[:n].view(kv_cache.dtype).float() * k_scale
        v = pool[1, blocks].reshape(-1, num_kv_heads, head_dim)[:n].view(kv_cache.dtype).float() * v_scale
        k = k.repeat_interleave(num_heads // num_kv_heads, dim=1)
        v = v.repeat_interleave(num_heads // num_kv_heads, dim=1)
        s = torch.einsum("qhd,nhd->hqn", q[start:end].float(), k) * scale
        q_pos = torch.arange(n - q_len, n, device=q.device)
        s = s.masked_fill(torch.arange(n, device=q.device)[None, :] > q_pos[:, None], float("-inf"))
        out[start:end] = torch.einsum("hqn,nhd->qhd", s.softmax(-1), v).to(q.dtype)
    return out
