"""CUDA graphs of whole engine steps: decode steps by batch-size bucket, mixed steps (prefill chunks and
decodes together) by token-count bucket; their static device buffers, capture and replay.

A graph replays the launches it recorded with the shapes and host-side integers it was captured with;
only device memory changes between replays. So each bucket owns static, max-sized input buffers, a step
is copied into the first rows, and the rest is padding that the kernels must skip:

- padding tokens have slot -1 (reshape_and_cache writes nothing) and their attention rows come out zero;
- decode buckets pad sequences with length 1 (the decode kernel reads one cached token and nothing is
  kept); mixed buckets pad sequences with zero new tokens (query_start_loc repeats the step's token
  count), so the prefill kernel's programs for them exit at once, and its grid (tokens // BLOCK_Q +
  sequences) covers any step up to the bucket.

Row-wise layers (norms, projections, rotary, MLP, MoE) never mix rows, so padding cannot reach a real
token. The graphs end with the final norm (row-wise too, and one kernel launch less per step on the host);
the LM head runs eagerly on the rows the step needs (one per sampling sequence, or every position of a
prompt-logprobs chunk), so its cost follows the step rather than the bucket, its output is the step's own
tensor (nothing to clone before the next replay), and no graph keeps a [bucket, vocab] float32 logits
buffer alive.

Why whole-step graphs rather than piecewise ones (docs/engine.md, "CUDA graphs"): the attention
kernels already read everything per-step from device tensors with grids fixed by shapes, so one
graph per bucket needs nothing from the model files; piecewise graphs would split every architecture's
forward around its attention call.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable

import torch

from kernels.paged_prefill import make_chunk_list
from services.engine.attention.metadata import AttentionMetadata

log = logging.getLogger("folio.engine")

DECODE_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, *range(320, 1025, 64))
"""Batch sizes of decode-step graphs, up to max_num_seqs (added if it is not one of these): above 256 a padded
step computes at most 1/5 more rows than it has (at 1,024 sequences the ramp-down of a workload's last requests
would otherwise replay the largest bucket for every batch above 512)."""
MIXED_BUCKETS = (*range(16, 1024, 16), *range(1024, 2048, 32), *range(2048, 4096, 128), *range(4096, 8193, 512))
"""Token counts of mixed-step graphs, up to EngineConfig.max_mixed_graph_tokens (which is added if it is
not one of these). A padded step's matmuls cost in proportion to its padded tokens, so from 256 to 4,096
tokens, where steady serving's mixed steps fall (the chat workload's: ~600, ~250 decodes beside a new prompt
or two), a step computes at most 1/16 more tokens than it has (buckets every 16 tokens up to 1,024, 32 up to
2,048, 128 up to 4,096), and at most 1/8 more above. Buckets every 32 and 64 tokens between 256 and 1,024
had padded the chat's mixed steps by 4.7% on average (bench/results/history_performance.md, "The 8B chat workload"). The
graphs share one output buffer and one memory pool, so a bucket costs capture time (~tens of ms) and its
graph's own nodes, not activation memory."""

WARM_REPLAY = os.environ.get("FOLIO_WARM_GRAPHS", "1") != "0"
"""Replay each captured graph once at capture (StepGraphs._capture); FOLIO_WARM_GRAPHS=0 (read at import)
leaves each graph's first launch to the first step that uses it, for comparisons."""

Recorder = Callable[[Callable[[], torch.Tensor], object], tuple[object, torch.Tensor, object]]
"""record(fn, pool) -> (graph with .replay(), fn's output as captured, pool for the next capture)."""


def cuda_recorder(fn: Callable[[], torch.Tensor], pool) -> tuple[object, torch.Tensor, object]:
    """Record fn into a CUDA graph sharing `pool` with the graphs captured before it."""
    fn()  # warm up: compile kernels for these shapes, settle the allocator
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, pool=pool):
        out = fn()
    return g, out, g.pool()


def buckets_up_to(candidates: tuple[int, ...], limit: int) -> list[int]:
    out = [b for b in candidates if b <= limit]
    if limit > 0 and (not out or out[-1] < limit):
        out.append(limit)
    return out


