"""KV-cache write: scatter one step's new keys and values into their paged-cache slots."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _reshape_and_cache_kernel(
    key_ptr,  # [num_tokens, num_kv_heads, head_dim]
    value_ptr,  # [num_tokens, num_kv_heads, head_dim]
    key_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]  (kv_cache[0])
    value_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]  (kv_cache[1])
    slot_mapping_ptr,  # int64 [num_tokens]; a negative slot is padding
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cb,  # cache block stride (same for key and value cache)
    stride_cs,  # cache slot-in-block stride
    stride_ch,  # cache head stride
    num_kv_heads,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,  # next power of two; the extra columns are masked
    BLOCK_H: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask = (offs_h < num_kv_heads)[:, None] & (offs_d < HEAD_DIM)[None, :]
    tok = token.to(tl.int64)

    k = tl.load(key_ptr + tok * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(value_ptr + tok * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    dst = block * stride_cb + offset * stride_cs + offs_h[:, None] * stride_ch + offs_d[None, :]
    tl.store(key_cache_ptr + dst, k, mask=mask)
    tl.store(value_cache_ptr + dst, v, mask=mask)


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                      slot_mapping: torch.Tensor) -> None:
    """kv_cache[0/1].view(-1, H, D)[slot_mapping[t]] = key/value[t] for every t whose slot >= 0."""
    _check(key, value, kv_cache, slot_mapping)
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    key_cache, value_cache = kv_cache[0], kv_cache[1]
    _reshape_and_cache_kernel[(num_tokens,)](
        key, value, key_cache, value_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        num_kv_heads,
        BLOCK_SIZE=kv_cache.shape[2], HEAD_DIM=head_dim, HEAD_DIM_PAD=triton.next_power_of_2(head_dim),
        BLOCK_H=triton.next_power_of_2(num_kv_heads),
        num_warps=4 if num_kv_heads * head_dim >= 1024 else 1,
    )


def _check(key, value, kv_cache, slot_mapping):
    if key.dim() != 3 or value.shape != key.shape:
        raise ValueError(f"key/value must be [num_tokens, num_kv_heads, head_dim] and equal; "
                         f"got {tuple(key.shape)} and {tuple(value.shape)}")
    num_tokens, num_kv_heads, head_dim = key.shape
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2 or kv_cache.shape[3:] != (num_kv_heads, head_dim):
        raise ValueError(f"kv_cache must be [2, num_blocks, block_size, {num_kv_heads}, {head_dim}]; "
                         f"got {tuple(kv_cache.shape)}")
    if not kv_cache.is_contiguous():
        raise ValueError("kv_cache must be contiguous")
    if key.dtype != kv_cache.dtype or value.dtype != kv_cache.dtype:
        raise ValueError(f"dtype mismatch: key {key.dtype}, value {value.dtype}, cache {kv_cache.dtype}")
    if key.stride(2) != 1 or value.stride(2) != 1:
        raise ValueError("key/value must be contiguous in head_dim")
    if slot_mapping.dtype != torch.int64 or slot_mapping.shape != (num_tokens,):
        raise ValueError(f"slot_mapping must be int64 [{num_tokens}]; "
                         f"got {slot_mapping.dtype} {tuple(slot_mapping.shape)}")


def reshape_and_cache_ref(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                          slot_mapping: torch.Tensor) -> None:
    """Torch reference of reshape_and_cache."""
    num_kv_heads, head_dim = key.shape[1:]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    kv_cache[0].view(-1, num_kv_heads, head_dim)[slots] = key[valid]
    kv_cache[1].view(-1, num_kv_heads, head_dim)[slots] = value[valid]
