"""Mixed-step graphs (services/engine/cuda_graphs.py) on CPU through a fake 'graph' that re-runs the
captured function: the padding, static buffers and capture-time host metadata of the real CUDA path,
checked against the eager path on every step of a batch with chunked prefill, prefix-cache hits and
decodes. The triton attention kernels run in the interpreter, so no host-side value of the step can reach
the 'graph' except through its device buffers, as under a real CUDA graph (tests/gpu/test_mixed_graphs_gpu.py
checks the real one)."""

import pytest
import torch

from folio import LLM, SamplingParams
from services.engine.config import EngineConfig
from tests.models.architectures import ARCHITECTURES
from tests.models.harness import build_checkpoint


class FakeGraph:
    """Stands in for torch.cuda.CUDAGraph where CUDA is absent: replay() re-runs the recorded function
    (with the host values it had at capture) and writes its result into the captured output, as a real
    replay refills the output's memory."""

    def __init__(self, fn, out):
        self.fn, self.out, self.replays = fn, out, 0

    def replay(self):
        self.out.copy_(self.fn())
        self.replays += 1


def fake_recorder(fn, pool):
    fn()
    out = fn()
    return FakeGraph(fn, out), out, pool


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    arch = next(a for a in ARCHITECTURES if a.id == "llama")  # 2 layers, 4 query / 2 KV heads of 16
    d = tmp_path_factory.mktemp("tiny_llama_graphs")
    build_checkpoint(arch, d)
    return d


def _llm(model_dir):
    return LLM(model=str(model_dir), device="cpu", dtype="float32", attention_backend="triton", block_size=8,
               max_model_len=128, max_num_seqs=8, max_num_batched_tokens=32, cpu_kv_cache_bytes=1 << 20)


def _each_step_both_ways(runner):
    """Run every step eagerly and from the graphs on the same inputs; record both logits."""
    steps = []
    execute = runner.execute

    def both(inputs):
        graphs, runner.graphs = runner.graphs, None
        eager = execute(inputs)
        pool = [c.clone() for c in runner.kv_caches]
        runner.graphs = graphs
        replays = _replays(graphs)
        _scribble(graphs)
        graphed = execute(inputs)
        # The replay wrote the step's K/V where the eager step did, and nothing anywhere else.
        for before, after in zip(pool, runner.kv_caches):
            torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
        steps.append((inputs.meta.num_tokens, inputs.meta.max_query_len, _replays(graphs) > replays, eager, graphed))
        return graphed

    runner.execute = both
    return steps


@torch.inference_mode()
def _scribble(graphs) -> None:
    """Fill the graphs' static inputs with stale-looking values (in range, as an earlier step could have
    left them): a replay must set everything the step reads, padding included."""
    g = torch.Generator().manual_seed(len(graphs.mixed))
    for st in filter(None, (graphs._mix, graphs._dec)):
        # Slots of the first blocks, which the live sequences hold: a stray write there changes outputs.
        for name, hi in (("ids", 100), ("pos", graphs.max_model_len), ("slots", 160), ("qsl", 33),
                         ("seq_lens", graphs.max_model_len), ("tables", 20), ("chunks", 8)):
            st[name].copy_(torch.randint(0, hi, st[name].shape, generator=g))


def _replays(graphs) -> int:
    return sum(g.replays for g, _ in [*graphs.mixed.values(), *graphs.decode.values()])


