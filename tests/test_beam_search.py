"""Beam search in the engine against transformers' beam search on the bundled model (float32), and its
block sharing: beams fork on the prompt's blocks, copy a partly filled block on write, and free all."""

import pytest
import torch

from folio import LLM, BeamSearchParams
from services.engine.request import SeqStatus

EOS = 2
CASES = [  # (prompt or chat, beam params): EOS-ended and length-ended beams, the three stop rules
    ([{"role": "user", "content": "What is 2+2?"}], dict(beam_width=3, max_tokens=10)),
    ("The capital of France is", dict(beam_width=4, max_tokens=6, length_penalty=0.5, early_stopping=True)),
    ("def fibonacci(n):", dict(beam_width=2, max_tokens=6, length_penalty=2.0, early_stopping="never")),
]


def prompt_ids(tok, p):
    return tok.encode_chat(p) if isinstance(p, list) else tok.encode(p)


def hf_beams(hf_model, ids, bp: dict):
    p = BeamSearchParams(**bp)
    out = hf_model.generate(torch.tensor([ids]), num_beams=p.beam_width, num_return_sequences=p.beam_width,
                            do_sample=False, max_new_tokens=p.max_tokens, length_penalty=p.length_penalty,
                            early_stopping=p.early_stopping, eos_token_id=EOS, pad_token_id=EOS,
                            output_scores=True, return_dict_in_generate=True)
    beams = []
    for seq in out.sequences:
        gen = seq[len(ids):].tolist()
        beams.append(gen[:gen.index(EOS) + 1] if EOS in gen else gen)  # drop the padding after EOS
    return beams, out.sequences_scores.tolist()


@pytest.mark.parametrize("prompt, bp", CASES, ids=["chat-eos", "lp0.5-early", "lp2-never"])
def test_beams_equal_transformers_beam_search(llm, hf_model, prompt, bp):
    ids = prompt_ids(llm.get_tokenizer(), prompt)
    params = BeamSearchParams(**bp)
    out = llm.beam_search([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]
    ref_beams, ref_scores = hf_beams(hf_model, ids, bp)
    ours = [o.token_ids for o in out.outputs]
    assert ours[0] == ref_beams[0]  # the best beam
    assert ours == ref_beams  # and every returned beam, in the same order
    for o, score in zip(out.outputs, ref_scores):
        assert abs(o.cumulative_logprob / len(o.token_ids) ** params.length_penalty - score) < 1e-3
        assert o.finish_reason == ("stop" if o.token_ids[-1] == EOS else "length")
        assert o.text == llm.get_tokenizer().decode(o.token_ids)
    assert out.finished and len(out.outputs) == params.beam_width
    if isinstance(prompt, list) and "2+2" in prompt[0]["content"]:
        assert out.outputs[0].text == "2 + 2 = 4" and out.outputs[0].finish_reason == "stop"


def test_beams_fork_on_shared_prompt_blocks_and_never_rerun_the_prompt(llm):
    engine = llm.engine
    engine.blocks.reset_prefix_cache()  # this test counts computed prompt tokens
    bs = engine.config.block_size
    ids = llm.get_tokenizer().encode(
        "In 1969, the first humans landed on the Moon. The mission was called Apollo 11 and its crew were")
    assert len(ids) % bs and len(ids) > bs  # full prompt blocks plus a partly filled one
    n_blocks = -(-len(ids) // bs)
    computed_before = engine.scheduler.num_computed_prompt_tokens
    req = engine.add_request("beam-share", None, BeamSearchParams(beam_width=4, max_tokens=12), prompt_token_ids=ids)
    engine.step()  # prefill, then the first beam step forks 4 beams off the prompt
    assert len(req.seqs) == 4 and all(s.status is SeqStatus.RUNNING for s in req.seqs)
    tables = [engine.blocks.block_ids(s.seq_id) for s in req.seqs]
    assert all(t == tables[0] for t in tables)  # every block shared, the partial one too
    assert engine.blocks.num_used_blocks() == n_blocks  # not 4x
    engine.step()  # each beam writes its token: the shared partial block is copied on write
    tables = [engine.blocks.block_ids(s.seq_id) for s in req.seqs]
    full = n_blocks - 1
    assert all(t[:full] == tables[0][:full] for t in tables)  # full prompt blocks stay shared
    assert engine.blocks.num_used_blocks() < 4 * n_blocks
    used = []
    while engine.has_unfinished_requests():
        used.append(engine.blocks.num_used_blocks())
        engine.step()
    # Sharing held throughout: never as many blocks as 4 private copies would take.
    assert max(used) < 4 * (n_blocks + 1)
    assert engine.scheduler.num_computed_prompt_tokens - computed_before == len(ids)  # the prompt ran once
    assert engine.blocks.num_used_blocks() == 0
    engine.blocks.check_invariants()


def test_beams_survive_preemption_and_a_small_token_budget(llm):
    """A pool too small for every beam at once and a budget that splits the beams across steps: beams
    wait for each other, preempted ones are recomputed, and the result is the same as with room."""
    prompts = ["The capital of France is", "def fibonacci(n):", "1, 2, 3, 4,"]
    params = BeamSearchParams(beam_width=3, max_tokens=10)
    want = [[o.token_ids for o in r.outputs] for r in llm.beam_search(prompts, params, use_tqdm=False)]
    tight = LLM(dtype="float32", block_size=4, num_kv_blocks=14, max_model_len=56, max_num_batched_tokens=5)
    got = [[o.token_ids for o in r.outputs] for r in tight.beam_search(prompts, params, use_tqdm=False)]
    assert tight.engine.scheduler.num_preemptions > 0
    assert got == want
    tight.engine.blocks.check_invariants()
    assert tight.engine.blocks.num_free_blocks == tight.engine.blocks.num_blocks
