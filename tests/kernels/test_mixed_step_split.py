"""A mixed step's attention split between the two kernels (the Triton backend's path): paged_prefill with
skip_single attends to the sequences with several new tokens and leaves the one-token sequences' rows
alone; paged_decode with query_start_loc attends to exactly those rows. Together they equal the torch
reference on every real row and leave padding rows untouched; padding sequences (no new tokens, as in a
CUDA graph's bucket) are skipped by both."""

import pytest
import torch

from kernels.paged_decode import paged_decode
from kernels.paged_prefill import paged_prefill, paged_prefill_ref
from paged_cases import assert_close, kernel_device, make_batch, poisoned_like

DEVICE = kernel_device()

# a fresh prompt, a chunk after cached keys, decodes (one after a single cached key), a one-token prompt
MIXED = [(37, 37), (21, 1), (45, 13), (1, 1), (70, 1), (2, 1), (64, 32)]


def _split(batch, variants=None, padding_seqs=0):
    variants = variants or {}
    n = int(batch.query_start_loc[-1])
    qsl, lens, tables = batch.query_start_loc, batch.seq_lens, batch.block_tables
    if padding_seqs:  # sequences with no new token: query_start_loc repeats the total, length 1
        qsl = torch.cat([qsl, qsl[-1:].repeat(padding_seqs)])
        lens = torch.cat([lens, torch.ones(padding_seqs, dtype=lens.dtype, device=lens.device)])
        tables = torch.cat([tables, tables[:1].repeat(padding_seqs, 1)])
    out = poisoned_like(batch.q)
    paged_prefill(batch.q, batch.kv_cache, tables, lens, qsl, 0.3, out=out, k=batch.k, v=batch.v,
                  skip_single=True, **variants)
    singles = [i for i, q in enumerate(batch.query_lens_cpu) if q == 1]
    rows = batch.query_start_loc[singles].long()
    assert out[rows].isnan().all(), "the prefill kernel must leave the one-token rows to the decode kernel"
    paged_decode(batch.q, batch.kv_cache, tables, lens, 0.3, out=out, query_start_loc=qsl, **variants)
    return out, n


@pytest.mark.parametrize("dtype,group,padding_seqs", [(torch.float32, 1, 0), (torch.float16, 4, 3),
                                                      (torch.float32, 4, 3), (torch.float16, 1, 0)])
def test_mixed_step_split_equals_reference(dtype, group, padding_seqs):
    seq_lens, query_lens = zip(*MIXED)
    batch = make_batch(list(seq_lens), list(query_lens), 2 * group, 2, 64, 16, dtype, DEVICE, num_padding_tokens=3)
    out, n = _split(batch, padding_seqs=padding_seqs)
    expected = paged_prefill_ref(batch.q[:n], batch.kv_cache, batch.block_tables, batch.seq_lens,
                                 batch.query_start_loc, 0.3)
    assert_close(out[:n], expected, dtype)
    assert out[n:].isnan().all(), "padding rows must be left alone"


def test_mixed_step_split_with_a_window_and_softcap():
    seq_lens, query_lens = zip(*MIXED)
    batch = make_batch(list(seq_lens), list(query_lens), 4, 2, 64, 16, torch.float32, DEVICE)
    variants = dict(sliding_window=16, logit_softcap=20.0)
    out, n = _split(batch, variants)
    whole = paged_prefill(batch.q, batch.kv_cache, batch.block_tables, batch.seq_lens, batch.query_start_loc, 0.3,
                          k=batch.k, v=batch.v, **variants)
    torch.testing.assert_close(out[:n], whole[:n], atol=1e-5, rtol=1e-5)


def test_decode_rows_argument_checks():
    batch = make_batch([5, 9], [1, 1], 4, 2, 64, 16, torch.float32, DEVICE)
    with pytest.raises(ValueError, match="query_start_loc"):
        paged_decode(batch.q, batch.kv_cache, batch.block_tables, batch.seq_lens, 0.3,
                     query_start_loc=batch.query_start_loc.long())
