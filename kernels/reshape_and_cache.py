"""KV-cache write: scatter one step's new keys and values into their paged-cache slots.

An fp8 cache (torch.float8_e4m3fn) stores k * (1 / k_scale) and v * (1 / v_scale), clamped to +-448 and
rounded to nearest even; the attention kernels multiply the scales back in (docs/kernels.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import pdl


FP8_E4M3_MAX = 448.0


@triton.jit
def _quantize_e4m3(x, inv_scale):
    """x * inv_scale clamped to +-448 and rounded to the nearest even e4m3 value, still in float32.

    The value is exactly representable, so the conversion to float8 that follows does not round: the same
    bits as torch's `.to(torch.float8_e4m3fn)` on every target, including the interpreter, whose fp8
    downcast rounds ties up and loses the carry into the exponent (124.6 -> 64 instead of 128)."""
    x = x.to(tl.float32) * inv_scale
    x = tl.minimum(tl.maximum(x, -448.0), 448.0)
    bits = x.to(tl.int32, bitcast=True)
    ax = tl.abs(x)
    a_bits = ax.to(tl.int32, bitcast=True)
    # Normal range (>= 2^-6): keep 3 of float32's 23 mantissa bits, round half to even; a carry runs into
    # the exponent as it should.
    normal = (a_bits + 0x7FFFF + ((a_bits >> 20) & 1)) & -1048576  # & 0xFFF00000
    # Subnormal range (< 2^-6): multiples of 2^-9. Adding 2^14 puts the value where float32's spacing is
    # 2^-9, so the add itself rounds half to even.
    sub = ((ax + 16384.0) - 16384.0).to(tl.int32, bitcast=True)
    mag = tl.where(ax < 0.015625, sub, normal)
    return (mag | (bits ^ a_bits)).to(tl.float32, bitcast=True)  # bits ^ a_bits: the sign bit alone (-0.0 too)


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
    inv_k_scale,  # 1 / k_scale (read if KV_FP8)
    inv_v_scale,  # 1 / v_scale
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,  # next power of two; the extra columns are masked
    BLOCK_H: tl.constexpr,
    KV_FP8: tl.constexpr,  # the cache is float8 e4m3: quantize with the scales
    PDL: tl.constexpr = False,  # kernels/pdl.py
):
    pdl.enter(PDL)
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
    if KV_FP8:
        k = _quantize_e4m3(k, inv_k_scale).to(key_cache_ptr.dtype.element_ty)
        v = _quantize_e4m3(v, inv_v_scale).to(value_cache_ptr.dtype.element_ty)
    tl.store(key_cache_ptr + dst, k, mask=mask)
    tl.store(value_cache_ptr + dst, v, mask=mask)


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                      slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """kv_cache[0/1].view(-1, H, D)[slot_mapping[t]] = key/value[t] for every t whose slot >= 0;
    quantized as key / k_scale, value / v_scale when kv_cache is float8_e4m3fn (the scales are unused otherwise)."""
    _check(key, value, kv_cache, slot_mapping)
    fp8 = kv_cache.dtype == torch.float8_e4m3fn
    if fp8 and not (k_scale > 0 and v_scale > 0):
        raise ValueError(f"k_scale and v_scale must be > 0; got {k_scale}, {v_scale}")
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    key_cache, value_cache = kv_cache[0], kv_cache[1]
    _reshape_and_cache_kernel[(num_tokens,)](
        key, value, key_cache, value_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        num_kv_heads, 1.0 / k_scale, 1.0 / v_scale,
        BLOCK_SIZE=kv_cache.shape[2], HEAD_DIM=head_dim, HEAD_DIM_PAD=triton.next_power_of_2(head_dim),
        BLOCK_H=triton.next_power_of_2(num_kv_heads), KV_FP8=fp8,
        num_warps=4 if num_kv_heads * head_dim >= 1024 else 1, **pdl.args(key),
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
    if key.dtype != value.dtype or (key.dtype != kv_cache.dtype and kv_cache.dtype != torch.float8_e4m3fn):
        raise ValueError(f"dtype mismatch: key {key.dtype}, value {value.dtype}, cache {kv_cache.dtype} "
                         f"(the cache must be in key's dtype or float8_e4m3fn)")
    if key.stride(2) != 1 or value.stride(2) != 1:
        raise ValueError("key/value must be contiguous in head_dim")
    if slot_mapping.dtype != torch.int64 or slot_mapping.shape != (num_tokens,):
        raise ValueError(f"slot_mapping must be int64 [{num_tokens}]; "
                         f"got {slot_mapping.dtype} {tuple(slot_mapping.shape)}")


def reshape_and_cache_ref(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                          slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Torch reference of reshape_and_cache (torch's own float8 conversion for an fp8 cache)."""
    num_kv_heads, head_dim = key.shape[1:]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    key, value = key[valid], value[valid]
    if kv_cache.dtype == torch.float8_e4m3fn:
        key = (key.float() * (1.0 / k_scale)).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(kv_cache.dtype)
        value = (value.float() * (1.0 / v_scale)).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(kv_cache.dtype)
        # Write bytes: float8 index_put is missing on some devices.
        key, value, kv_cache = key.view(torch.uint8), value.view(torch.uint8), kv_cache.view(torch.uint8)
    kv_cache[0].view(-1, num_kv_heads, head_dim)[slots] = key
    kv_cache[1].view(-1, num_kv_heads, head_dim)[slots] = value
