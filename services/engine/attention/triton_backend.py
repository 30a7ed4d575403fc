"""Attention backend on the Triton paged kernels (CUDA; on CPU only under TRITON_INTERPRET=1)."""

from __future__ import annotations

import os

import torch

from kernels.copy_blocks import copy_blocks
from kernels.paged_decode import paged_decode
from kernels.paged_prefill import paged_prefill
from kernels.reshape_and_cache import reshape_and_cache
from services.engine.attention.params import AttentionParams


class TritonAttentionBackend:
    """Writes the step's K/V into the paged cache, then attends.

    A decode-only step (every sequence brings one token) takes the decode kernel, which splits long
    contexts across SMs when there are few sequences. Any other step, prefill chunks and decodes mixed,
    launches the prefill/extend kernel for its sequences of more than one new token, which reads the
    chunk's own keys from the step's k/v (the values just written to the cache) and only the cached
    prefix through the block table, and the decode kernel (one split) for its one-token sequences.
    """

    name = "triton"
    fuses_rotary_cache = os.environ.get("FOLIO_ROTARY_CACHE", "1") != "0"
    """The layer may write the step's K/V into the cache with its rotary kernel (Attention.forward) and say so;
    FOLIO_ROTARY_CACHE=0 (read at import) keeps rotary and the cache write apart, for comparisons."""

    quantizes_output = True
    """forward(fp8_out=...) may return the output quantized for an FP8 linear layer too."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, meta,
                params: AttentionParams, cache_written: bool = False, fp8_out: tuple | None = None):
        """`cache_written`: the step's k and v are in the cache already (kernels/rotary.py, rotary_and_cache).
        `fp8_out` ((amax bound or None,)): in a decode step whose rows are all sequences, the decode kernel also
        quantizes its output per token (kernels/paged_decode.py, fp8_out) and (out, fp8 [T, heads * d], scales
        [T, 1]) is returned; other steps return out alone."""
        variants = dict(sliding_window=params.sliding_window, logit_softcap=params.logit_softcap,
                        alibi_slopes=params.alibi_slopes, sinks=params.sinks,
                        k_scale=params.k_scale, v_scale=params.v_scale)
        if not cache_written:
            reshape_and_cache(k, v, kv_cache, meta.slot_mapping, params.k_scale, params.v_scale)
        num_seqs = len(meta.seq_lens_cpu)
        # Under a CUDA graph the prefill kernel's padding rows vary per replay: zero them all first (one
        # memset) rather than after the kernel by a count the host knew at capture. (The decode kernel
        # writes every row, padding sequences included.)
        out = torch.zeros_like(q) if meta.captured and meta.max_query_len > 1 else torch.empty_like(q)
        num_real = q.shape[0] if meta.captured else sum(meta.query_lens_cpu)
        if meta.max_query_len == 1 and fp8_out is not None and num_seqs == q.shape[0]:
            return paged_decode(q, kv_cache, meta.block_tables, meta.seq_lens, params.scale,
                                max_seq_len=meta.max_seq_len, out=out, fp8_out=True, fp8_ub=fp8_out[0], **variants)
        if meta.max_query_len == 1:
            paged_decode(q[:num_seqs], kv_cache, meta.block_tables, meta.seq_lens, params.scale,
                         max_seq_len=meta.max_seq_len, out=out[:num_seqs], **variants)
        else:
            # A step of fresh prompts only compiles without the block-table path (the lists are host-side).
            has_prefix = any(s != n for s, n in zip(meta.seq_lens_cpu, meta.query_lens_cpu))
            # A mixed step's one-token sequences (its decodes) go to the decode kernel, which reads their
            # keys 2-4x faster than the prefill kernel's tiles (bench/decode_sweep.py); under a graph the
            # counts vary per replay, so both kernels always run and each skips the other's sequences.
            paged_prefill(q, kv_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, params.scale,
                          out=out, k=k, v=v, has_prefix=has_prefix, max_query_len=meta.max_query_len,
                          skip_single=True, chunk_list=meta.chunk_list, **variants)
            if meta.captured or 1 in meta.query_lens_cpu:
                paged_decode(q, kv_cache, meta.block_tables, meta.seq_lens, params.scale, out=out,
                             query_start_loc=meta.query_start_loc, **variants)
        if num_real < q.shape[0]:
            out[num_real:].zero_()  # padding rows of an eager step
        return out

    def copy_blocks(self, kv_caches: list[torch.Tensor], src: torch.Tensor, dst: torch.Tensor) -> None:
        copy_blocks(kv_caches, src, dst)
