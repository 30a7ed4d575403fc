"""A decode step's inputs, written from its DecodeBatch into a persistent pinned buffer and sent in one copy.

A step of plain decodes (services/engine/input_batch.py) needs, per row: the input token, its position,
its KV slot, the context length, and the block table. They are written by numpy straight into one of two
persistent pinned int32 buffers, laid out back to back (int64 fields as pairs of words), then
copied to one persistent device buffer with a single non-blocking copy; the step's tensors are views of
it. Two host buffers take turns, and a buffer is written again only once its last copy has been made
(an event per buffer): under asynchronous scheduling the host writes step N+1's inputs while step N's
copy may still wait in the stream behind step N-1. The device buffer needs no second copy: the stream
runs step N+1's copy after step N's kernels have read it.
"""

from __future__ import annotations

import numpy as np
import torch


class DecodeInputs:
    def __init__(self, device: torch.device):
        self.device = device
        self._cuda = device.type == "cuda"
        self._host: list[torch.Tensor | None] = [None, None]
        self._copied: list[torch.cuda.Event | None] = [None, None]
        """The event recorded after each host buffer's last copy (CUDA only)."""
        self._turn = 0
        self._dev: torch.Tensor | None = None
        self._arange = torch.zeros(0, dtype=torch.int64, device=device)
        """0..n-1 on the device (logits rows), and as int32 the decode query starts 0..n."""
        self._arange32 = torch.zeros(0, dtype=torch.int32, device=device)

    def write(self, batch, rows: np.ndarray, block_size: int, tokens: torch.Tensor | None, capacity: int = 0):
        """(input ids, positions, slot mapping, seq lens, block tables, query starts, logits rows, packed) on
        the device for `batch`, with `rows` the block manager's table array; `tokens` [n] on the device, when
        given, are the input ids as they are (the tokens the step before sampled for these very rows);
        and the longest context, for the attention metadata. `capacity` (a multiple of 4, >= n; 0: none):
        positions, slots and lengths are laid out for that many rows, padding included (slot -1, length 1),
        and `packed` is that region whole, as the decode graphs hold theirs (cuda_graphs.packed_views); else
        `packed` is None."""
        n, pos, bs = len(batch.seqs), batch.positions, block_size
        max_seq_len = int(pos.max()) + 1
        width = -(-(-(-max_seq_len // bs)) // 16) * 16  # a steady row stride for the kernels
        # Each field starts on a 16-byte boundary (4 words), as Triton assumes of the pointers it compiles for.
        n4 = capacity if capacity >= n else -(-n // 4) * 4
        o_slots, o_lens, o_tab = 2 * n4, 4 * n4, 5 * n4
        o_ids = o_tab + n * width
        size = o_ids + (2 * n if tokens is None else 0)
        buf = self._host_buffer(size)
        h = buf.numpy()
        h[0:2 * n].view(np.int64)[:] = pos
        np.add(pos, 1, out=h[o_lens:o_lens + n], casting="unsafe")
        if n4 == capacity:  # the graphs' padding rows: no slot, one token of context
            h[2 * n:2 * n4] = 0
            h[o_slots:o_slots + 2 * n4].view(np.int64)[n:] = -1
            h[o_lens + n:o_tab] = 1
        tables = h[o_tab:o_ids].reshape(n, width)
        np.take(rows[:, :width], batch.table_rows, axis=0, out=tables, mode="clip")
        slots = h[o_slots:o_slots + 2 * n].view(np.int64)
        slots[:] = tables[np.arange(n), pos // bs]  # slot = block_table[pos // bs] * bs + pos % bs
        slots *= bs
        slots += pos % bs
        if tokens is None:
            h[o_ids:size].view(np.int64)[:] = [s.token_ids[-1] for s in batch.seqs]  # (placeholders, if async)
        dev = self._device_buffer(size)
        dev[:size].copy_(buf[:size], non_blocking=True)
        if self._cuda:
            ev = self._copied[self._turn]
            if ev is None:
                ev = self._copied[self._turn] = torch.cuda.Event()
            ev.record()
        if self._arange.numel() < n + 1:
            self._arange = torch.arange(2 * n + 2, dtype=torch.int64, device=self.device)
            self._arange32 = self._arange.to(torch.int32)
        ids = dev[o_ids:size].view(torch.int64) if tokens is None else tokens
        return (ids, dev[0:2 * n].view(torch.int64), dev[o_slots:o_slots + 2 * n].view(torch.int64),
                dev[o_lens:o_lens + n], dev[o_tab:o_ids].view(n, width), self._arange32[:n + 1], self._arange[:n],
                max_seq_len, dev[:o_tab] if n4 == capacity else None)

    def _host_buffer(self, size: int) -> torch.Tensor:
        """The next host buffer in turn, at least `size` int32 long, once its last copy has been made."""
        i = self._turn = self._turn ^ 1
        buf = self._host[i]
        if buf is None or buf.numel() < size:
            buf = self._host[i] = torch.empty(size + size // 2, dtype=torch.int32, pin_memory=self._cuda)
        elif self._copied[i] is not None:
            self._copied[i].synchronize()
        return buf

    def _device_buffer(self, size: int) -> torch.Tensor:
        if self._dev is None or self._dev.numel() < size:
            self._dev = torch.empty(size + size // 2, dtype=torch.int32, device=self.device)
        return self._dev
