"""Owns the weights and the paged KV pool on one device; turns a scheduled step into logits."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from kernels.paged_prefill import make_chunk_list
from kernels.paged_prefill_configs import forced_config, table_configs
from services.engine.attention import get_attention_backend
from services.engine.attention.kv_quant import FP8_KV_DTYPE, fp8_zeros, resolve_kv_cache_dtype
from services.engine.attention.metadata import AttentionMetadata
from services.engine.cuda_graphs import Recorder, StepGraphs, cuda_recorder
from services.engine.decode_inputs import DecodeInputs
from services.engine.model.config import ModelConfig
from services.engine.model.layers import dense_dispatch
from services.engine.model.loader import iter_checkpoint
from services.engine.model.registry import build_model
from services.engine.scheduler import SchedulerOutput

log = logging.getLogger("folio.engine")


@dataclass
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    logit_rows: torch.Tensor
    """Flat token indices whose logits are needed, in the order of the scheduler's logits rows
    (ScheduledSeq.prompt_logprob_rows / sample_row)."""
    all_rows: bool = False
    """`logit_rows` is 0..n-1 for the step's n tokens: the rows are taken as a slice, not gathered."""
    packed: torch.Tensor | None = None
    """A decode step's positions, slots and lengths as the decode graphs lay them out, padding included
    (DecodeInputs.write): a replay copies them at once. None: field by field."""


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim * elem


