"""Paged decode attention (single and split-KV paths) against its torch reference."""

import pytest
import torch

from kernels.paged_decode import choose_num_splits, paged_decode, paged_decode_ref
from paged_cases import assert_close, kernel_device, make_batch, poisoned_like

DEVICE = kernel_device()
# Not multiples of the block sizes, plus 1 and an exact multiple of both.
SEQ_LENS = [1, 37, 64, 90, 13]


def _run(batch, num_heads, dtype, num_splits):
    q = batch.q
    out = paged_decode(q, batch.kv_cache, batch.block_tables, batch.seq_lens, 0.3,
                       max_seq_len=batch.max_seq_len, num_splits=num_splits, out=poisoned_like(q))
    assert_close(out, paged_decode_ref(q, batch.kv_cache, batch.block_tables, batch.seq_lens, 0.3), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("group", [1, 3, 4, 8])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("num_splits", [1, 4])
def test_paged_decode_matches_reference(dtype, group, block_size, num_splits):
    num_kv_heads = 2
    batch = make_batch(SEQ_LENS, [1] * len(SEQ_LENS), group * num_kv_heads, num_kv_heads, 64, block_size,
                       dtype, DEVICE)
    _run(batch, group * num_kv_heads, dtype, num_splits)


@pytest.mark.parametrize("head_dim", [128, 256])
@pytest.mark.parametrize("num_splits", [1, 2])
def test_paged_decode_head_dims(head_dim, num_splits):
    batch = make_batch([3, 50], [1, 1], 8, 2, head_dim, 16, torch.float16, DEVICE)
    _run(batch, 8, torch.float16, num_splits)


@pytest.mark.parametrize("config", [dict(TILE_N=64, num_warps=8, num_stages=2), dict(TILE_N=64, num_warps=4, num_stages=5)])
def test_paged_decode_wider_launches(config):
    """Launches bench/decode_fixed.py times (8 warps; 5 stages: K/V double-buffered on the GPU) over tiles that
    span blocks, head_dim 128."""
    batch = make_batch([1, 70, 129, 200], [1] * 4, 8, 2, 128, 16, torch.float16, DEVICE)
    q = batch.q
    out = paged_decode(q, batch.kv_cache, batch.block_tables, batch.seq_lens, 0.3, num_splits=1, config=config,
                       out=poisoned_like(q))
    assert_close(out, paged_decode_ref(q, batch.kv_cache, batch.block_tables, batch.seq_lens, 0.3), torch.float16)


def test_paged_decode_more_splits_than_tiles():
    # Splits past the end of a short sequence are empty and must weigh nothing in the reduce.
    batch = make_batch([2, 40], [1, 1], 4, 1, 64, 16, torch.float32, DEVICE)
    _run(batch, 4, torch.float32, 8)


def test_choose_num_splits():
    assert choose_num_splits(72, 8, 2048, 132) == 1  # 576 programs: more than 4 per SM, no split
    assert choose_num_splits(64, 8, 2048, 132) == 8  # 512: at least MIN_SPLITS
    assert choose_num_splits(8, 8, 2064, 132) == 8
    assert choose_num_splits(4, 8, 2064, 132) == 16  # 32 programs: ~4 per SM
    assert choose_num_splits(4, 8, 32768, 132) == 16
    assert choose_num_splits(4, 8, 600, 132) == 4  # 128-token splits at least
    assert choose_num_splits(4, 8, 200, 132) == 1  # too short to be worth splitting
    assert choose_num_splits(1, 1, 1 << 20, 132) == 64  # capped
    # One or two sequences of 8 KV heads (<= 16 programs on 132 SMs): splits down to 64 tokens
    assert choose_num_splits(1, 8, 512, 132) == 8
    assert choose_num_splits(2, 8, 256, 132) == 4
    assert choose_num_splits(2, 8, 2064, 132) == 32
    assert choose_num_splits(1, 8, 40, 132) == 1  # shorter than one split
    assert choose_num_splits(3, 8, 512, 132) == 4  # 24 programs: the 128-token minimum


@pytest.mark.parametrize("rule,cases", [
    ("s6", [((1, 8, 512), 1), ((2, 8, 2064), 4), ((33, 8, 2064), 1), ((32, 8, 2064), 2)]),
    ("s7", [((1, 8, 512), 8), ((2, 8, 2064), 32), ((4, 8, 2064), 4), ((32, 8, 2064), 2)]),
])
def test_choose_num_splits_earlier_rules(monkeypatch, rule, cases):
    # FOLIO_DECODE_SPLIT_RULE (A/B runs): session 6's rule (512-token floor, split under 2 programs per SM) and
    # session 7's (the 64-token floor at one or two sequences)
    monkeypatch.setenv("FOLIO_DECODE_SPLIT_RULE", rule)
    for args, want in cases:
        assert choose_num_splits(*args, 132) == want, (rule, args)


def test_paged_decode_rejects_bad_inputs():
    batch = make_batch([5], [1], 4, 2, 64, 16, torch.float32, DEVICE)
    with pytest.raises(ValueError, match="multiple"):
        paged_decode(batch.q[:, :3], batch.kv_cache, batch.block_tables, batch.seq_lens, 1.0)
    with pytest.raises(ValueError, match="block_tables"):
        paged_decode(batch.q, batch.kv_cache, batch.block_tables.long(), batch.seq_lens, 1.0)
    with pytest.raises(ValueError, match="dtype"):
        paged_decode(batch.q.half(), batch.kv_cache, batch.block_tables, batch.seq_lens, 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_splits, ub", [(1, None), (1, 0.05), (2, None)])
def test_paged_decode_fp8_out_equals_quantizing_its_output(dtype, num_splits, ub, monkeypatch):
    """fp8_out: the output quantized per token for an FP8 o_proj (by each sequence's last program to finish with
    one split, by kernels/fp8_quant.py after the reduce with two), the bits of quantize_fp8_rows(out); the
    arrival counts are left at zero for the next launch (a second call gives the same bits)."""
    from kernels import fp8_quant

    quantize = fp8_quant.quantize_fp8_rows
    if num_splits == 1:  # the kernel alone quantizes
        monkeypatch.setattr(fp8_quant, "quantize_fp8_rows", lambda *a, **k: pytest.fail("quantized outside"))
    batch = make_batch(SEQ_LENS, [1] * len(SEQ_LENS), 8, 2, 16, 16, dtype, DEVICE)
    run = lambda: paged_decode(batch.q, batch.kv_cache, batch.block_tables, batch.seq_lens, 0.3,  # noqa: E731
                               max_seq_len=batch.max_seq_len, num_splits=num_splits, out=poisoned_like(batch.q),
                               fp8_out=True, fp8_ub=ub)
    out, q8, s8 = run()
    assert_close(out, paged_decode_ref(batch.q, batch.kv_cache, batch.block_tables, batch.seq_lens, 0.3), dtype)
    want_q, want_s = quantize(out.reshape(len(SEQ_LENS), -1), ub=ub)
    assert torch.equal(q8.view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(s8, want_s)
    assert not fp8_quant.arrival_counts(batch.q.device, len(SEQ_LENS)).any()
    again = run()
    assert torch.equal(again[1].view(torch.uint8), q8.view(torch.uint8)) and torch.equal(again[2], s8)
