"""GrammarBackend.fill and apply_bitmask against independent references (services/engine/structured.py).

fill: each row's mask equals a per-row xgrammar matcher's own fill over the model's whole vocabulary
(the construction before xgrammar was shown only the tokenizer's ids), along a walk of a valid JSON
instance, with an embedding padded past the tokenizer (not a whole number of mask words) and without;
unconstrained rows allow everything, a repeated sequence (a prompt about to fork) gets a copy of its
row, a completed grammar under ignore_eos gets EOS only; the fill threads (Folio's pool, xgrammar's own)
do not change a bit.
apply_bitmask: xgrammar's kernel equals the torch reference.
"""

import json

import pytest
import torch

from services.common.sampling_params import SamplingParams
from services.common.structured_output import StructuredOutputs
from services.common.tokenizer import Tokenizer
from services.engine.request import Request
from services.engine.structured import GrammarBackend, apply_bitmask

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "role": {"enum": ["admin", "user"]}},
          "required": ["name", "age", "role"], "additionalProperties": False}
INSTANCE = {"name": "Ada Lovelace", "age": 36, "role": "admin"}


@pytest.fixture(scope="module")
def tok(model_dir):
    return Tokenizer(model_dir)


def _reference_matcher(model_dir, vocab: int, eos: list[int], so: StructuredOutputs):
    """A matcher whose vocabulary is the model's whole embedding (padded ids as xgrammar's special tokens)."""
    import xgrammar as xgr
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"))
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab, stop_token_ids=eos)
    return xgr.GrammarMatcher(xgr.GrammarCompiler(info, max_threads=1).compile_grammar(so.grammar_obj()))


def _allowed(row: torch.Tensor, vocab: int) -> torch.Tensor:
    """The token ids a mask row allows, as a bool [vocab] (bits past the vocabulary mean nothing)."""
    return ((row[:, None] >> torch.arange(32, dtype=torch.int32)) & 1).bool().flatten()[:vocab]


def _request(rid: str, prompt: list[int], so: StructuredOutputs | None, **kw) -> Request:
    return Request(rid, None, list(prompt), SamplingParams(max_tokens=64, structured_outputs=so, **kw))


