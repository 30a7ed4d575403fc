"""The prefill kernel's dispatch table (kernels/paged_prefill_configs.py): keys, fallbacks, forced configs,
and that a launch uses the config the table picks."""

import pytest
import torch

import kernels.paged_prefill as pp
from kernels import paged_prefill_configs as pc
from paged_cases import make_batch


@pytest.fixture
def on_gpu_rules(monkeypatch):
    """The table as the GPU sees it (the interpreter skips it), with two made-up entries."""
    monkeypatch.setattr(pc, "_interpreting", lambda: False)
    monkeypatch.setattr(pc, "TABLE", {(128, 4, 2, False, 2): dict(num_stages=3, maxnreg=None),
                                      (128, 4, 2, True, 0): dict(BLOCK_N=32)})


def test_query_buckets():
    assert [pc.query_bucket(n) for n in (1, 1023, 1024, 4095, 4096, 10 ** 6)] == [0, 0, 1, 1, 2, 2]


def test_select_config_uses_the_table_then_the_rules(on_gpu_rules):
    long_fresh = pc.select_config(128, 4, torch.bfloat16, False, 8192)
    assert long_fresh == dict(pc.BASE, num_stages=3, maxnreg=None)
    assert pc.select_config(128, 4, torch.float16, False, 8192) == long_fresh  # keyed on the dtype's width
    assert pc.select_config(128, 4, torch.bfloat16, True, 512)["BLOCK_N"] == 32
    assert pc.select_config(128, 4, torch.bfloat16, False, 2048) == pc.BASE  # no entry: the rules
    assert pc.select_config(128, 2, torch.bfloat16, False, 8192) == pc.BASE  # another group
    assert pc.select_config(128, 4, torch.float32, False, 8192)["BLOCK_M"] == 64  # fp32: the rules'
    assert pc.select_config(128, 4, torch.bfloat16, False, 8192, use_table=False) == pc.BASE  # paged keys only
    with pc.forced_config(dict(pc.BASE, BLOCK_N=16)):
        assert pc.select_config(128, 4, torch.bfloat16, False, 8192)["BLOCK_N"] == 16
    assert pc.select_config(128, 4, torch.bfloat16, False, 8192) == long_fresh


def test_table_configs_lists_each_pick_once(on_gpu_rules):
    cfgs = pc.table_configs(128, 4, torch.bfloat16)
    assert len(cfgs) == 3 and pc.BASE in cfgs
    assert pc.table_configs(64, 4, torch.bfloat16) == [pc.BASE]


def test_short_pick_ab_flag(monkeypatch):
    # FOLIO_PREFILL_SHORT_PICK=ws (A/B runs): fresh prompts under 1,024 tokens take the pick before TMA_STORE/AHEAD
    monkeypatch.setattr(pc, "_interpreting", lambda: False)
    new = pc.select_config(128, 4, torch.bfloat16, False, 700)
    assert new["TMA_STORE"] and new["AHEAD"]
    monkeypatch.setenv(pc.SHORT_PICK_ENV, "ws")
    old = pc.select_config(128, 4, torch.bfloat16, False, 700)
    assert old == dict(pc.BASE, **pc._WS_FRESH) and not old["TMA_STORE"] and not old["AHEAD"]
    assert pc.select_config(128, 4, torch.bfloat16, False, 2048) == dict(pc.BASE, **pc._WS_LONG_FRESH)  # others kept


def test_chunk_list_ab_flag(monkeypatch):
    # The table's prefix key under 1,024 query tokens (the engine's small mixed steps) walks the chunk list;
    # FOLIO_PREFILL_CHUNK_LIST=0 (A/B runs) takes that off, keeping the entry's tiles
    monkeypatch.setattr(pc, "_interpreting", lambda: False)
    on = pc.select_config(128, 4, torch.bfloat16, True, 608)
    assert on == dict(pc.BASE, **pc._PREFIX_SHORT) and on["CHUNK_LIST"]
    assert not pc.select_config(128, 4, torch.bfloat16, True, 2048)["CHUNK_LIST"]
    assert not pc.select_config(128, 4, torch.bfloat16, False, 608)["CHUNK_LIST"]
    monkeypatch.setenv(pc.CHUNK_LIST_ENV, "0")
    off = pc.select_config(128, 4, torch.bfloat16, True, 608)
    assert off == dict(on, CHUNK_LIST=False, PERSISTENT=0)


