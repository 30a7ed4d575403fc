"""KV block bookkeeping: the pool of fixed-size blocks, per-sequence block tables, sharing and prefix caching.

No torch here: the block manager decides *which* physical blocks hold which tokens; the model runner
moves the bytes. Each table also lives as a row of one persistent int32 array (`table_rows`), written
where a table changes (a block appended, copied on write, slid out), so a step gathers its block
tables in one indexing operation instead of rebuilding every table's list. Invariants (checked by `check_invariants`, used in tests):
  * a block's ref_count equals the number of block tables holding it;
  * a block is in the free queue iff its ref_count is 0;
  * a block has a hash iff it is full of computed tokens and registered in the cache map, and then the
    cache map points at it (one block per hash);
  * the free queue is in eviction order: blocks caching nothing first, then cached blocks least
    recently freed first. Taking a free block that still carries a hash evicts that cached prefix, and
    a block is only taken from the free queue, so a block some sequence holds is never evicted;
  * `num_evictable` counts the free blocks that carry a hash.
With a sliding window (every layer of the model attends only to its last `sliding_window` positions), a
sequence's leading blocks that no future query can see are released as soon as the step that slid past
them is computed; their table entries become `SLID_OUT` (block id 0, never read unmasked: the
attention backend masks positions outside the window), which no reference count or free queue knows.
Block hashes are SHA-256 based (truncated to 128 bits): deterministic across processes and not
forgeable by a client choosing prompt tokens, unlike Python's `hash` on small ints.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


class HasTokens(Protocol):
    seq_id: int
    token_ids: list[int]
    num_computed_tokens: int


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None


def chain_hash(parent_hash: int | None, tokens: tuple[int, ...], namespace: object = None) -> int:
    """Name of a full block: depends on every token before it (through the parent), its own tokens and
    the namespace (anything else that changes KV contents: model, adapter, salt; given by its repr)."""
    h = hashlib.sha256()
    h.update(b"-" if parent_hash is None else parent_hash.to_bytes(16, "little"))
    h.update(repr(namespace).encode())
    h.update(b"|")
    h.update(array("q", tokens).tobytes())
    return int.from_bytes(h.digest()[:16], "little")


SLID_OUT = Block(block_id=0, ref_count=-1)
"""Table entry of a block released because the sliding window moved past it (not a pool block)."""


class BlockPool:
    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {num_blocks}")
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, Block] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._cached: dict[int, Block] = {}
        self._num_evictable = 0
        self.num_evictions = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        """Blocks a new allocation can take (never-used and evictable cached ones)."""
        return len(self._free)

    @property
    def num_evictable(self) -> int:
        """Free blocks that still cache a prefix (counted within `num_free`)."""
        return self._num_evictable

    def take(self) -> Block:
        _, block = self._free.popitem(last=False)
        if block.block_hash is not None:
            self._uncache(block)
            self._num_evictable -= 1
            self.num_evictions += 1
        block.ref_count = 1
        return block

    def _uncache(self, block: Block) -> None:
        del self._cached[block.block_hash]
        block.block_hash = None

    def lookup(self, block_hash: int) -> Block | None:
        return self._cached.get(block_hash)

    def acquire(self, block: Block) -> None:
        """Add a reference to a block that may be sitting in the free queue as a cached block."""
        if block.ref_count == 0:
            del self._free[block.block_id]
            if block.block_hash is not None:
                self._num_evictable -= 1
        block.ref_count += 1

    def release(self, block: Block) -> None:
        assert block.ref_count > 0, f"block {block.block_id} released too often"
        block.ref_count -= 1
        if block.ref_count == 0:
            self._free[block.block_id] = block
            if block.block_hash is not None:
                self._num_evictable += 1
            else:
                # It caches nothing: hand it out before any cached block, so reuse evicts less.
                self._free.move_to_end(block.block_id, last=False)

    def register(self, block: Block, block_hash: int) -> Block:
        """Record a freshly filled block under its hash. If another block already holds the same
        content, keep that one as the cache entry (the new one stays private and unhashed)."""
        existing = self._cached.get(block_hash)
        if existing is not None:
            return existing
        assert block.ref_count > 0 and block.block_hash is None, f"block {block.block_id} cannot be registered"
        block.block_hash = block_hash
        self._cached[block_hash] = block
        return block

    def drop_cached_free_blocks(self) -> None:
        """Forget every cached prefix no sequence holds (their blocks stay free)."""
        for b in list(self._free.values()):
            if b.block_hash is not None:
                self._uncache(b)
                self._num_evictable -= 1
                self._free.move_to_end(b.block_id, last=False)


@dataclass
class BlockTable:
    blocks: list[Block] = field(default_factory=list)
    num_hashed: int = 0
    """Leading blocks whose hash is known (full and computed); `last_hash` is the last of them."""
    last_hash: int | None = None
    num_slid_out: int = 0
    """Leading entries released because the sliding window passed them (all SLID_OUT)."""
    row: int = -1
    """Its row of BlockManager's table array (the block ids, 0-padded)."""

    def ids(self) -> list[int]:
        return [b.block_id for b in self.blocks]


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 sliding_window: int | None = None):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
        self.block_size = block_size
        self.sliding_window = sliding_window
        """Set when every layer slides: blocks behind the window are released (see the module docstring)."""
        self.pool = BlockPool(num_blocks)
        self.enable_prefix_caching = enable_prefix_caching
        self.tables: dict[int, BlockTable] = {}
        self._rows = np.zeros((64, 16), dtype=np.int32)
        """Row r: the block ids of the table holding row r (0 past its end); grown by doubling."""
        self._free_rows: list[int] = list(range(63, -1, -1))
        self.prefix_queries = 0
        self.prefix_hits = 0
        """Token counts over admitted sequences: tokens looked up in the prefix cache and tokens found
        there. Counted at allocation, so a sequence that waits several steps is counted once."""

    # --- queries ------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def num_evictable_blocks(self) -> int:
        return self.pool.num_evictable

    def block_ids(self, seq_id: int) -> list[int]:
        return self.tables[seq_id].ids()

    @property
    def rows(self) -> np.ndarray:
        """The table array itself: row `BlockTable.row` of a table holds its block ids, 0-padded (a live view:
        it changes as tables do, and is replaced when it grows)."""
        return self._rows

    def table_rows(self, seq_ids: list[int]) -> np.ndarray:
        """The block tables of `seq_ids`, one row each, 0-padded to a width that is a multiple of 16
        and at least the longest table's (a copy: later changes do not reach it)."""
        tables = self.tables
        return self._rows[[tables[i].row for i in seq_ids]]

    def _new_table(self, blocks: list[Block], num_hashed: int = 0, last_hash: int | None = None,
                   num_slid_out: int = 0) -> BlockTable:
        if not self._free_rows:
            n, width = self._rows.shape
            self._rows = np.concatenate([self._rows, np.zeros((n, width), dtype=np.int32)])
            self._free_rows = list(range(2 * n - 1, n - 1, -1))
        table = BlockTable(blocks, num_hashed, last_hash, num_slid_out, row=self._free_rows.pop())
        self._fit(len(blocks))
        self._rows[table.row, :len(blocks)] = [b.block_id for b in blocks]
        return table

    def _fit(self, num_blocks: int) -> None:
        """Widen the table array to hold `num_blocks` columns (a multiple of 16)."""
        n, width = self._rows.shape
        if num_blocks > width:
            wider = np.zeros((n, max(2 * width, -(-num_blocks // 16) * 16)), dtype=np.int32)
            wider[:, :width] = self._rows
            self._rows = wider

    def num_held_blocks(self, seq_id: int) -> int:
        """Table length in blocks (positions covered), slid-out entries included."""
        t = self.tables.get(seq_id)
        return len(t.blocks) if t else 0

    def num_used_blocks(self) -> int:
        """Distinct blocks referenced by any sequence (shared blocks count once)."""
        return self.pool.num_blocks - self.pool.num_free

    def _blocks_needed(self, seq: HasTokens, num_new_tokens: int) -> int:
        held = self.num_held_blocks(seq.seq_id)
        total = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size)
        return max(0, total - held)

    def _needs_copy_on_write(self, seq: HasTokens) -> bool:
        table = self.tables.get(seq.seq_id)
        if table is None or seq.num_computed_tokens % self.block_size == 0:
            return False
        idx = seq.num_computed_tokens // self.block_size
        return idx < len(table.blocks) and table.blocks[idx].ref_count > 1

    # --- prefix cache ---------------------------------------------------------------------------
    def find_cached_prefix(self, seq: HasTokens, namespace: object = None) -> list[Block]:
        """Longest run of cached full blocks matching the start of `seq`'s tokens.

        At least one token is always left to compute, since the last one's logits are needed."""
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        max_blocks = (len(seq.token_ids) - 1) // bs
        found: list[Block] = []
        h = None
        for i in range(max_blocks):
            h = chain_hash(h, tuple(seq.token_ids[i * bs:(i + 1) * bs]), namespace)
            block = self.pool.lookup(h)
            if block is None:
                break
            found.append(block)
        return found

    # --- allocation -----------------------------------------------------------------------------
    def can_allocate(self, seq: HasTokens, num_new_tokens: int, cached: list[Block] = ()) -> bool:
        # Cached blocks sitting in the free queue stop being free once this sequence takes them.
        reused_free = sum(1 for b in cached if b.ref_count == 0)
        need = -(-(len(cached) * self.block_size + num_new_tokens) // self.block_size) - len(cached)
        return need + reused_free <= self.pool.num_free

    def allocate(self, seq: HasTokens, num_new_tokens: int, cached: list[Block] = (),
                 namespace: object = None) -> None:
        """Give a new sequence its blocks: `cached` prefix blocks (shared) plus fresh ones for
        `num_new_tokens` tokens after them. Sets `seq.num_computed_tokens` past the cached prefix."""
        assert seq.seq_id not in self.tables
        for b in cached:
            self.pool.acquire(b)
        table = self._new_table(list(cached), len(cached), cached[-1].block_hash if cached else None)
        self.tables[seq.seq_id] = table
        seq.num_computed_tokens = len(cached) * self.block_size
        if self.enable_prefix_caching:
            self.prefix_queries += len(seq.token_ids)
            self.prefix_hits += seq.num_computed_tokens
        self._grow(table, seq.num_computed_tokens + num_new_tokens)

    def can_append(self, seq: HasTokens, num_new_tokens: int) -> bool:
        need = self._blocks_needed(seq, num_new_tokens) + int(self._needs_copy_on_write(seq))
        return need <= self.pool.num_free

    def try_append(self, seq: HasTokens, num_new_tokens: int) -> list[tuple[int, int]] | None:
        """`append` when the pool has room for it, else None (nothing changed): the scheduler's
        per-sequence check and append in one pass."""
        blocks = self.tables[seq.seq_id].blocks
        computed, bs = seq.num_computed_tokens, self.block_size
        need = -(-(computed + num_new_tokens) // bs) - len(blocks)
        # (_needs_copy_on_write, inlined: this runs for every running sequence every step.)
        idx = computed // bs
        cow = computed % bs != 0 and idx < len(blocks) and blocks[idx].ref_count > 1
        if need <= 0 and not cow:
            return []  # room already, and no shared partly filled block to copy on write
        if max(need, 0) + int(cow) > self.pool.num_free:
            return None
        return self.append(seq, num_new_tokens)

    def append(self, seq: HasTokens, num_new_tokens: int) -> list[tuple[int, int]]:
        """Make room for `num_new_tokens` more tokens of a running sequence.

        Returns (src, dst) block copies to run before the step: a partly filled block still shared
        with a forked sibling is copied so this sequence's writes stay its own."""
        table = self.tables[seq.seq_id]
        copies = []
        if self._needs_copy_on_write(seq):
            idx = seq.num_computed_tokens // self.block_size
            old = table.blocks[idx]
            new = self.pool.take()
            self.pool.release(old)
            table.blocks[idx] = new
            self._rows[table.row, idx] = new.block_id
            copies.append((old.block_id, new.block_id))
        self._grow(table, seq.num_computed_tokens + num_new_tokens)
        return copies

    def open_blocks(self, seqs: list, positions: list[int]) -> None:
        """`append(seq, 1)` for each of `seqs`, a running sequence whose next token, at `positions[i]`, is the first
        of a block its table does not hold yet (nothing to copy on write: the new block is its own). The
        caller has checked that the pool holds a block for each (Scheduler._schedule_steady)."""
        bs, tables, take = self.block_size, self.tables, self.pool.take
        self._fit(max(positions) // bs + 1)
        rows = self._rows
        for seq, pos in zip(seqs, positions):
            table = tables[seq.seq_id]
            blocks = table.blocks
            if len(blocks) * bs > pos:  # (held already)
                continue
            b = take()
            rows[table.row, len(blocks)] = b.block_id
            blocks.append(b)

    def _grow(self, table: BlockTable, num_tokens: int) -> None:
        blocks = table.blocks
        if len(blocks) * self.block_size >= num_tokens:
            return
        self._fit(-(-num_tokens // self.block_size))
        row = self._rows[table.row]
        while len(blocks) * self.block_size < num_tokens:
            b = self.pool.take()
            row[len(blocks)] = b.block_id
            blocks.append(b)

    def fork(self, parent: HasTokens, child: HasTokens) -> None:
        """The child shares every block of the parent (copy-on-write happens at the next append)."""
        src = self.tables[parent.seq_id]
        for b in src.blocks:
            if b is not SLID_OUT:
                self.pool.acquire(b)
        self.tables[child.seq_id] = self._new_table(list(src.blocks), src.num_hashed, src.last_hash, src.num_slid_out)

    def mark_computed(self, seq: HasTokens, namespace: object = None) -> None:
        """Register the sequence's newly completed full blocks in the prefix cache; then, with a sliding
        window, release the blocks it has slid past."""
        self._register_full_blocks(seq, namespace)
        if self.sliding_window is not None:
            self._release_slid_out(seq)

    def _release_slid_out(self, seq: HasTokens) -> None:
        # Every later query sits at a position >= num_computed_tokens and sees keys from
        # num_computed_tokens - window + 1 on: the blocks wholly before that are never read again.
        table = self.tables[seq.seq_id]
        first_needed = max(0, seq.num_computed_tokens - self.sliding_window + 1) // self.block_size
        while table.num_slid_out < first_needed:
            i = table.num_slid_out
            self.pool.release(table.blocks[i])
            table.blocks[i] = SLID_OUT
            self._rows[table.row, i] = SLID_OUT.block_id
            table.num_slid_out += 1

    def _register_full_blocks(self, seq: HasTokens, namespace: object) -> None:
        if not self.enable_prefix_caching:
            return
        table = self.tables[seq.seq_id]
        bs = self.block_size
        full = seq.num_computed_tokens // bs
        while table.num_hashed < full:
            i = table.num_hashed
            h = chain_hash(table.last_hash, tuple(seq.token_ids[i * bs:(i + 1) * bs]), namespace)
            block = table.blocks[i]
            if block.block_hash is None:
                self.pool.register(block, h)
            table.last_hash = h
            table.num_hashed += 1

    def free(self, seq: HasTokens) -> None:
        """Drop the sequence's references. Later blocks are released first so that, in the free
        queue, a prefix's tail is evicted before its head (the head is the most reusable part)."""
        table = self.tables.pop(seq.seq_id, None)
        if table is None:
            return
        self._rows[table.row] = 0
        self._free_rows.append(table.row)
        for b in reversed(table.blocks):
            if b is not SLID_OUT:
                self.pool.release(b)

    def reset_prefix_cache(self) -> None:
        self.pool.drop_cached_free_blocks()

    # --- checks -----------------------------------------------------------------------------------
    def check_invariants(self) -> None:
        refs = {b.block_id: 0 for b in self.pool.blocks}
        for t in self.tables.values():
            assert all(b is SLID_OUT for b in t.blocks[:t.num_slid_out]), "slid-out entries must lead the table"
            for b in t.blocks[t.num_slid_out:]:
                refs[b.block_id] += 1
        for b in self.pool.blocks:
            assert b.ref_count == refs[b.block_id], f"block {b.block_id}: ref {b.ref_count} != {refs[b.block_id]}"
            assert (b.ref_count == 0) == (b.block_id in self.pool._free), f"block {b.block_id}: free-queue mismatch"
            if b.block_hash is not None:
                assert self.pool._cached.get(b.block_hash) is b, f"block {b.block_id}: stale hash"
        for t in self.tables.values():
            row = self._rows[t.row]
            assert row[:len(t.blocks)].tolist() == t.ids() and not row[len(t.blocks):].any(), "stale table row"
        assert len({t.row for t in self.tables.values()}) == len(self.tables), "a table row shared"
        assert len(self.pool._cached) == sum(1 for b in self.pool.blocks if b.block_hash is not None)
        assert self.pool._num_evictable == sum(1 for b in self.pool._free.values() if b.block_hash is not None)
        # Eviction order: blocks caching nothing come before every cached one.
        hashed = [b.block_hash is not None for b in self.pool._free.values()]
        assert hashed == sorted(hashed), "free queue: an uncached block sits behind a cached one"