@pytest.mark.parametrize("pad", [0, 77])
def test_fill_equals_a_matcher_over_the_whole_vocabulary(model_dir, tok, pad):
    vocab = tok.vocab_size + pad
    eos = sorted(tok.eos_token_ids)
    backend = GrammarBackend(model_dir, vocab, frozenset(eos))
    so = StructuredOutputs.from_schema(SCHEMA, "s")
    choice = StructuredOutputs(choice=("yes", "no"))
    walk = tok.encode(json.dumps(INSTANCE), add_special_tokens=False)
    yes = tok.encode("yes", add_special_tokens=False) + [eos[0]]
    prompt = tok.encode("Hi", add_special_tokens=False)
    reqs = [_request("json", prompt, so), _request("plain", prompt, None),
            _request("done", prompt, choice, ignore_eos=True)]
    for r in (reqs[0], reqs[2]):
        assert backend.attach(r, backend.compile(r.params.structured_outputs).result()) is None
    assert backend.grammar_vocab == -(-tok.vocab_size // 32) * 32  # the tokenizer's ids, not the padding
    ref = _reference_matcher(model_dir, vocab, eos, so)
    ref_mask = torch.zeros((1, (vocab + 31) // 32), dtype=torch.int32)
    json_seq, plain_seq, done_seq = (r.seqs[0] for r in reqs)
    seqs = [json_seq, plain_seq, json_seq, done_seq]  # json_seq twice: a prompt about to fork into 2
    eos_only = torch.zeros_like(ref_mask[0])
    eos_only[eos[0] // 32] = 1 << (eos[0] % 32) if eos[0] % 32 != 31 else -(1 << 31)
    for step, t in enumerate(walk):
        ref.fill_next_token_bitmask(ref_mask)
        mask, ended = backend.fill(seqs)
        assert not ended
        assert mask.shape == (4, (vocab + 31) // 32)
        assert torch.equal(_allowed(mask[0], vocab), _allowed(ref_mask[0], vocab)), f"step {step}: differs from the reference"
        assert torch.equal(mask[2], mask[0])
        assert bool((mask[1] == -1).all())
        if step >= len(yes):  # "yes" and EOS accepted: the grammar is complete, ignore_eos keeps it going
            assert torch.equal(mask[3], eos_only)
        assert ref.accept_token(t)
        for s, tok_id in ((json_seq, t), (plain_seq, 0), (done_seq, yes[min(step, len(yes) - 1)])):
            s.token_ids.append(tok_id)
    ref.fill_next_token_bitmask(ref_mask)  # the instance is complete: its closing brace and EOS
    final = _allowed(backend.fill([json_seq])[0][0], vocab)
    assert torch.equal(final, _allowed(ref_mask[0], vocab))
    assert final.nonzero().flatten().tolist() == eos[:1]  # complete: only EOS (the layout, checked by hand)
    backend.shutdown()


def test_fill_threads_do_not_change_a_bit(model_dir, tok):
    """Rows at every point of the walk (enough for several slices), filled on one thread, on Folio's
    pool and on xgrammar's own threads: each row equals a fresh matcher fed the same tokens."""
    import xgrammar as xgr

    eos = sorted(tok.eos_token_ids)
    backend = GrammarBackend(model_dir, tok.vocab_size, frozenset(eos))
    so = StructuredOutputs.from_schema(SCHEMA, "s")
    compiled = backend.compile(so).result()
    walk = tok.encode(json.dumps(INSTANCE), add_special_tokens=False)
    prompt = tok.encode("Hi", add_special_tokens=False)
    reqs = [_request(f"r{k}", prompt, so) for k in range(len(walk))]
    for k, r in enumerate(reqs):
        backend.attach(r, compiled)
        r.seqs[0].token_ids += walk[:k]
    seqs = [r.seqs[0] for r in reqs]
    ref = torch.zeros((1, (tok.vocab_size + 31) // 32), dtype=torch.int32)
    masks = []
    for threads, mode in ((1, "pool"), (3, "pool"), (3, "xgrammar")):
        backend.set_fill(threads, mode)
        masks.append(backend.fill(seqs)[0])
        assert backend.fill_threads == threads and backend.fill_mode == mode
    for k, s in enumerate(seqs):
        m = xgr.GrammarMatcher(compiled)
        for t in walk[:k]:
            assert m.accept_token(t)
        m.fill_next_token_bitmask(ref)
        for mask in masks:
            assert torch.equal(_allowed(mask[k], tok.vocab_size), _allowed(ref[0], tok.vocab_size)), k
    with pytest.raises(ValueError, match="fill_threads"):
        backend.set_fill(0)
    backend.shutdown()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_bitmask_xgrammar_equals_torch(dtype):
    g = torch.Generator().manual_seed(0)
    n, vocab = 5, 1000  # not a whole number of words
    x = torch.randn(n, vocab, generator=g).to(dtype)
    mask = torch.randint(-2**31, 2**31 - 1, (n, (vocab + 31) // 32), dtype=torch.int32, generator=g)
    ref = apply_bitmask(x.clone(), mask, backend="torch")
    bits = [(int(mask[i, j // 32]) >> (j % 32)) & 1 for i in range(n) for j in range(vocab)]
    assert torch.equal(torch.isinf(ref).flatten(), torch.tensor(bits) == 0)  # the reference against the layout
    assert torch.equal(apply_bitmask(x.clone(), mask, backend="xgrammar"), ref)
    with pytest.raises(ValueError, match="backend"):
        apply_bitmask(x.clone(), mask, backend="nonsense")