def test_prefix_pick_ab_flag(monkeypatch):
    # The small mixed steps' key takes 64 x 32 tiles walking the list, 3 per SM (tests/kernels/test_paged_prefill.py
    # runs those tiles with the list); FOLIO_PREFILL_PREFIX_PICK=base (A/B runs) gives session 8's pick, BASE's tiles
    # walking it; the other keys stay, and the warm-up list follows
    monkeypatch.setattr(pc, "_interpreting", lambda: False)
    got = pc.select_config(128, 4, torch.bfloat16, True, 608)
    assert got["CHUNK_LIST"] and (got["BLOCK_M"], got["BLOCK_N"], got["PERSISTENT"]) == (64, 32, 3)
    monkeypatch.setenv(pc.PREFIX_PICK_ENV, "base")
    base = pc.select_config(128, 4, torch.bfloat16, True, 608)
    assert base == dict(pc.BASE, **pc._PREFIX_SHORT_BASE) and base["CHUNK_LIST"] and base["BLOCK_M"] == 128
    assert base in pc.table_configs(128, 4, torch.bfloat16) and got not in pc.table_configs(128, 4, torch.bfloat16)
    assert pc.select_config(128, 4, torch.bfloat16, True, 2048) == pc.BASE
    monkeypatch.setenv(pc.CHUNK_LIST_ENV, "0")
    assert pc.select_config(128, 4, torch.bfloat16, True, 608) == dict(base, CHUNK_LIST=False, PERSISTENT=0)


def test_interpreter_uses_one_small_config():
    # tests/conftest.py sets TRITON_INTERPRET=1: whatever the table says, one config (small tiles).
    cfgs = pc.table_configs(128, 4, torch.bfloat16)
    assert len(cfgs) == 1 and cfgs[0]["BLOCK_M"] == 32


def test_launch_takes_the_forced_config_and_max_query_len(monkeypatch):
    seen = []
    real = pp.select_config
    monkeypatch.setattr(pp, "select_config", lambda *a: seen.append(a) or real(*a))
    b = make_batch([20, 9], [20, 3], 8, 2, 32, 16, torch.float32, torch.device("cpu"))
    args = (b.q, b.kv_cache, b.block_tables, b.seq_lens, b.query_start_loc, 0.3)
    with pc.forced_config(dict(pc.default_config(32, torch.float32), BLOCK_N=16)):
        ref = pp.paged_prefill(*args, k=b.k, v=b.v, max_query_len=20)
    assert seen[-1] == (32, 4, torch.float32, True, 20, True)
    pp.paged_prefill(*args, k=b.k, v=b.v)
    assert seen[-1][-2:] == (b.q.shape[0], True)  # without max_query_len: the token count bounds it
    pp.paged_prefill(*args)
    assert seen[-1][-1] is False  # no step k/v: every key through the block table, the table is skipped
    torch.testing.assert_close(ref, pp.paged_prefill(*args, k=b.k, v=b.v), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="max_query_len"):
        pp.paged_prefill(*args, max_query_len=-1)


def test_a_gluon_entry_falls_back_to_its_triton_config(monkeypatch):
    # A table entry naming the Gluon kernel carries the Triton config for launches it does not serve (here: the CPU);
    # the launch must use those keys, not the Gluon ones (a persistent 128-key build, say), and stay correct.
    monkeypatch.setattr(pc, "_interpreting", lambda: False)
    monkeypatch.setattr(pc, "TABLE", {(32, 4, 2, False, 0): dict(GLUON=True, GLUON_WS=True, BLOCK_N=128, PERSISTENT=1,
                                                                TRITON=dict(BLOCK_M=32, BLOCK_N=16, num_warps=4,
                                                                            num_stages=1, maxnreg=None))})
    seen = []
    real = pp._paged_prefill_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                seen.append((kw["BLOCK_N"], kw["PERSISTENT"]))
                return real[grid](*args, **kw)
            return launch

    monkeypatch.setattr(pp, "_paged_prefill_kernel", Spy())
    b = make_batch([20, 9], [20, 9], 8, 2, 32, 16, torch.float16, torch.device("cpu"))
    out = pp.paged_prefill(b.q, b.kv_cache, b.block_tables, b.seq_lens, b.query_start_loc, 0.3, k=b.k, v=b.v,
                           has_prefix=False, max_query_len=20)
    assert seen == [(16, 0)]
    ref = pp.paged_prefill_ref(b.q, b.kv_cache, b.block_tables, b.seq_lens, b.query_start_loc, 0.3)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-3, rtol=2e-3)
