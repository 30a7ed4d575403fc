"""Block copy for copy-on-write: for every layer, cache block dst[i] := block src[i]."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _copy_blocks_kernel(
    cache_ptr,  # [2, num_blocks, block_numel] (one layer's kv_cache, viewed flat per block)
    src_ptr,  # int64 [num_pairs]
    dst_ptr,  # int64 [num_pairs]
    stride_kv,  # kv_cache.stride(0)
    BLOCK_NUMEL: tl.constexpr,  # block_size * num_kv_heads * head_dim (= kv_cache.stride(1))
    CHUNK: tl.constexpr,
):
    pair = tl.program_id(0)
    kv = tl.program_id(1).to(tl.int64)
    chunk = tl.program_id(2)
    src = tl.load(src_ptr + pair).to(tl.int64)
    dst = tl.load(dst_ptr + pair).to(tl.int64)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    mask = offs < BLOCK_NUMEL
    x = tl.load(cache_ptr + kv * stride_kv + src * BLOCK_NUMEL + offs, mask=mask)
    tl.store(cache_ptr + kv * stride_kv + dst * BLOCK_NUMEL + offs, x, mask=mask)


def copy_blocks(kv_caches: list[torch.Tensor], src: torch.Tensor, dst: torch.Tensor) -> None:
    """Copy block src[i] to block dst[i] (keys and values) in every layer's cache.

    The dst blocks must be distinct and none may be a src block (copy-on-write targets are fresh
    blocks), so the pairs are independent and run in parallel. One launch per layer: copy-on-write
    is rare and small, so a layer-pointer table is not worth it.
    """
    if src.shape != dst.shape or src.dim() != 1:
        raise ValueError(f"src and dst must be equal-length 1-D; got {tuple(src.shape)}, {tuple(dst.shape)}")
    if src.numel() == 0:
        return
    src = src.to(torch.int64)
    dst = dst.to(torch.int64)
    for cache in kv_caches:
        if cache.dim() != 5 or cache.shape[0] != 2 or not cache.is_contiguous():
            raise ValueError(f"kv_cache must be contiguous [2, num_blocks, block_size, heads, head_dim]; "
                             f"got {tuple(cache.shape)}")
        if src.device != cache.device:
            src, dst = src.to(cache.device), dst.to(cache.device)
        block_numel = cache.stride(1)
        chunk = min(triton.next_power_of_2(block_numel), 4096)
        grid = (src.numel(), 2, triton.cdiv(block_numel, chunk))
        _copy_blocks_kernel[grid](cache, src, dst, cache.stride(0), BLOCK_NUMEL=block_numel, CHUNK=chunk,
                                  num_warps=4)


def copy_blocks_ref(kv_caches: list[torch.Tensor], src: torch.Tensor, dst: torch.Tensor) -> None:
    """Torch reference of copy_blocks."""
    for cache in kv_caches:
        cache[:, dst.to(cache.device)] = cache[:, src.to(cache.device)]
