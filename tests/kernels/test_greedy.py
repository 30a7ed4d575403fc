"""The one-pass greedy sampler (kernels/greedy.py) against torch: argmax with torch's first-index tie-break and
the log-softmax of the chosen token in float64; and the engine's sampler taking it for all-greedy steps only,
with the same tokens and logprobs as its torch path."""

import pytest
import torch

from kernels.greedy import greedy_sample, greedy_sample_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,vocab", [(1, 7), (5, 4096), (3, 9001)])
def test_greedy_sample_matches_torch(dtype, n, vocab):
    g = torch.Generator().manual_seed(vocab)
    x = (3 * torch.randn(n, vocab, generator=g)).to(DEV, dtype)
    tokens, lp = greedy_sample(x)
    ref_tokens, ref_lp = greedy_sample_ref(x)
    assert torch.equal(tokens.cpu(), ref_tokens.cpu())
    torch.testing.assert_close(lp.double().cpu(), ref_lp.cpu(), atol=2e-6, rtol=1e-5)


def test_ties_take_the_first_index_across_blocks_and_strided_rows():
    vocab = 9001  # three 4096-wide blocks, the last one partial
    x = torch.full((4, vocab + 5), -1.0)[:, :vocab]  # a row stride wider than the vocabulary
    x[0, [17, 5000, 9000]] = 2.0  # a tie spanning blocks: the first one wins
    x[1, [9000, 8999]] = 2.0  # a tie inside the last block
    x[2, 4095:4097] = 2.0  # a tie across a block boundary
    x[3, 0] = float("-inf")
    x[3, 8192] = 5.0  # the maximum alone in the partial block
    tokens, lp = greedy_sample(x.to(DEV))
    assert tokens.tolist() == [17, 8999, 4095, 8192]
    torch.testing.assert_close(lp.double().cpu(), greedy_sample_ref(x)[1], atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("config", [dict(SPLIT=2, BLOCK=1024), dict(SPLIT=4, BLOCK=512, num_warps=4),
                                    dict(SPLIT=16, BLOCK=256), dict(programs=64, BLOCK=1024)])
def test_split_rows_match_torch_and_break_ties_to_the_first_index(config):
    """Each row's columns in parts (programs of their own), combined by a second launch: the same token and
    logprob as one program per row, ties across parts included."""
    vocab = 9001
    g = torch.Generator().manual_seed(1)
    x = 3 * torch.randn(6, vocab, generator=g)
    x[0, [9000, 20, 4500]] = 50.0  # a tie across parts: the first index wins
    x[1, :3000] = float("-inf")  # a whole part of -inf logits
    x[2, 8999] = 60.0  # the maximum in the last, partial part
    x = x.to(DEV)
    tokens, lp = greedy_sample(x, config)
    ref_tokens, ref_lp = greedy_sample_ref(x)
    assert tokens.tolist()[:3] == [20, ref_tokens[1].item(), 8999]
    assert torch.equal(tokens.cpu(), ref_tokens.cpu())
    torch.testing.assert_close(lp.double().cpu(), ref_lp.cpu(), atol=2e-6, rtol=1e-5)


def test_bad_logits_are_refused():
    with pytest.raises(ValueError, match="logits"):
        greedy_sample(torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="logits"):
        greedy_sample(torch.zeros(4, 3).t())
    with pytest.raises(ValueError, match="vocabulary"):
        greedy_sample(torch.zeros(3, 0))


def test_sampler_takes_the_fused_path_only_for_plain_greedy_steps(monkeypatch):
    import kernels.greedy
    from services.engine import sampler as sampler_mod
    from services.engine.request import Request
    from services.common.sampling_params import SamplingParams

    calls = []

    def spy(logits):
        calls.append(logits.shape[0])
        return kernels.greedy.greedy_sample(logits)

    monkeypatch.setattr(sampler_mod, "greedy_sample", spy)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 300, generator=g).to(DEV)  # (compiled on a GPU machine: device tensors)

    def seqs_for(params):
        return [Request(f"r{i}", None, [1, 2, 3], p).seqs[0] for i, p in enumerate(params)]

    greedy = SamplingParams(temperature=0, max_tokens=4)
    cases = {"plain": [greedy] * 3, "logprobs": [SamplingParams(temperature=0, max_tokens=4, logprobs=2)] * 3,
             "penalty": [greedy, greedy, SamplingParams(temperature=0, max_tokens=4, repetition_penalty=1.3)]}
    for name, params in cases.items():
        calls.clear()
        fused, plain = sampler_mod.Sampler(torch.device(DEV)), sampler_mod.Sampler(torch.device(DEV))
        plain.fused_greedy = False
        fused.fused_greedy = True
        a = fused(logits.clone(), seqs_for(params), frozenset({2}))
        b = plain(logits.clone(), seqs_for(params), frozenset({2}))
        assert calls == ([3] if name == "plain" else []), name
        assert a.token_ids == b.token_ids, name
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5), name
        assert a.top == b.top, name


