"""Reference attention over the paged KV cache in plain torch (CPU default, and the kernels' oracle).

K/V are read through the block tables from the pool: each sequence's blocks are gathered into a
padded [num_seqs, max_seq_len] view for this step only; there is no per-sequence contiguous cache.
An fp8 pool (attention/kv_quant.py) is written as k / k_scale, v / v_scale in e4m3 and read back
multiplied by the scales, in float32 math. Every AttentionParams field is honoured; the score of query
position p against key position j is

    s = scale * q.k;  s = softcap * tanh(s / softcap);  s += slope_h * (j - p)
    masked unless p - sliding_window < j <= p;  softmax over the keys and, if given, the head's sink logit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from services.engine.attention.kv_quant import dequantize_fp8, is_fp8, quantize_fp8
from services.engine.attention.metadata import AttentionMetadata
from services.engine.attention.params import AttentionParams


def write_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
             k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    # kv_cache [2, num_blocks, block_size, Hkv, D] viewed as [2, num_slots, Hkv, D]
    flat = kv_cache.view(2, -1, kv_cache.shape[-2], kv_cache.shape[-1])
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        k, v, slot_mapping = k[valid], v[valid], slot_mapping[valid]
    if is_fp8(kv_cache):
        # index_copy_ has no float8 kernel on CPU: copy the bytes.
        flat = flat.view(torch.uint8)
        k, v = quantize_fp8(k, k_scale).view(torch.uint8), quantize_fp8(v, v_scale).view(torch.uint8)
    flat[0].index_copy_(0, slot_mapping, k)
    flat[1].index_copy_(0, slot_mapping, v)


def check_params(params: AttentionParams, num_heads: int) -> None:
    """The per-head tensors must cover exactly this rank's query heads."""
    for name in ("alibi_slopes", "sinks"):
        t = getattr(params, name)
        if t is not None and tuple(t.shape) != (num_heads,):
            raise ValueError(f"AttentionParams.{name} must be [num_heads={num_heads}]; got {tuple(t.shape)}")


