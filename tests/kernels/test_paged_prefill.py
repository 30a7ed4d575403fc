"""Paged prefill / extend attention (mixed prefill-chunk and decode batches) against its torch reference."""

import pytest
import torch

from kernels.paged_prefill import paged_prefill, paged_prefill_ref
from paged_cases import assert_close, assert_skip_single, kernel_device, make_batch, poisoned_like

DEVICE = kernel_device()

# (seq_len, query_len): a whole prompt, a chunk after a cached prefix (prefix-cache hit or chunked
# prefill), decodes, and a chunk ending exactly on a block boundary.
MIXED = [(37, 37), (45, 13), (21, 1), (64, 32), (1, 1), (70, 1)]


def _run(batch, dtype, config=None):
    n = int(batch.query_start_loc[-1])
    out = paged_prefill(batch.q, batch.kv_cache, batch.block_tables, batch.seq_lens, batch.query_start_loc, 0.3,
                        out=poisoned_like(batch.q), config=config)
    expected = paged_prefill_ref(batch.q[:n], batch.kv_cache, batch.block_tables, batch.seq_lens,
                                 batch.query_start_loc, 0.3)
    assert_close(out[:n], expected, dtype)
    assert out[n:].isnan().all(), "padding rows must be left alone"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("group", [1, 3, 4, 8])
@pytest.mark.parametrize("block_size", [16, 32])
def test_paged_prefill_mixed_batch(dtype, group, block_size):
    seq_lens, query_lens = zip(*MIXED)
    batch = make_batch(list(seq_lens), list(query_lens), 2 * group, 2, 64, block_size, dtype, DEVICE,
                       num_padding_tokens=2)
    _run(batch, dtype)


@pytest.mark.parametrize("head_dim", [128, 256])
def test_paged_prefill_head_dims(head_dim):
    batch = make_batch([40, 9], [25, 1], 4, 2, head_dim, 16, torch.float16, DEVICE)
    _run(batch, torch.float16)


@pytest.mark.parametrize("block_m,block_n", [(16, 16), (64, 16)])
def test_paged_prefill_tile_shapes(block_m, block_n):
    # Tiles smaller and larger than a block, and more query rows per tile than a chunk has.
    seq_lens, query_lens = zip(*MIXED)
    batch = make_batch(list(seq_lens), list(query_lens), 8, 2, 64, 32, torch.float32, DEVICE)
    _run(batch, torch.float32, config=dict(BLOCK_M=block_m, BLOCK_N=block_n))


def test_paged_prefill_decode_only_batch_equals_decode_kernel():
    from kernels.paged_decode import paged_decode

    batch = make_batch([5, 33, 17], [1, 1, 1], 8, 2, 64, 16, torch.float32, DEVICE)
    a = paged_prefill(batch.q, batch.kv_cache, batch.block_tables, batch.seq_lens, batch.query_start_loc, 0.3)
    b = paged_decode(batch.q, batch.kv_cache, batch.block_tables, batch.seq_lens, 0.3)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# Structural variants of the kernel (kernels/paged_prefill.py): where the chunk's own keys come from
