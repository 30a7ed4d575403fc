"""The output processor (services/common/output_processor.py) over the bundled model's real tokenizer:
stop strings across token boundaries, hold-back, multi-byte characters split over byte-level BPE
tokens, include_stop_str_in_output, min_tokens, logprob token text, and delta accumulation.
The reference text is transformers' own decode of the same ids."""

from __future__ import annotations

import pytest

from services.common.output_processor import OutputProcessor, SequenceText, TextStream, fill_token_text
from services.common.outputs import Logprob, RequestDelta, SequenceDelta
from services.common.sampling_params import SamplingParams
from services.common.tokenizer import Tokenizer

PARIS = " Paris.\n\nThe answer is: 2018-01-22"
MULTIBYTE = "café 日本語 🙂 naïve"


@pytest.fixture(scope="module")
def tok(model_dir):
    return Tokenizer(model_dir)


def feed(tok, text: str, params: SamplingParams, flush: bool = True):
    """Feed `text`'s tokens one at a time, as a stream does; return (pieces shown, the SequenceText)."""
    ids = tok.encode(text, add_special_tokens=False)
    st = SequenceText(tok, params, incremental=True)
    pieces = []
    for n, t in enumerate(ids, 1):
        pieces.append(st.add([t], n))
        if st.stop_string is not None:
            break
    if flush and st.stop_string is None:
        pieces.append(st.finish(ids, len(ids)))
    return pieces, st


def test_no_stop_strings_shows_every_token_at_once_and_matches_transformers(tok, hf_tokenizer):
    ids = tok.encode(PARIS, add_special_tokens=False)
    pieces, st = feed(tok, PARIS, SamplingParams())
    assert "".join(pieces) == st.text == hf_tokenizer.decode(ids, skip_special_tokens=True) == PARIS
    assert all(pieces[:-1]) and pieces[-1] == ""  # no hold-back without stop strings


def test_stop_string_across_token_boundaries(tok):
    # "\n\nThe" spans three tokens ("\n", "\n", "The"); "r is" spans " answer" and " is".
    for stop, want in (["\n\nThe"], " Paris."), (["r is"], " Paris.\n\nThe answe"):
        pieces, st = feed(tok, PARIS, SamplingParams(stop=stop))
        assert st.stop_string == stop[0]
        assert st.text == "".join(pieces) == want


def test_earliest_stop_string_wins_and_include_stop_str_in_output(tok):
    pieces, st = feed(tok, PARIS, SamplingParams(stop=["answer", "\n\n"], include_stop_str_in_output=True))
    assert st.stop_string == "\n\n" and st.text == "".join(pieces) == " Paris.\n\n"
    _, st = feed(tok, PARIS, SamplingParams(stop=["answer"], include_stop_str_in_output=True))
    assert st.text == " Paris.\n\nThe answer"


def test_hold_back_never_shows_what_could_still_begin_a_stop_string(tok):
    params = SamplingParams(stop=["2018-12"])  # never completes: "2018-01" diverges at its 6th character
    ids = tok.encode(PARIS, add_special_tokens=False)
    stream = TextStream(params)
    full = ""
    for n, t in enumerate(ids, 1):
        piece = tok.decode([t])
        full += piece
        stream.add(piece, n)
        # everything but the last len("2018-12") - 1 characters is out; nothing more
        assert stream.text == full[:max(0, len(full) - 6)]
    assert stream.stop_string is None
    assert stream.flush() == full[-6:] and stream.text == full == PARIS
    assert stream.flush() == ""


def test_multibyte_characters_split_over_byte_tokens(tok, hf_tokenizer):
    ids = tok.encode(MULTIBYTE, add_special_tokens=False)
    assert any(tok.decode([t]).endswith("\ufffd") for t in ids)  # byte pieces of 日 and 語 really are incomplete
    pieces, st = feed(tok, MULTIBYTE, SamplingParams())
    assert st.text == hf_tokenizer.decode(ids) == MULTIBYTE
    assert not any("\ufffd" in p for p in pieces)  # a half character is never shown
    # A stop string made of one multi-byte character, completed by its last byte token.
    pieces, st = feed(tok, MULTIBYTE, SamplingParams(stop=["語"]))
    assert st.stop_string == "語" and st.text == "".join(pieces) == "café 日本"
    pieces, st = feed(tok, MULTIBYTE, SamplingParams(stop=["本語 🙂"], include_stop_str_in_output=True))
    assert st.text == "café 日本語 🙂"