def paged_attention_ref(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                        params: AttentionParams | float) -> torch.Tensor:
    """q [num_tokens, Hq, D] -> [num_tokens, Hq, D]: causal attention of each new token over its
    sequence's cached tokens (which already include this step's K/V), with params' variants.
    Rows after sum(query_lens) (padding, as the triton backend gets under CUDA graphs) are zero."""
    if not isinstance(params, AttentionParams):
        params = AttentionParams(scale=float(params))
    num_seqs = meta.num_seqs
    block_size = kv_cache.shape[2]
    hq, d = q.shape[1], q.shape[2]
    hkv = kv_cache.shape[3]
    check_params(params, hq)
    max_len, max_q = meta.max_seq_len, meta.max_query_len
    nblk = -(-max_len // block_size)
    tables = meta.block_tables[:, :nblk].long()
    # [num_seqs, nblk, block_size, Hkv, D] -> [num_seqs, Hkv, L, D]
    fp8 = is_fp8(kv_cache)
    pool = kv_cache.view(torch.uint8) if fp8 else kv_cache  # gather bytes: float8 indexing is missing on some devices
    k = pool[0][tables].reshape(num_seqs, nblk * block_size, hkv, d)[:, :max_len].transpose(1, 2)
    v = pool[1][tables].reshape(num_seqs, nblk * block_size, hkv, d)[:, :max_len].transpose(1, 2)
    if fp8:
        k = dequantize_fp8(k.view(kv_cache.dtype), params.k_scale, q.dtype)
        v = dequantize_fp8(v.view(kv_cache.dtype), params.v_scale, q.dtype)

    q_lens = torch.tensor(meta.query_lens_cpu, device=q.device)
    s_lens = torch.tensor(meta.seq_lens_cpu, device=q.device)
    starts = meta.query_start_loc[:-1].long()
    # Padded queries [num_seqs, max_q, Hq, D]; row r of seq i is new token i's r-th.
    r = torch.arange(max_q, device=q.device)
    row_valid = r[None, :] < q_lens[:, None]
    src = (starts[:, None] + r[None, :]).clamp(max=q.shape[0] - 1)
    qp = q[src].transpose(1, 2)  # [num_seqs, Hq, max_q, D]
    pos = s_lens[:, None] - q_lens[:, None] + r[None, :]  # absolute position of each query row
    key = torch.arange(max_len, device=q.device)
    mask = key[None, None, :] <= pos[:, :, None]  # [num_seqs, max_q, L]
    if params.sliding_window is not None:
        mask &= key[None, None, :] > pos[:, :, None] - params.sliding_window
        # Blocks wholly before the window may have been freed and reused (docs/attention-seam.md):
        # zero what was gathered from before the earliest row's window, so their contents (even NaN)
        # cannot leak through 0 * NaN.
        first_seen = (s_lens - q_lens - params.sliding_window + 1).clamp(min=0)  # [num_seqs]
        stale = (key[None, :] < first_seen[:, None])[:, None, :, None]
        k, v = k.masked_fill(stale, 0), v.masked_fill(stale, 0)
    mask &= row_valid[:, :, None]
    mask[:, :, 0] |= ~row_valid  # padding rows: attend to something so softmax stays finite

    if params.logit_softcap is None and params.sinks is None and params.alibi_slopes is None:
        out = F.scaled_dot_product_attention(
            qp, k, v, attn_mask=mask[:, None], scale=params.scale, enable_gqa=(hq != hkv))
    else:
        out = _explicit_attention(qp, k, v, mask, pos, key, params)
    real = out.transpose(1, 2)[row_valid]  # [num_seqs, max_q, Hq, D] -> [num_real_tokens, Hq, D]
    if real.shape[0] == q.shape[0]:
        return real
    return torch.cat([real, real.new_zeros(q.shape[0] - real.shape[0], hq, d)])  # padding rows: zero


def _alibi_bias(slopes: torch.Tensor, pos: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """slope_h * (key_pos - query_pos): [num_seqs, Hq, max_q, L] in float32."""
    rel = (key[None, None, :] - pos[:, :, None]).float()  # [num_seqs, max_q, L]
    return slopes.float().to(pos.device)[None, :, None, None] * rel[:, None]


def _explicit_attention(qp, k, v, mask, pos, key, params: AttentionParams) -> torch.Tensor:
    """Scores written out in float32: soft-capping and sinks do not fit SDPA's interface, and an ALiBi
    bias passed as SDPA's mask would have to be in q's dtype (bf16 cannot hold slope * 4000 exactly)."""
    num_seqs, hq, max_q, d = qp.shape
    hkv = k.shape[1]
    # GQA without copying K/V: query heads of one KV head side by side, [S, Hkv, G*max_q, D].
    qg = qp.float().reshape(num_seqs, hkv, (hq // hkv) * max_q, d)
    s = (qg @ k.float().transpose(-1, -2) * params.scale).reshape(num_seqs, hq, max_q, -1)
    if params.logit_softcap is not None:
        s = params.logit_softcap * torch.tanh(s / params.logit_softcap)
    if params.alibi_slopes is not None:
        s = s + _alibi_bias(params.alibi_slopes, pos, key)
    s = s.masked_fill(~mask[:, None], float("-inf"))
    if params.sinks is not None:
        sink = params.sinks.float().to(s.device)[None, :, None, None].expand(num_seqs, hq, max_q, 1)
        p = torch.cat([s, sink], dim=-1).softmax(-1)[..., :-1]
    else:
        p = s.softmax(-1)
    p = p.reshape(num_seqs, hkv, (hq // hkv) * max_q, -1)
    return (p @ v.float()).reshape(num_seqs, hq, max_q, d).to(qp.dtype)


class TorchAttentionBackend:
    name = "torch"

    def forward(self, q, k, v, kv_cache, meta: AttentionMetadata, params: AttentionParams) -> torch.Tensor:
        write_kv(k, v, kv_cache, meta.slot_mapping, params.k_scale, params.v_scale)
        return paged_attention_ref(q, kv_cache, meta, params)

    def copy_blocks(self, kv_caches: list[torch.Tensor], src: torch.Tensor, dst: torch.Tensor) -> None:
        for cache in kv_caches:
            if is_fp8(cache):
                cache = cache.view(torch.uint8)  # a bitwise copy; float8 indexing is missing on some devices
            cache[:, dst] = cache[:, src]