class StepGraphs:
    """The engine's graphs over one model and KV pool. `run(inputs)` replays a graph for the step if a
    bucket fits it and returns the logits, else None (the caller runs the step eagerly)."""

    def __init__(self, model, kv_caches: list[torch.Tensor], device: torch.device, max_model_len: int,
                 block_size: int, record: Recorder = cuda_recorder):
        self.model, self.kv_caches, self.device = model, kv_caches, device
        self.max_model_len = max_model_len
        self.max_blocks = -(-max_model_len // block_size // 16) * 16 + 16  # >= any step's padded table width
        self.record = record
        self.pool = None
        self.decode: dict[int, tuple[object, torch.Tensor]] = {}
        """batch size -> (graph, normed hidden states [batch, hidden]: a view of one buffer all of them share)"""
        self.mixed: dict[int, tuple[object, torch.Tensor]] = {}
        """token count -> (graph, hidden states [tokens, hidden]: likewise)"""
        self.max_seqs: dict[int, int] = {}
        """token count -> sequences its mixed graph holds"""
        self.captures: dict[str, dict] = {}
        """"decode" / "mixed" -> {"buckets", "seconds", "mib"}: what capture took (logged, and read by benches)."""
        self.decode_capacity = 0
        """Rows of the decode graphs' packed inputs: the largest bucket rounded up to 4 (0: none captured)."""
        self._dec: dict[str, torch.Tensor] = {}
        self._mix: dict[str, torch.Tensor] = {}
        """The decode and mixed graphs' static inputs (see _buffers); each graph reads a prefix of them."""

    # --- capture -------------------------------------------------------------------------------------
    def _buffers(self, tokens: int, seqs: int) -> dict[str, torch.Tensor]:
        dev = self.device
        return {
            "ids": torch.zeros(tokens, dtype=torch.long, device=dev),
            "pos": torch.zeros(tokens, dtype=torch.long, device=dev),
            "slots": torch.full((tokens,), -1, dtype=torch.int64, device=dev),
            "tables": torch.zeros((seqs, self.max_blocks), dtype=torch.int32, device=dev),
            "seq_lens": torch.ones(seqs, dtype=torch.int32, device=dev),
            "qsl": torch.arange(seqs + 1, dtype=torch.int32, device=dev),
            "chunks": torch.zeros((2, seqs + 1), dtype=torch.int32, device=dev),  # no chunks listed
        }

    def capture_decode(self, max_batch: int) -> None:
        """One graph per batch bucket up to max_batch, attention launched for the longest context. The
        positions, slots and context lengths live in one int32 buffer laid out as DecodeInputs lays out
        its own (`packed`, services/engine/decode_inputs.py), so a replay fills them with one copy."""
        buckets = buckets_up_to(DECODE_BUCKETS, max_batch)
        if buckets:
            st = self._dec = self._buffers(buckets[-1], buckets[-1])
            c = self.decode_capacity = -(-buckets[-1] // 4) * 4
            packed = st["packed"] = torch.empty(5 * c, dtype=torch.int32, device=self.device)
            st["pos"], st["slots"], st["seq_lens"] = packed_views(packed, c)
            st["pos"].zero_(), st["slots"].fill_(-1), st["seq_lens"].fill_(1)
            self._capture("decode", self.decode, buckets, self._decode_meta)

    def capture_mixed(self, max_tokens: int, max_seqs: int) -> None:
        """One graph per token bucket up to max_tokens; bucket T holds up to min(T, max_seqs) sequences
        (a sequence brings at least one token). Attention is the prefill/extend kernel throughout."""
        buckets = buckets_up_to(MIXED_BUCKETS, max_tokens)
        if buckets:
            self.max_seqs = {t: min(t, max_seqs) for t in buckets}
            self._mix = self._buffers(buckets[-1], self.max_seqs[buckets[-1]])
            self._mix["qsl"].zero_()
            self._capture("mixed", self.mixed, buckets, lambda t: self._mixed_meta(t, self.max_seqs[t]))

    def _capture(self, kind: str, graphs: dict, buckets: list[int], meta_of) -> None:
        """Record each bucket's forward pass, largest first (the smaller ones reuse its pool). Every graph
        of a kind copies its hidden states into one buffer, so what a capture allocates is freed when it
        ends and the next capture reuses it."""
        st = self._dec if kind == "decode" else self._mix
        t0, mem0 = time.perf_counter(), self._mem_free()
        top = buckets[-1]
        model = self.model
        # The buffers may hold more rows than the largest bucket (the decode graphs' packed inputs round
        # their capacity up to 4): run the model on that bucket's rows only.
        st["hidden"] = torch.empty_like(model.final_norm(model.forward(st["ids"][:top], st["pos"][:top],
                                                                        self.kv_caches, meta_of(top))))
        for n in reversed(buckets):
            def run(n=n, meta=meta_of(n)):
                out = st["hidden"][:n]
                out.copy_(model.final_norm(model.forward(st["ids"][:n], st["pos"][:n], self.kv_caches, meta)))
                return out

            g, out, self.pool = self.record(run, self.pool)
            graphs[n] = (g, out)
        if self.device.type == "cuda" and WARM_REPLAY:
            # A graph's first launch after instantiation costs the host milliseconds (the executable graph is
            # uploaded to the device then): pay it here, once per bucket, not in the first served step that
            # lands in each bucket. The buffers hold padding (no slots, no new tokens): nothing is written
            # to the KV pool.
            for n in buckets:
                graphs[n][0].replay()
        self._log(kind, buckets, t0, mem0)

    def _decode_meta(self, b: int) -> AttentionMetadata:
        st = self._dec
        return AttentionMetadata(
            num_seqs=b, num_tokens=b, query_start_loc=st["qsl"][:b + 1], seq_lens=st["seq_lens"][:b],
            block_tables=st["tables"][:b], slot_mapping=st["slots"][:b], max_query_len=1,
            max_seq_len=self.max_model_len, query_lens_cpu=[1] * b, seq_lens_cpu=[self.max_model_len] * b,
            captured=True)

    def _mixed_meta(self, t: int, s: int) -> AttentionMetadata:
        st = self._mix
        return AttentionMetadata(
            num_seqs=s, num_tokens=t, query_start_loc=st["qsl"][:s + 1], seq_lens=st["seq_lens"][:s],
            block_tables=st["tables"][:s], slot_mapping=st["slots"][:t], max_query_len=t,
            max_seq_len=self.max_model_len, query_lens_cpu=[t] + [0] * (s - 1),
            seq_lens_cpu=[self.max_model_len] * s, chunk_list=st["chunks"][:, :s + 1], captured=True)

    def _mem_free(self) -> int:
        return torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else 0

    def _log(self, kind: str, buckets: list[int], t0: float, mem0: int) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        stats = self.captures[kind] = {"buckets": buckets, "seconds": time.perf_counter() - t0,
                                       "mib": (mem0 - self._mem_free()) / 2**20}
        log.info("captured %d %s CUDA graphs (%s %d..%d) in %.2f s, %.0f MiB of device memory", len(buckets), kind,
                 "batch sizes" if kind == "decode" else "token counts", buckets[0], buckets[-1], stats["seconds"],
                 stats["mib"])

    # --- replay --------------------------------------------------------------------------------------
    def run(self, inputs) -> torch.Tensor | None:
        meta = inputs.meta
        if meta.is_decode_only:
            b = _smallest(self.decode, meta.num_seqs)
            return None if b is None else self._replay_decode(inputs, b)
        t = _smallest(self.mixed, meta.num_tokens)
        if t is None or meta.num_seqs > self.max_seqs[t]:  # (more sequences than max_num_seqs: never, but eager)
            return None
        return self._replay_mixed(inputs, t)

    def _replay_decode(self, inputs, b: int) -> torch.Tensor:
        meta, st = inputs.meta, self._dec
        n = meta.num_seqs
        st["ids"][:n].copy_(inputs.input_ids)
        if inputs.packed is not None and inputs.packed.shape == st["packed"].shape:  # padding included
            st["packed"].copy_(inputs.packed)
        else:
            st["pos"][:n].copy_(inputs.positions)
            st["slots"][:n].copy_(meta.slot_mapping)
            st["slots"][n:b].fill_(-1)
            st["seq_lens"][:n].copy_(meta.seq_lens)
            st["seq_lens"][n:b].fill_(1)
        st["tables"][:n, :meta.block_tables.shape[1]].copy_(meta.block_tables)
        g, hidden = self.decode[b]
        g.replay()
        # The LM head's output is a new tensor, not the graph's (a slice of its rows for a plain decode step).
        return self.model.head(hidden[:n] if inputs.all_rows else hidden[inputs.logit_rows], float32=False)

    def _replay_mixed(self, inputs, t: int) -> torch.Tensor:
        meta, st = inputs.meta, self._mix
        n, s = meta.num_tokens, meta.num_seqs
        st["ids"][:n].copy_(inputs.input_ids)
        st["pos"][:n].copy_(inputs.positions)
        st["slots"][:n].copy_(meta.slot_mapping)
        st["slots"][n:t].fill_(-1)
        st["qsl"][:s + 1].copy_(meta.query_start_loc)
        st["qsl"][s + 1:self.max_seqs[t] + 1].fill_(n)  # padding sequences: no new tokens
        st["seq_lens"][:s].copy_(meta.seq_lens)
        st["tables"][:s, :meta.block_tables.shape[1]].copy_(meta.block_tables)
        chunks = meta.chunk_list
        if chunks is None:  # a step built without its list (the model runner's always have one)
            chunks = torch.from_numpy(make_chunk_list(meta.query_lens_cpu)).to(self.device)
        st["chunks"][:, :s + 1].copy_(chunks)
        g, hidden = self.mixed[t]
        g.replay()
        return self.model.head(hidden[inputs.logit_rows], float32=False)  # a gather: not the graph's buffer


def packed_views(packed: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(positions int64, slots int64, context lengths int32), each `capacity` long, in an int32 buffer of
    5 * capacity words (capacity a multiple of 4 keeps every field on a 16-byte boundary)."""
    c = capacity
    return packed[:2 * c].view(torch.int64), packed[2 * c:4 * c].view(torch.int64), packed[4 * c:5 * c]


def _smallest(graphs: dict[int, object], n: int) -> int | None:
    return min((k for k in graphs if k >= n), default=None)