# (the block table, or the step's contiguous k/v with plain loads or TMA descriptors), GQA packing,
# one block-table lookup per block, reversed or paired tile order, lazy rescaling, how a program finds
# its sequence. Each must equal the reference on a batch mixing a whole prompt, extends after a cached
# prefix, decodes, odd lengths and padding.
STRUCTURES = [
    dict(NEW_KV="ptr"),
    dict(NEW_KV="tma", REVERSE=True),
    dict(NEW_KV="tma", BLOCK_N=16, PACK_GQA=False, LAZY_RESCALE=True),
    dict(NEW_KV="ptr", BLOCK_M=16, BLOCK_N=32, BLOCKWISE=True, REVERSE=True),
    dict(NEW_KV="paged", BLOCK_N=32, BLOCKWISE=True, PACK_GQA=False, LAZY_RESCALE=True),
    dict(NEW_KV="tma", SEQ_VEC=8),  # each program finds its sequence with vector loads, not a binary search
    dict(NEW_KV="tma", BLOCK_N=16, BLOCK_N_PAGED=32),  # the cached prefix in wider tiles than the chunk
    dict(NEW_KV="tma", PAIR_TILES=True, SEQ_VEC=8),  # two query tiles per program (37 tokens: 5 tiles of 8)
    dict(NEW_KV="tma", Q_SCALED=True, LOOP_STAGES=3, LOOP_UNROLL=2),  # scale folded into q; tl.range attributes
    dict(NEW_KV="paged", BLOCK_N=16, Q_SCALED=True, LOOP_WS=True),
    dict(NEW_KV="tma", BLOCK_N=16, OVERLAP_QK=True),  # the next tile's QK^T before this tile's softmax
    dict(NEW_KV="tma", BLOCK_M=16, BLOCK_N=8, OVERLAP_QK=True, Q_SCALED=True, PACK_GQA=False),
    dict(NEW_KV="tma", BLOCK_N=32, BLOCK_N_TAIL=8),  # the diagonal in narrower tiles than the bulk
    dict(NEW_KV="ptr", BLOCK_M=16, BLOCK_N=32, BLOCK_N_TAIL=16, PACK_GQA=False, PAIR_TILES=True, SEQ_VEC=8),
    # free and diagonal tiles in one loop: every tile masked (1) / masked by a runtime branch (2)
    dict(NEW_KV="tma", BLOCK_N=16, ONE_LOOP=1),
    dict(NEW_KV="paged", BLOCK_N=16, ONE_LOOP=2, PACK_GQA=False),
    # a persistent grid (4 "SMs" on the CPU x 2 programs) walking every work item, some programs several
    dict(NEW_KV="tma", BLOCK_N=16, PERSISTENT=2, ONE_LOOP=2),
    dict(NEW_KV="ptr", PERSISTENT=1, PAIR_TILES=True, SEQ_VEC=8, BLOCK_N_TAIL=8),
    # heaviest tiles of every sequence first, the sequence from the slot itself (max_query_len given below)
    dict(NEW_KV="tma", BLOCK_N=16, HEAVY_FIRST=True, ONE_LOOP=2),
    dict(NEW_KV="paged", BLOCK_N=16, HEAVY_FIRST=True, PERSISTENT=2, BLOCK_N_TAIL=8, PACK_GQA=False),
]


def _run_with_kv(batch, dtype, config, scale=0.3, block_size=16):
    n = int(batch.query_start_loc[-1])
    out = paged_prefill(batch.q, batch.kv_cache, batch.block_tables, batch.seq_lens, batch.query_start_loc, scale,
                        out=poisoned_like(batch.q), config=config, k=batch.k, v=batch.v,
                        max_query_len=int((batch.query_start_loc[1:] - batch.query_start_loc[:-1]).max()))
    expected = paged_prefill_ref(batch.q[:n], batch.kv_cache, batch.block_tables, batch.seq_lens,
                                 batch.query_start_loc, scale)
    assert_close(out[:n], expected, dtype)
    assert out[n:].isnan().all(), "padding rows must be left alone"