class ModelRunner:
    def __init__(self, model_dir, hf_config: dict, dtype: torch.dtype, device: torch.device,
                 attention_backend: str, block_size: int, load_format: str = "safetensors", tp=None,
                 kv_cache_dtype: str = "auto", quantization: str | None = None):
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.kv_dtype = resolve_kv_cache_dtype(kv_cache_dtype, dtype, device, attention_backend)
        """The KV pool's storage dtype: the model's, or float8 e4m3 (attention/kv_quant.py)."""
        self.backend = get_attention_backend(attention_backend)
        # tp: parallel.TPGroup or None. The registry picks the architecture's class (model/registry.py).
        self.model = build_model(hf_config, self.backend, dtype, device, tp, source=f"{model_dir}/config.json",
                                 quantization=quantization)
        self.cfg = self.model.cfg
        if load_format == "dummy":
            self.model.init_dummy()
            self.model.process_weights()
        else:
            self.model.load_weights(iter_checkpoint(model_dir))
        if self.kv_dtype == FP8_KV_DTYPE:
            if self.model.apply_kv_scales() == 0:
                log.warning("kv_cache_dtype fp8: the checkpoint has no k/v scales; using 1.0 (keys and values "
                            "beyond +-448 are clamped)")
        self.kv_caches: list[torch.Tensor] = []
        self.graphs: StepGraphs | None = None
        """Captured decode and mixed-step graphs (capture_*_graphs); None: every step runs eagerly."""
        self._pinned = device.type == "cuda"
        self._decode_inputs = DecodeInputs(device)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        c = self.cfg
        shape = (2, num_blocks, self.block_size, self.model.num_kv_heads, c.head_dim)  # this rank's KV heads
        if self.kv_dtype == FP8_KV_DTYPE:
            self.kv_caches = [fp8_zeros(shape, self.device) for _ in range(c.num_hidden_layers)]
        else:
            self.kv_caches = [torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
                              for _ in range(c.num_hidden_layers)]

    def weight_bytes(self) -> int:
        return self.model.weight_bytes()

    # --- one step ------------------------------------------------------------------------------
    def prepare(self, out: SchedulerOutput, blocks, tokens: torch.Tensor | None = None) -> StepInputs:
        """The step's inputs, the block tables read from `blocks` (the BlockManager). A step of plain decodes
        comes from its DecodeBatch (`_prepare_decodes`), its input ids being `tokens` [n] on the device
        when given. Otherwise the host work is one pass over the scheduled sequences for their token ids;
        the rest is array arithmetic."""
        if out.plain_decode and out.batch is not None:
            return self._prepare_decodes(out.batch, blocks.rows, tokens)
        block_tables = blocks.table_rows([seq.seq_id for seq in out.seqs])
        bs = self.block_size
        n_seqs = len(out.scheduled)
        ids: list[int] = []
        starts = np.empty(n_seqs, dtype=np.int64)
        q_lens: list[int] = []
        want_rows = []  # (sequence, its number of logits rows) in order, when some chunk logs its prompt
        for i, s in enumerate(out.scheduled):
            seq, n = s.seq, s.num_new_tokens
            start = starts[i] = seq.num_computed_tokens
            if n == 1:
                ids.append(seq.token_ids[start])
            else:
                ids += seq.token_ids[start:start + n]
            q_lens.append(n)
            if s.prompt_logprob_rows:
                want_rows.append((i, n))
        q = np.asarray(q_lens, dtype=np.int64)
        qsl = np.zeros(n_seqs + 1, dtype=np.int32)
        np.cumsum(q, out=qsl[1:])
        s_lens = starts + q
        n_tok = int(qsl[-1])
        if n_tok == n_seqs:  # decode only: one token per sequence
            pos = starts
            seq_of_tok = np.arange(n_seqs)
        else:
            seq_of_tok = np.repeat(np.arange(n_seqs), q)
            pos = starts[seq_of_tok] + (np.arange(n_tok) - qsl[:-1].astype(np.int64)[seq_of_tok])
        max_blocks = -(-int(-(-int(s_lens.max()) // bs)) // 16) * 16  # a steady row stride for the kernels
        tables = np.ascontiguousarray(block_tables[:, :max_blocks])
        # slot = block_table[pos // bs] * bs + pos % bs, for each new token of each sequence
        slots = tables[seq_of_tok, pos // bs].astype(np.int64) * bs + pos % bs
        # The logits rows the scheduler assigned (ScheduledSeq): every position of a prompt-logprobs
        # chunk, else the last token of a sequence this step catches up.
        if not want_rows:
            rows = np.asarray([qsl[i + 1] - 1 for i, s in enumerate(out.scheduled) if s.sample_row is not None],
                              dtype=np.int64) if n_tok != n_seqs or out.num_logit_rows != n_seqs else np.arange(n_seqs)
        else:
            logged = dict(want_rows)
            rows = []
            for i, s in enumerate(out.scheduled):
                if i in logged:
                    rows += range(qsl[i], qsl[i + 1])
                elif s.sample_row is not None:
                    rows.append(qsl[i + 1] - 1)
            rows = np.asarray(rows, dtype=np.int64)
        s_lens_list = s_lens.tolist()
        put = self._to_device
        meta = AttentionMetadata(
            num_seqs=n_seqs, num_tokens=n_tok,
            query_start_loc=put(qsl), seq_lens=put(s_lens.astype(np.int32)),
            block_tables=put(tables), slot_mapping=put(slots),
            max_query_len=max(q_lens), max_seq_len=max(s_lens_list), query_lens_cpu=q_lens, seq_lens_cpu=s_lens_list,
            chunk_list=put(make_chunk_list(q)) if n_tok != n_seqs else None,
        )
        return StepInputs(put(np.asarray(ids, dtype=np.int64)), put(pos.astype(np.int64)), meta, put(rows))

    def _prepare_decodes(self, batch, rows: np.ndarray, tokens: torch.Tensor | None) -> StepInputs:
        """prepare() for a step of plain decodes: one token per sequence at its computed length, row i
        sampling token i, written from the batch's arrays and sent in one copy (services/engine/decode_inputs.py)."""
        graphs = self.graphs
        ids, pos, slots, seq_lens, tables, qsl, rows_dev, max_seq_len, packed = self._decode_inputs.write(
            batch, rows, self.block_size, tokens, graphs.decode_capacity if graphs is not None else 0)
        n = len(batch.seqs)
        meta = AttentionMetadata(
            num_seqs=n, num_tokens=n, query_start_loc=qsl, seq_lens=seq_lens, block_tables=tables,
            slot_mapping=slots, max_query_len=1, max_seq_len=max_seq_len, query_lens_cpu=[1] * n,
            seq_lens_cpu=(batch.positions + 1).tolist())
        return StepInputs(ids, pos, meta, rows_dev, all_rows=True, packed=packed)

    def _to_device(self, a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(a)
        if self._pinned:
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    @torch.inference_mode()
    def execute(self, inputs: StepInputs) -> torch.Tensor:
        """Logits [len(logit_rows), vocab] in the model's dtype (Sampler.sample upcasts them where it needs
        float32; its one-pass greedy path reads them as they are)."""
        if self.graphs is not None:
            logits = self.graphs.run(inputs)
            if logits is not None:
                return logits
        hidden = self.model.forward(inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta)
        return self.model.logits(hidden if inputs.all_rows else hidden[inputs.logit_rows], float32=False)

    # --- warm-up and CUDA graphs ------------------------------------------------------------------
    WARMUP_STEPS = (
        ((33, 33), (7, 40), (1, 70)),  # a prefill chunk, an extend after cached tokens, a decode
        ((33, 33),),                   # fresh prompts only: the prefill kernel without its block-table path,
        ((32, 32), (16, 16)),          # one sequence and several, odd and 16-divisible token counts
    )
    """(new tokens, context incl. them) per sequence of each warm-up step. Triton compiles a kernel per
    specialization (has_prefix; an integer argument equal to 1 or divisible by 16; the prefill kernel's
    own build for 32 sequences or more), and a compile inside the first requests' steps costs them
    seconds (bench/throughput.py times from the first step). `warmup` adds, for fresh prompts and for
    chunks after cached tokens, steps of 1, 2, 16, 33 and 48 sequences, and one step of the largest size."""
    WARMUP_SEQ_COUNTS = (1, 2, 16, 33, 48)

    @classmethod
    def warmup_steps(cls, max_model_len: int, max_num_seqs: int, max_num_batched_tokens: int) -> list:
        """Every warm-up step as [(new tokens, context incl. them)] per sequence, fitted to the limits."""
        steps = [list(lens) for lens in cls.WARMUP_STEPS]
        for n in cls.WARMUP_SEQ_COUNTS:
            if n <= min(max_num_seqs, max_num_batched_tokens):
                steps.append([(1, 1)] * n)  # fresh one-token prompts
                steps.append([(1, 2)] * n)  # one new token after a cached one
        # The largest step the scheduler can make: its activations' memory is taken from the device once,
        # here, rather than inside the first big prefill, and its kernels compile on a long chunk.
        seqs = max(1, min(max_num_seqs, 32, max_num_batched_tokens))
        each = min(max_num_batched_tokens // seqs, max_model_len)
        steps.append([(each, each)] * seqs)
        fitted = []
        for lens in steps:
            ctxs = [min(ctx, max_model_len) for _, ctx in lens]  # a short max_model_len shortens each step
            fitted.append([(min(n, c), c) for (n, _), c in zip(lens, ctxs)])
        return fitted

    @torch.inference_mode()
    def warmup(self, max_model_len: int, max_num_seqs: int = 1, max_num_batched_tokens: int = 70) -> None:
        """Run the warm-up steps on scratch blocks so every kernel specialization a step can need is
        compiled before the first request, not during it. The blocks' contents are garbage afterwards,
        which is harmless: a sequence writes every slot it reads. A step needing more blocks than the
        pool holds is skipped. The prefill kernel picks its config per launch from a table
        (kernels/paged_prefill_configs.py): the steps that reach it (some sequence brings more than one
        token) run again under each other config the table can pick for this model, so every one is
        compiled here."""
        steps = self.warmup_steps(max_model_len, max_num_seqs, max_num_batched_tokens)
        for i, cfg in enumerate(self._prefill_configs()):
            with forced_config(cfg):
                for lens in steps:
                    if i == 0 or max(n for n, _ in lens) > 1:
                        self._warm_step(lens)
        dense_dispatch.warmup(self.device, self.dtype)  # the LM head's GEMM builds for any row count
        if self.device.type == "cuda":
            self._warm_lm_head(min(max_num_seqs, max_num_batched_tokens))
            torch.cuda.synchronize(self.device)

    def _warm_lm_head(self, rows: int) -> None:
        """Run the LM head once at every row count from `rows` down to 1. It runs eagerly on each step's own
        rows (one per sampling sequence), and cuBLAS picks its kernel by the row count: the first launch of
        a kernel not used before in the process loads it, and that waited for the device to drain (H200, 1B
        shape: a steady step's host launch took 0.2 ms, a step whose row count was new 2.5-3 ms, one or two
        steps' device time, and the device then idled waiting for the rest of the launch: at least 11 steps
        of the 1,024-request run's first pass). ~0.4 s at 1,024 rows on the 1B shape. Largest first: the first logits
        allocation is the largest a step makes (the KV pool's sizing set it aside), and every later one is
        carved from that block of torch's caching allocator instead of a new cudaMalloc."""
        h = torch.zeros(rows, self.cfg.hidden_size, dtype=self.dtype, device=self.device)
        for m in range(rows, 0, -1):
            self.model.head(h[:m], float32=False)

    def _prefill_configs(self) -> list[dict | None]:
        """The prefill kernel's configs the dispatch table can pick for this model; [None] (the backend's own
        choice, once) for a backend without it."""
        if self.backend.name != "triton":
            return [None]
        c = self.cfg
        return table_configs(c.head_dim, c.num_attention_heads // c.num_key_value_heads, self.dtype)

    def _warm_step(self, lens: list[tuple[int, int]]) -> None:
        bs = self.block_size
        blocks_per = [-(-ctx // bs) for _, ctx in lens]
        if sum(blocks_per) > self.kv_caches[0].shape[1]:
            return
        tables, start = [], 0
        for n in blocks_per:
            tables.append(list(range(start, start + n)))
            start += n
        ids, pos, slots = [], [], []
        for (n, ctx), table in zip(lens, tables):
            for p in range(ctx - n, ctx):
                ids.append(1)
                pos.append(p)
                slots.append(table[p // bs] * bs + p % bs)
        width = max(len(t) for t in tables)
        bt = torch.zeros((len(tables), width), dtype=torch.int32)
        for i, t in enumerate(tables):
            bt[i, :len(t)] = torch.tensor(t, dtype=torch.int32)
        q_lens = [n for n, _ in lens]
        dev = self.device
        meta = AttentionMetadata(
            num_seqs=len(lens), num_tokens=len(ids),
            query_start_loc=torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=dev),
            seq_lens=torch.tensor([c for _, c in lens], dtype=torch.int32, device=dev), block_tables=bt.to(dev),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev), max_query_len=max(q_lens),
            max_seq_len=max(c for _, c in lens), query_lens_cpu=q_lens, seq_lens_cpu=[c for _, c in lens],
            chunk_list=torch.from_numpy(make_chunk_list(q_lens)).to(dev),
        )
        h = self.model.forward(torch.tensor(ids, device=dev), torch.tensor(pos, device=dev), self.kv_caches, meta)
        self.model.logits(h[-1:])

    @torch.inference_mode()
    def capture_decode_graphs(self, max_batch: int, max_model_len: int, record: Recorder | None = None) -> None:
        """Record one decode step per batch-size bucket up to max_batch (services/engine/cuda_graphs.py).
        `record`: how a step is recorded; None: CUDA graphs, on CUDA only (tests on CPU pass a fake)."""
        graphs = self._step_graphs(max_model_len, record)
        if graphs is not None:
            graphs.capture_decode(max_batch)

    @torch.inference_mode()
    def capture_mixed_graphs(self, max_tokens: int, max_seqs: int, max_model_len: int,
                             record: Recorder | None = None) -> None:
        """Record one mixed step (prefill chunks and decodes) per token-count bucket up to max_tokens."""
        graphs = self._step_graphs(max_model_len, record)
        if graphs is not None:
            graphs.capture_mixed(max_tokens, max_seqs)

    def _step_graphs(self, max_model_len: int, record: Recorder | None) -> StepGraphs | None:
        if record is None and self.device.type != "cuda":
            return None
        if self.backend.name != "triton":  # the torch backend reads host-side metadata: not capturable
            log.warning("CUDA graphs need the triton attention backend; %s steps run eagerly", self.backend.name)
            return None
        if self.graphs is None:
            self.graphs = StepGraphs(self.model, self.kv_caches, self.device, max_model_len, self.block_size,
                                     record or cuda_recorder)
        return self.graphs

    @torch.inference_mode()
    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        # Pinned, non-blocking (_to_device): a plain torch.tensor(..., device=cuda) would wait for the
        # step in flight.
        src, dst = self._to_device(np.asarray(pairs, dtype=np.int64).T.copy())
        self.backend.copy_blocks(self.kv_caches, src, dst)