def test_min_tokens_ignores_stop_strings_completed_before_it(tok):
    ids = tok.encode(PARIS, add_special_tokens=False)  # "\n\n" is complete after token 4
    _, st = feed(tok, PARIS, SamplingParams(stop=["\n\n"], min_tokens=4))
    assert st.text == " Paris." and st.stop_string == "\n\n"
    _, st = feed(tok, PARIS, SamplingParams(stop=["\n\n"], min_tokens=5))  # too early: never found later
    assert st.stop_string is None and st.text == PARIS
    _, st = feed(tok, PARIS, SamplingParams(stop=["\n\n", "-"], min_tokens=5))
    assert st.stop_string == "-" and st.text == " Paris.\n\nThe answer is: 2018"
    assert len(ids) > 5


def test_text_after_a_stop_hit_is_ignored(tok):
    stream = TextStream(SamplingParams(stop=["is"]))
    assert stream.add("This", 1) == "Th"
    assert stream.stop_string == "is"
    assert stream.add(" more", 2) == "" and stream.flush() == "" and stream.text == "Th"


def test_logprob_token_text(tok, hf_tokenizer):
    ids = tok.encode(MULTIBYTE, add_special_tokens=False)
    entries = [{t: Logprob(-1.0, 1), 2: Logprob(-2.0, 2)} for t in ids]
    entries.append(None)  # prompt logprobs start with an empty entry
    fill_token_text(tok, entries)
    for t, e in zip(ids, entries):
        assert e[t].decoded_token == hf_tokenizer.decode([t])  # lone bytes stay as transformers shows them
        assert e[2].decoded_token == "<|im_end|>"  # special tokens are named, not skipped
    assert entries[0][ids[0]].decoded_token == "c" and entries[3][ids[3]].decoded_token == " \ufffd"
    kept = Logprob(-1.0, 1, "given")
    fill_token_text(tok, [{5: kept}])
    assert kept.decoded_token == "given"


def _deltas(rid, per_step, finish_at):
    """Deltas for sequences fed one token per step: per_step[i] = {index: token}."""
    out = []
    for i, step in enumerate(per_step):
        seqs = [SequenceDelta(index=k, token_ids=[t], logprobs=None, cumulative_logprob=-float(i + 1),
                              finish_reason=finish_at.get((k, i)))
                for k, t in step.items()]
        out.append(RequestDelta(rid, seqs, finished=False))
    return out


def test_output_processor_accumulates_deltas_and_reports_stop_hits(tok, hf_tokenizer):
    a = tok.encode(PARIS, add_special_tokens=False)[:8]
    b = tok.encode(MULTIBYTE, add_special_tokens=False)[:8]
    proc = OutputProcessor(tok)
    proc.add_request("r", None, [1, 2, 3], SamplingParams(n=2, stop=["answer"], max_tokens=8))
    steps = [{0: x, 1: y} for x, y in zip(a, b)]
    steps[6] = {1: b[6]}  # index 0 hit "answer" at step 5 (" answer"): the engine was told to stop it
    steps[7] = {1: b[7]}
    deltas = _deltas("r", steps, {(1, 7): "length"})
    stops = []
    for d in deltas[:-1]:
        out, stopped = proc.process(d)
        assert out is None  # not streaming: only the finished output comes back
        stops.append(stopped)
    assert stops == [[], [], [], [], [], [0], [], ]
    deltas[-1].finished = True
    out, stopped = proc.process(deltas[-1])
    assert stopped == [] and out.finished and [o.index for o in out.outputs] == [0, 1]
    first, second = out.outputs
    assert first.text == " Paris.\n\nThe " and first.token_ids == a[:6]
    assert (first.finish_reason, first.stop_reason) == ("stop", "answer")
    assert second.text == hf_tokenizer.decode(b) and second.token_ids == b
    assert (second.finish_reason, second.stop_reason) == ("length", None)
    assert second.cumulative_logprob == -8.0 and out.prompt_token_ids == [1, 2, 3]
    assert "r" not in proc.requests


def test_output_processor_eos_and_stop_token_text_is_not_searched(tok):
    # The token that ended the sequence (a stop token id) is kept in the text but not searched:
    # "\n\n" completed by the ending token does not turn the finish into a stop-string finish.
    ids = tok.encode(" Paris.\n\n", add_special_tokens=False)
    proc = OutputProcessor(tok)
    proc.add_request("r", None, [1], SamplingParams(stop=["\n\n"], stop_token_ids=[ids[-1]]))
    for i, t in enumerate(ids):
        last = i == len(ids) - 1
        d = RequestDelta("r", [SequenceDelta(0, [t], None, 0.0, "stop" if last else None, t if last else None)],
                         finished=last)
        out, stopped = proc.process(d)
        assert stopped == []
    o = out.outputs[0]
    assert (o.text, o.finish_reason, o.stop_reason) == (" Paris.\n\n", "stop", ids[-1])
