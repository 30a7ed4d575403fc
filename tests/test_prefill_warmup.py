"""The engine's warm-up compiles every prefill-kernel config the dispatch table can pick for the model
(kernels/paged_prefill_configs.py), each with and without the block-table path, so no compile lands in a
served step. On CPU the table is stood in by two small configs; the kernels run in the interpreter."""

import torch

import kernels.paged_prefill as pp
import services.engine.model_runner as mr
from folio import LLM
from kernels.paged_prefill_configs import default_config
from tests.models.architectures import ARCHITECTURES
from tests.models.harness import build_checkpoint


def test_warm_up_runs_every_table_config_with_and_without_prefix(tmp_path, monkeypatch):
    arch = next(a for a in ARCHITECTURES if a.id == "llama")  # 2 layers, 4 query / 2 KV heads of 16
    build_checkpoint(arch, tmp_path)
    llm = LLM(model=str(tmp_path), device="cpu", dtype="float32", attention_backend="triton", block_size=8,
              max_model_len=128, max_num_seqs=4, max_num_batched_tokens=64, cpu_kv_cache_bytes=1 << 20)
    runner = llm.engine.runner
    base = default_config(runner.cfg.head_dim, torch.float32)
    table = [dict(base, BLOCK_N=16), dict(base, BLOCK_M=16, REVERSE=False)]
    asked = []
    monkeypatch.setattr(mr, "table_configs", lambda *a: asked.append(a) or table)
    launches = []
    real = pp.select_config
    monkeypatch.setattr(pp, "select_config", lambda *a: launches.append((real(*a), a[3])) or launches[-1][0])
    runner.warmup(128)
    assert asked == [(runner.cfg.head_dim, 2, torch.float32)]
    for cfg in table:
        assert {has_prefix for c, has_prefix in launches if c == cfg} == {False, True}
    assert all(c in table for c, _ in launches)