@pytest.mark.parametrize("chunk_list", [False, True], ids=["plain", "chunk_list"])
def test_fake_graph_mixed_steps_match_eager_on_cpu(tiny_dir, chunk_list, monkeypatch):
    if chunk_list:  # the prefill kernel walks the step's chunk list (CHUNK_LIST) in eager and graphed steps alike
        import kernels.paged_prefill as pp

        select = pp.select_config
        monkeypatch.setattr(pp, "select_config", lambda *a, **k: dict(select(*a, **k), CHUNK_LIST=True))
    llm = _llm(tiny_dir)
    runner = llm.engine.runner
    runner.capture_mixed_graphs(32, 8, 128, record=fake_recorder)
    runner.capture_decode_graphs(4, 128, record=fake_recorder)
    assert sorted(runner.graphs.mixed) == [16, 32] and sorted(runner.graphs.decode) == [1, 2, 4]
    steps = _each_step_both_ways(runner)
    shared = list(range(3, 27))  # 24 tokens: three full blocks of 8, cached for the later prompts
    prompts = [shared + [40, 41, 42], list(range(50, 61)), shared + [70] * 9, [90, 91, 92]]
    greedy = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    # A prompt-logprobs chunk (logits for every position; it skips the prefix cache) among the rest.
    params = [SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, prompt_logprobs=1), greedy, greedy]
    first = llm.generate(prompts[:1], greedy, use_tqdm=False)  # fills the prefix cache
    rest = llm.generate(prompts[1:], params, use_tqdm=False)
    assert rest[1].num_cached_tokens >= 16, "the third prompt must hit the prefix cache"

    mixed = [s for s in steps if s[1] > 1]
    assert all(s[2] for s in mixed), "every mixed step of <= 32 tokens replays a graph"
    assert any(n < 32 and n not in (16,) for n, *_ in mixed), "some step is padded up to its bucket"
    assert any(s[2] for s in steps if s[1] == 1), "decode steps replay their graphs too"
    for n, _, _, eager, graphed in steps:
        assert eager.shape == graphed.shape
        if n in (1, 2, 4, 16, 32):  # the bucket's own size: the same arithmetic, so the same bits
            assert torch.equal(eager, graphed), f"step of {n} tokens"
        else:  # padded rows change the matmuls' M, which may change their blocking
            torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-5)
    # And the tokens and prompt logprobs the user sees equal an engine that never graphs (nor lists chunks).
    monkeypatch.undo()
    ref = _llm(tiny_dir)
    ref_out = ref.generate(prompts[:1], greedy, use_tqdm=False) + ref.generate(prompts[1:], params, use_tqdm=False)
    for a, b in zip(first + rest, ref_out):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
    got, want = (o.prompt_logprobs for o in (rest[0], ref_out[1]))
    assert [d and d[t].logprob for d, t in zip(got, prompts[1])] == pytest.approx(
        [d and d[t].logprob for d, t in zip(want, prompts[1])], abs=1e-5)


def test_mixed_graph_steps_beyond_the_largest_bucket_run_eagerly_fake_graph(tiny_dir):
    llm = _llm(tiny_dir)
    runner = llm.engine.runner
    runner.capture_mixed_graphs(16, 8, 128, record=fake_recorder)
    steps = _each_step_both_ways(runner)
    llm.generate([list(range(3, 40))], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True), use_tqdm=False)
    big = [s for s in steps if s[0] > 16]
    assert big and not any(s[2] for s in big)
    assert all(torch.equal(e, g) for *_, e, g in big)


def test_mixed_graph_options():
    assert EngineConfig().mixed_cuda_graphs and EngineConfig().max_mixed_graph_tokens == 8192
    for bad in (8, 10_000):
        with pytest.raises(ValueError, match="max_mixed_graph_tokens"):
            EngineConfig(max_mixed_graph_tokens=bad)


def test_mixed_buckets_pad_a_big_step_by_at_most_an_eighth():
    from services.engine.cuda_graphs import MIXED_BUCKETS, buckets_up_to

    for n in range(257, 8193):
        assert min(b for b in MIXED_BUCKETS if b >= n) <= n * (1.0625 if n <= 4096 else 1.125), n
    assert buckets_up_to(MIXED_BUCKETS, 100)[-1] == 100 and buckets_up_to(MIXED_BUCKETS, 96)[-1] == 96


def test_fake_graph_decode_with_a_largest_bucket_not_a_multiple_of_four(tiny_dir):
    """max_num_seqs 3 (the largest decode bucket 3): the packed inputs hold 4 rows (their capacity is
    rounded up to 4), and capture must run the model on the bucket's rows only."""
    llm = _llm(tiny_dir)
    runner = llm.engine.runner
    runner.capture_decode_graphs(3, 128, record=fake_recorder)
    assert sorted(runner.graphs.decode) == [1, 2, 3] and runner.graphs.decode_capacity == 4
    steps = _each_step_both_ways(runner)
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    out = llm.generate([list(range(5, 17)), [30, 31, 32]], greedy, use_tqdm=False)
    assert any(s[2] for s in steps if s[1] == 1), "decode steps replay their graphs"
    for n, _, _, eager, graphed in steps:
        assert torch.equal(eager, graphed), f"step of {n} tokens"
    ref = _llm(tiny_dir).generate([list(range(5, 17)), [30, 31, 32]], greedy, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in out] == [o.outputs[0].token_ids for o in ref]

