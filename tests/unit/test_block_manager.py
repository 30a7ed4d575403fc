import subprocess
import sys

import pytest

from services.engine.block_manager import BlockManager
from tests.unit.builders import make_requests


def seq_of(req):
    return req.seqs[0]


def test_engine_bookkeeping_imports_no_torch():
    code = ("import sys; import services.engine.block_manager, services.engine.scheduler, services.engine.request;"
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_allocate_rounds_up_to_blocks_and_free_returns_them():
    bm = BlockManager(10, 4)
    s = seq_of(make_requests(9)[0])
    assert bm.can_allocate(s, 9)
    bm.allocate(s, 9)
    assert bm.num_held_blocks(s.seq_id) == 3
    assert bm.num_free_blocks == 7
    bm.free(s)
    assert bm.num_free_blocks == 10
    bm.check_invariants()


def test_cannot_allocate_beyond_the_pool():
    bm = BlockManager(2, 4)
    s = seq_of(make_requests(9)[0])
    assert not bm.can_allocate(s, 9)
    assert bm.can_allocate(s, 8)


def test_fork_shares_blocks_and_copy_on_write_splits_the_partial_block():
    bm = BlockManager(10, 4, enable_prefix_caching=False)
    parent = seq_of(make_requests(6)[0])
    bm.allocate(parent, 6)
    parent.num_computed_tokens = 6
    child = make_requests(6)[0].seqs[0]
    child.num_computed_tokens = 6
    bm.fork(parent, child)
    assert bm.block_ids(parent.seq_id) == bm.block_ids(child.seq_id)
    assert bm.num_used_blocks() == 2  # shared, counted once
    parent.token_ids.append(1)
    copies = bm.append(parent, 1)
    # The full first block stays shared; the partial second block is copied for the writer.
    assert len(copies) == 1
    src, dst = copies[0]
    assert src == bm.block_ids(child.seq_id)[1] and dst == bm.block_ids(parent.seq_id)[1]
    assert bm.block_ids(parent.seq_id)[0] == bm.block_ids(child.seq_id)[0]
    # The other sibling now owns the old block alone: no copy needed.
    child.token_ids.append(2)
    assert bm.append(child, 1) == []
    bm.check_invariants()
    bm.free(parent)
    bm.free(child)
    assert bm.num_free_blocks == 10
    bm.check_invariants()


def test_prefix_cache_reuses_full_blocks_and_evicts_lru():
    bm = BlockManager(4, 4)
    a = seq_of(make_requests(9)[0])
    bm.allocate(a, 9)
    a.num_computed_tokens = 9
    bm.mark_computed(a)
    bm.free(a)
    assert bm.num_evictable_blocks == 2  # two full blocks stay cached
    b = make_requests(9)[0].seqs[0]  # same tokens
    cached = bm.find_cached_prefix(b)
    assert len(cached) == 2
    bm.allocate(b, 1, cached)
    assert b.num_computed_tokens == 8
    bm.check_invariants()
    bm.free(b)
    # A different prompt needing all 4 blocks evicts the cached ones.
    c = seq_of(make_requests(1, 16)[1])
    assert bm.find_cached_prefix(c) == []
    bm.allocate(c, 16)
    assert bm.num_evictable_blocks == 0
    assert bm.pool.num_evictions == 2
    bm.check_invariants()


def test_a_whole_cached_prompt_still_leaves_one_token_to_compute():
    bm = BlockManager(8, 4)
    a = seq_of(make_requests(8)[0])
    bm.allocate(a, 8)
    a.num_computed_tokens = 8
    bm.mark_computed(a)
    bm.free(a)
    b = make_requests(8)[0].seqs[0]
    assert len(bm.find_cached_prefix(b)) == 1


def test_release_too_often_is_caught():
    bm = BlockManager(2, 4)
    blk = bm.pool.take()
    bm.pool.release(blk)
    with pytest.raises(AssertionError):
        bm.pool.release(blk)


def test_sliding_window_releases_blocks_behind_the_window_and_forks_and_frees_cleanly():
    from services.engine.block_manager import SLID_OUT

    bm = BlockManager(12, 4, enable_prefix_caching=True, sliding_window=6)
    s = seq_of(make_requests(20)[0])
    bm.allocate(s, 8)
    s.num_computed_tokens = 8
    bm.mark_computed(s)  # next query at 8 sees keys 3..8: block 0 (0-3) is still needed
    assert bm.num_held_blocks(s.seq_id) == 2 and bm.num_used_blocks() == 2
    bm.append(s, 8)
    s.num_computed_tokens = 16
    bm.mark_computed(s)  # next query at 16 sees 11..16: blocks 0, 1 (0-7) slid out
    table = bm.tables[s.seq_id]
    assert table.blocks[:2] == [SLID_OUT, SLID_OUT] and bm.num_used_blocks() == 2
    assert bm.num_evictable_blocks == 2  # released full blocks stay cached until evicted
    child = seq_of(make_requests(20)[0])
    child.num_computed_tokens = 16
    bm.fork(s, child)
    bm.check_invariants()
    bm.free(s)
    bm.free(child)
    bm.check_invariants()
    assert bm.num_free_blocks == 12
