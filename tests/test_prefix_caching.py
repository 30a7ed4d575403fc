"""Automatic prefix caching: the same outputs as without it, only the uncached suffix computed, LRU
eviction under pressure that never reads an evicted block, and every block back once all requests end."""

import subprocess
import sys

import pytest

from folio import LLM, BeamSearchParams, SamplingParams
from services.engine.block_manager import BlockManager, chain_hash
from tests.unit.builders import make_requests, make_scheduler, run_step

SYSTEM = "You are a helpful assistant. Answer briefly and precisely, and say so when you are not sure. "
QUESTIONS = ["What is the capital of France?", "Name three primary colors.", "What is 2+2?",
             "Who wrote Hamlet?", "Why is the sky blue?"]
GREEDY = SamplingParams(temperature=0, max_tokens=6)


@pytest.fixture(scope="module")
def uncached():
    return LLM(dtype="float32", enable_prefix_caching=False, cpu_kv_cache_bytes=32 << 20, max_model_len=512)


def token_ids(outs):
    return [o.outputs[0].token_ids for o in outs]


def test_caching_on_equals_off_and_a_repeat_computes_only_its_suffix(llm, uncached):
    engine = llm.engine
    assert engine.config.enable_prefix_caching  # on by default
    engine.blocks.reset_prefix_cache()
    bs = engine.config.block_size
    prompts = [SYSTEM + q for q in QUESTIONS]
    want = token_ids(uncached.generate(prompts, GREEDY, use_tqdm=False))
    assert uncached.engine.get_stats().prefix_cache_hits == 0

    first = llm.generate(prompts[0], GREEDY, use_tqdm=False)
    assert first[0].num_cached_tokens == 0
    before = engine.get_stats()
    rest = llm.generate(prompts[1:], GREEDY, use_tqdm=False)
    assert token_ids(first + rest) == want
    # The shared system prompt's full blocks came from the cache.
    shared = len(llm.get_tokenizer().encode(SYSTEM)) // bs * bs
    assert shared > 0 and all(o.num_cached_tokens >= shared for o in rest)
    assert engine.get_stats().prefix_cache_hits - before.prefix_cache_hits >= shared * len(rest)

    # The same request again computes only what is past its last cached full block.
    n = len(first[0].prompt_token_ids)
    sched = engine.scheduler
    computed, before = sched.num_computed_prompt_tokens, engine.get_stats()
    again = llm.generate(prompts[0], GREEDY, use_tqdm=False)[0]
    cached = (n - 1) // bs * bs  # at least one token is computed: its logits give the first output
    assert again.num_cached_tokens == cached
    assert sched.num_computed_prompt_tokens - computed == n - cached
    stats = engine.get_stats()
    assert stats.prefix_cache_hits - before.prefix_cache_hits == cached
    assert stats.prefix_cache_queries - before.prefix_cache_queries == n
    assert again.outputs[0].token_ids == want[0]

    # Without caching the whole prompt is computed every time.
    sched = uncached.engine.scheduler
    computed = sched.num_computed_prompt_tokens
    off = uncached.generate(prompts[0], GREEDY, use_tqdm=False)[0]
    assert off.num_cached_tokens == 0 and sched.num_computed_prompt_tokens - computed == n


def test_stress_overfilled_cache_evicts_lru_and_never_reads_an_evicted_block(uncached):
    """32 blocks of 4 tokens for waves of prompts with overlapping prefixes: the cache overflows, blocks
    are evicted and reused, and every output equals the uncached run."""
    small = LLM(dtype="float32", block_size=4, num_kv_blocks=32, max_model_len=128)
    engine = small.engine
    original = engine.step

    def checked_step(*args, **kwargs):
        outs = original(*args, **kwargs)
        engine.blocks.check_invariants()  # a block in a table is held, so it was never evicted
        return outs

    engine.step = checked_step
    heads = [SYSTEM, "Translate to French: ", "Once upon a time, in a land far away, "]
    waves = [
        [heads[0] + q for q in QUESTIONS[:3]],
        [heads[1] + q for q in QUESTIONS] + [heads[0] + QUESTIONS[0]],
        [heads[2] + q for q in QUESTIONS[::-1]],
        [heads[0] + q for q in QUESTIONS] + [heads[1] + QUESTIONS[2]],
    ]
    for wave in waves:
        assert token_ids(small.generate(wave, GREEDY, use_tqdm=False)) == \
            token_ids(uncached.generate(wave, GREEDY, use_tqdm=False))
    stats = engine.get_stats()
    assert engine.blocks.pool.num_evictions > 10  # cached blocks were evicted and their slots reused
    assert stats.prefix_cache_hits > 0
    assert stats.free_blocks + stats.evictable_blocks == stats.total_blocks and stats.evictable_blocks > 0