def test_engine_outputs_are_unchanged_by_the_fused_path(tmp_path, monkeypatch):
    import json

    import kernels.greedy
    from services.engine import sampler as sampler_mod

    calls = []
    monkeypatch.setattr(sampler_mod, "greedy_sample", lambda x: calls.append(1) or kernels.greedy.greedy_sample(x))

    from folio import LLM, SamplingParams

    (tmp_path / "config.json").write_text(json.dumps(dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", rms_norm_eps=1e-5,
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        head_dim=16, vocab_size=500, max_position_embeddings=256, eos_token_id=2)))
    llm = LLM(str(tmp_path), load_format="dummy", dtype="float32", device=DEV, block_size=4, num_kv_blocks=256,
              max_num_seqs=8, seed=0)
    prompts = [{"prompt_token_ids": [5 + i, 17, 40 + 3 * i]} for i in range(5)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    runs = []
    for fused in (False, True):
        llm.engine.sampler.fused_greedy = fused
        outs = llm.generate(prompts, params, use_tqdm=False)
        runs.append([(o.outputs[0].token_ids, o.outputs[0].cumulative_logprob) for o in outs])
    assert len(calls) >= 11  # the fused run's decode steps took it
    for (ta, la), (tb, lb) in zip(*runs):
        assert ta == tb
        assert la == pytest.approx(lb, abs=1e-4)


@pytest.mark.parametrize("config", [None, dict(SPLIT=4, BLOCK=512, num_warps=4), dict(SPLIT=16, BLOCK=256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sample_race_matches_the_torch_race(config, dtype):
    """sample_race: the first argmax of x / T - log(noise) equals torch's argmax(softmax(x / T) / noise) on the same
    noise (temperatures from 0.3 to 2, a whole part of -inf logits, a greedy row with temperature 1 and noise 1),
    and the logprob is the token's under softmax(x) (float64), in one part or several."""
    from kernels.greedy import sample_race, sample_race_ref

    vocab = 9001
    g = torch.Generator().manual_seed(2)
    x = (3 * torch.randn(5, vocab, generator=g)).to(dtype)
    x[1, :3000] = float("-inf")
    temps = torch.tensor([1.0, 0.3, 2.0, 0.7, 1.0])
    noise = torch.empty(5, vocab).exponential_(generator=g)
    noise[4] = 1.0  # a greedy row
    tokens, lp = sample_race(x.to(DEV), temps.to(DEV), noise.to(DEV), config)
    ref_tokens, ref_lp = sample_race_ref(x.float(), temps, noise)
    assert torch.equal(tokens.cpu(), ref_tokens)
    assert tokens[4].item() == x[4].float().argmax().item()
    torch.testing.assert_close(lp.double().cpu(), ref_lp, atol=2e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="temperatures"):
        sample_race(x.to(DEV), temps[:4].to(DEV), noise.to(DEV))
    with pytest.raises(ValueError, match="noise"):
        sample_race(x.to(DEV), temps.to(DEV), noise[:, :9000].to(DEV))


def test_sampler_takes_the_race_kernel_for_plain_temperature_rows(monkeypatch):
    """The sampler with the fused path: rows at a plain temperature (seeded or not, mixed with greedy rows) go
    through sample_race with the noise its torch path draws, so the tokens are the same as that path's for the
    same seeds, and the logprobs too; top-p or logprobs keep the torch path."""
    import kernels.greedy
    from services.common.sampling_params import SamplingParams
    from services.engine import sampler as sampler_mod
    from services.engine.request import Request

    calls = []
    monkeypatch.setattr(sampler_mod, "sample_race", lambda *a: calls.append(1) or kernels.greedy.sample_race(*a))
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 300, generator=g).to(DEV)

    def seqs_for(params):
        return [Request(f"r{i}", None, [1, 2, 3], p).seqs[0] for i, p in enumerate(params)]

    hot = SamplingParams(temperature=0.8, max_tokens=4)
    cases = {"unseeded": [hot] * 4, "mixed": [hot, SamplingParams(temperature=0, max_tokens=4),
                                               SamplingParams(temperature=1.3, max_tokens=4, seed=7), hot],
             "top_p": [SamplingParams(temperature=0.8, top_p=0.9, max_tokens=4)] * 4,
             "logprobs": [SamplingParams(temperature=0.8, max_tokens=4, logprobs=1)] * 4}
    for name, params in cases.items():
        calls.clear()
        fused, plain = sampler_mod.Sampler(torch.device(DEV), seed=5), sampler_mod.Sampler(torch.device(DEV), seed=5)
        plain.fused_greedy = False
        fused.fused_greedy = True
        for step in range(3):  # the generators move on alike
            a = fused(logits.clone(), seqs_for(params), frozenset({2}))
            b = plain(logits.clone(), seqs_for(params), frozenset({2}))
            assert a.token_ids == b.token_ids, (name, step)
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5), name
        assert len(calls) == (3 if name in ("unseeded", "mixed") else 0), name