@pytest.mark.parametrize("config", STRUCTURES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_paged_prefill_structures(config):
    seq_lens, query_lens = zip(*MIXED)
    batch = make_batch(list(seq_lens), list(query_lens), 8, 2, 64, 16, torch.float16, DEVICE, num_padding_tokens=2)
    _run_with_kv(batch, torch.float16, config)


@pytest.mark.parametrize("group", [1, 3])
def test_paged_prefill_contiguous_keys_gqa(group):
    # A group that is not a power of two leaves padding rows in every packed tile.
    batch = make_batch([50, 19, 7], [50, 11, 1], 2 * group, 2, 32, 16, torch.float32, DEVICE, num_padding_tokens=1)
    _run_with_kv(batch, torch.float32, dict(NEW_KV="tma", BLOCK_N=16))


def test_paged_prefill_lazy_rescale_large_logits():
    # Logits spread over tens of units: a row's max grows by more than 2^8 in later tiles, so the lazy
    # path's rescale branch runs mid-sequence as well as on the first tile.
    batch = make_batch([70, 45], [70, 13], 4, 2, 32, 16, torch.float32, DEVICE)
    batch.q.mul_(6.0)
    _run_with_kv(batch, torch.float32, dict(NEW_KV="ptr", BLOCK_N=16, LAZY_RESCALE=True), scale=1.0)


@pytest.mark.parametrize("new_kv", ["paged", "tma"])
def test_paged_prefill_chunked_prompt_equals_whole_prompt(new_kv):
    # A 53-token prompt run as chunks of 20, 20 and 13 tokens (each step's K/V already in the cache and
    # given as k/v) gives the rows of the whole prompt run in one step.
    whole = make_batch([53], [53], 4, 2, 32, 16, torch.float32, DEVICE)
    cfg = dict(NEW_KV=new_kv, BLOCK_N=16)
    full = paged_prefill(whole.q, whole.kv_cache, whole.block_tables, whole.seq_lens, whole.query_start_loc, 0.3,
                         config=cfg, k=whole.k, v=whole.v)
    for lo, hi in [(0, 20), (20, 40), (40, 53)]:
        qsl = torch.tensor([0, hi - lo], dtype=torch.int32, device=DEVICE)
        seq_lens = torch.tensor([hi], dtype=torch.int32, device=DEVICE)
        part = paged_prefill(whole.q[lo:hi], whole.kv_cache, whole.block_tables, seq_lens, qsl, 0.3, config=cfg,
                             k=whole.k[lo:hi], v=whole.v[lo:hi])
        torch.testing.assert_close(part, full[lo:hi], atol=1e-5, rtol=1e-5)


def test_paged_prefill_new_kv_arguments_are_checked():
    batch = make_batch([9], [4], 4, 2, 32, 16, torch.float32, DEVICE)
    args = (batch.q, batch.kv_cache, batch.block_tables, batch.seq_lens, batch.query_start_loc, 0.3)
    with pytest.raises(ValueError, match="k and v must be given together"):
        paged_prefill(*args, k=batch.k)
    with pytest.raises(ValueError, match=r"k must be torch.float32 \[num_tokens, num_kv_heads, head_dim\]"):
        paged_prefill(*args, k=batch.k[:, :1], v=batch.v)
    with pytest.raises(ValueError, match="NEW_KV must be one of"):
        paged_prefill(*args, k=batch.k, v=batch.v, config=dict(NEW_KV="dense"))


def test_paged_prefill_fresh_prompts_without_the_block_table_path():
    # has_prefix=False (every sequence a fresh prompt): only the contiguous k/v are read, so a cache of NaN
    # must not matter; the same call with has_prefix=True reads nothing from it either.
    batch = make_batch([37, 20, 1], [37, 20, 1], 4, 2, 32, 16, torch.float32, DEVICE)
    n = int(batch.query_start_loc[-1])
    expected = paged_prefill_ref(batch.q[:n], batch.kv_cache, batch.block_tables, batch.seq_lens,
                                 batch.query_start_loc, 0.3)
    poisoned_cache = torch.full_like(batch.kv_cache, float("nan"))
    for has_prefix in (False, True):
        out = paged_prefill(batch.q, poisoned_cache, batch.block_tables, batch.seq_lens, batch.query_start_loc, 0.3,
                            k=batch.k, v=batch.v, has_prefix=has_prefix, config=dict(NEW_KV="tma", BLOCK_N=16))
        assert_close(out[:n], expected, torch.float32)


def test_paged_prefill_heavy_first_grid_rule():
    # HEAVY_FIRST's grid is num_seqs x the longest chunk's tiles: used where max_query_len is known and the grid at
    # most doubles the plain one (MIXED's structures above take it), skipped otherwise; it excludes PAIR_TILES.
    from kernels.paged_prefill_configs import heavy_first_tiles

    cfg = dict(HEAVY_FIRST=True, PAIR_TILES=False)
    assert heavy_first_tiles(cfg, 37, 6, 8, 85 // 8 + 6) == 5  # MIXED at BLOCK_Q 8
    assert heavy_first_tiles(cfg, None, 6, 8, 16) == 0
    assert heavy_first_tiles(cfg, 4096, 41, 32, 4136 // 32 + 41) == 0  # one long prompt beside 40 decodes
    assert heavy_first_tiles(dict(cfg, HEAVY_FIRST=False), 37, 6, 8, 16) == 0
    with pytest.raises(ValueError, match="HEAVY_FIRST and PAIR_TILES"):
        heavy_first_tiles(dict(cfg, PAIR_TILES=True), 37, 6, 8, 16)


def test_paged_prefill_heavy_first_skip_single_and_padding_sequences():
    # The HEAVY_FIRST mapping with a mixed step's options: one-token sequences left to the decode kernel, and
    # padding sequences (no new tokens, as in a CUDA graph's bucket) skipped.
    batch = make_batch([37, 21, 45, 64], [37, 1, 13, 32], 8, 2, 32, 16, torch.float32, DEVICE, num_padding_tokens=2)
    n = int(batch.query_start_loc[-1])
    qsl = torch.cat([batch.query_start_loc, batch.query_start_loc[-1:].repeat(2)])
    lens = torch.cat([batch.seq_lens, torch.ones(2, dtype=batch.seq_lens.dtype, device=DEVICE)])
    tables = torch.cat([batch.block_tables, batch.block_tables[:1].repeat(2, 1)])
    out = paged_prefill(batch.q, batch.kv_cache, tables, lens, qsl, 0.3, out=poisoned_like(batch.q), k=batch.k,
                        v=batch.v, skip_single=True, max_query_len=37,
                        config=dict(NEW_KV="tma", BLOCK_N=16, HEAVY_FIRST=True))
    expected = paged_prefill_ref(batch.q[:n], batch.kv_cache, batch.block_tables, batch.seq_lens,
                                 batch.query_start_loc, 0.3)
    multi = torch.cat([torch.arange(0, 37), torch.arange(38, n)]).to(DEVICE)
    assert_close(out[multi], expected[multi], torch.float32)
    assert out[37].isnan().all() and out[n:].isnan().all()


def test_make_chunk_list():
    from kernels.paged_prefill import make_chunk_list

    got = make_chunk_list([1, 30, 1, 20, 0, 64])
    assert got.tolist() == [[0, 30, 50, 114, 114, 114, 114], [3, 1, 3, 5, 0, 0, 0]]
    assert make_chunk_list([1, 1]).tolist() == [[0, 0, 0], [0, 0, 0]]  # decodes only: nothing listed


@pytest.mark.parametrize("config", [dict(BLOCK_N=16, PERSISTENT=1), dict(BLOCK_N=16, PERSISTENT=3),
                                    dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3, ONE_LOOP=2, PERSISTENT=3),
                                    # the table's pick for the engine's small mixed steps (paged_prefill_configs)
                                    dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2, PERSISTENT=2)],
                         ids=["1", "3", "64x32", "table"])
def test_paged_prefill_chunk_list_walks_the_listed_chunks_alone(config):
    # CHUNK_LIST: a mixed step's decodes (left to the decode kernel), a chunk after cached keys, prompts of
    # several tiles and padding sequences (no new tokens) - only the listed sequences' rows are written.
    from kernels.paged_prefill import make_chunk_list

    seq_lens, q_lens = [40, 70, 33, 90, 5, 200, 21], [1, 30, 1, 20, 1, 64, 21]
    batch = make_batch(seq_lens, q_lens, 8, 2, 32, 16, torch.float32, DEVICE, num_padding_tokens=3)
    n = int(batch.query_start_loc[-1])
    qsl = torch.cat([batch.query_start_loc, batch.query_start_loc[-1:].repeat(2)])
    lens = torch.cat([batch.seq_lens, torch.ones(2, dtype=batch.seq_lens.dtype, device=DEVICE)])
    tables = torch.cat([batch.block_tables, batch.block_tables[:1].repeat(2, 1)])
    chunks = torch.from_numpy(make_chunk_list(q_lens + [0, 0])).to(DEVICE)
    out = paged_prefill(batch.q, batch.kv_cache, tables, lens, qsl, 0.3, out=poisoned_like(batch.q), k=batch.k,
                        v=batch.v, skip_single=True, chunk_list=chunks,
                        config=dict(config, CHUNK_LIST=True))
    expected = paged_prefill_ref(batch.q[:n], batch.kv_cache, batch.block_tables, batch.seq_lens,
                                 batch.query_start_loc, 0.3)
    assert_skip_single(out, expected, batch.query_start_loc, q_lens, torch.float32)


def test_paged_prefill_chunk_list_is_checked():
    from kernels.paged_prefill import make_chunk_list

    batch = make_batch([40, 9], [1, 9], 8, 2, 32, 16, torch.float32, DEVICE)
    args = (batch.q, batch.kv_cache, batch.block_tables, batch.seq_lens, batch.query_start_loc, 0.3)
    good = torch.from_numpy(make_chunk_list([1, 9])).to(DEVICE)
    for bad in (good[:, :2], good.long(), good[0]):
        with pytest.raises(ValueError, match="chunk_list"):
            paged_prefill(*args, k=batch.k, v=batch.v, skip_single=True, chunk_list=bad)