def test_after_all_requests_end_aborted_included_every_block_is_back(llm):
    engine = llm.engine
    long = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    engine.add_request("plain", SYSTEM + QUESTIONS[0], long)
    engine.add_request("sampled", SYSTEM + QUESTIONS[1], SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=40))
    engine.add_request("beams", SYSTEM + QUESTIONS[2], BeamSearchParams(beam_width=3, max_tokens=40, ignore_eos=True))
    engine.add_request("short", SYSTEM + QUESTIONS[3], SamplingParams(temperature=0, max_tokens=3))
    for _ in range(4):
        engine.step()
    assert engine.blocks.num_used_blocks() > 0
    engine.add_request("never-ran", QUESTIONS[4], long)
    for rid in ("sampled", "beams", "never-ran"):  # mid-flight fork and beams, and a waiting one
        assert engine.abort_request(rid).finished
    while engine.has_unfinished_requests():
        engine.step()
    blocks = engine.blocks
    blocks.check_invariants()
    assert not blocks.tables
    assert all(b.ref_count == 0 for b in blocks.pool.blocks)
    assert blocks.num_free_blocks == blocks.num_blocks  # cached ones included: they are evictable
    stats = engine.get_stats()
    assert stats.kv_usage == 0 and stats.running == 0 and stats.waiting == 0


# --- the block manager alone (no model) ---------------------------------------------------------------
def test_block_hashes_are_chained_deterministic_and_namespaced():
    toks = (1, 2, 3, 4)
    h = chain_hash(None, toks)
    assert chain_hash(h, toks) != h  # the parent is part of the name
    assert chain_hash(None, toks, namespace="lora-a") != h
    code = "from services.engine.block_manager import chain_hash; print(chain_hash(None, (1, 2, 3, 4)))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "123", "PYTHONPATH": "."})
    assert int(other.stdout) == h  # the same in another process, whatever its hash seed


def test_blocks_caching_nothing_are_reused_before_cached_ones():
    bm = BlockManager(6, 4)
    a, b = (r.seqs[0] for r in make_requests(8, 6))
    for s in (a, b):
        bm.allocate(s, s.num_tokens)
        s.num_computed_tokens = s.num_tokens
        bm.mark_computed(s)
    bm.free(a)  # two cached full blocks
    bm.free(b)  # one cached full block, one partial block caching nothing
    assert bm.num_evictable_blocks == 3 and bm.num_free_blocks == 6
    c = make_requests(1, 1, 3)[2].seqs[0]
    bm.allocate(c, 3 * 4 - 1)  # three blocks: the two never used and b's partial one
    assert bm.pool.num_evictions == 0 and bm.num_evictable_blocks == 3
    bm.check_invariants()
    d = make_requests(1, 1, 1, 1)[3].seqs[0]
    bm.allocate(d, 4)  # now a cached block must go: the least recently freed, a's tail
    assert bm.pool.num_evictions == 1
    assert len(bm.find_cached_prefix(make_requests(9)[0].seqs[0])) == 1  # a's head survives
    bm.check_invariants()


def test_hit_counters_count_a_waiting_request_once():
    sched = make_scheduler(num_blocks=4, block_size=4, max_tokens=64)
    hog, again = (r.seqs[0] for r in make_requests(13, 8))
    sched.add(hog)
    run_step(sched)  # the hog holds all 4 blocks
    sched.add(again)
    queries = sched.blocks.prefix_queries
    for _ in range(2):
        run_step(sched)  # `again` waits: it is looked up each step but not counted
    assert sched.blocks.prefix_queries == queries
    sched.finish(hog)
    run_step(sched)
    assert sched.blocks.prefix_queries - queries == 8  # counted once, when admitted
    sched.blocks.check_invariants()
