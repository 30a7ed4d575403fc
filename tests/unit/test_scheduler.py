import pytest

from services.engine.request import SeqStatus
from services.engine.scheduler import QueueFullError
from tests.unit.builders import make_requests, make_scheduler, run_step


def test_prefill_is_chunked_under_the_token_budget():
    sched = make_scheduler(num_blocks=32, max_tokens=8)
    (req,) = make_requests(20)
    sched.add(req.seqs[0])
    chunks = [run_step(sched).num_tokens for _ in range(3)]
    assert chunks == [8, 8, 4]
    assert req.seqs[0].num_output_tokens == 1  # sampled once the prompt caught up


def test_decodes_go_first_and_new_prompts_join_between_steps():
    sched = make_scheduler(num_blocks=32, max_tokens=10)
    a, b = make_requests(6, 12)
    sched.add(a.seqs[0])
    run_step(sched)  # a's prompt (6) ...
    sched.add(b.seqs[0])
    out = run_step(sched)
    # a decodes (1 token) and b takes the rest of the budget (9 of its 12).
    assert [(s.seq.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("r0", 1), ("r1", 9)]


@pytest.mark.parametrize("prefix", [False, True])
def test_preemption_frees_the_newest_when_blocks_run_out_and_it_recomputes_later(prefix):
    sched = make_scheduler(num_blocks=4, block_size=4, max_tokens=64, prefix=prefix)
    a, b = make_requests(8, 8)
    sched.add(a.seqs[0]); sched.add(b.seqs[0])
    run_step(sched)  # both prefilled: 2 blocks each, pool full
    assert sched.blocks.num_free_blocks == 0
    run_step(sched)  # decode: a needs a third block at position 8 -> b is preempted
    assert sched.num_preemptions == 1
    assert b.seqs[0].status is SeqStatus.WAITING and b.seqs[0].num_computed_tokens == 0
    assert sched.waiting[0] is b.seqs[0]
    sched.finish(a.seqs[0])
    out = run_step(sched)
    assert out.scheduled[0].seq is b.seqs[0]
    # Recompute covers prompt + its generated token; with prefix caching the head block (freed last,
    # so evicted last) is still cached and only the rest is recomputed.
    assert out.scheduled[0].num_new_tokens == (5 if prefix else 9)
    sched.blocks.check_invariants()


def test_max_num_seqs_limits_the_running_set():
    sched = make_scheduler(num_blocks=64, max_num_seqs=2, max_tokens=100)
    for r in make_requests(3, 3, 3):
        sched.add(r.seqs[0])
    out = run_step(sched)
    assert len(out.scheduled) == 2 and len(sched.waiting) == 1


def test_bounded_waiting_queue_rejects_with_queue_full():
    sched = make_scheduler(max_waiting=2)
    reqs = make_requests(3, 3, 3)
    sched.add(reqs[0].seqs[0]); sched.add(reqs[1].seqs[0])
    with pytest.raises(QueueFullError):
        sched.add(reqs[2].seqs[0])


def test_waiting_prompt_that_does_not_fit_waits_without_preempting_others():
    sched = make_scheduler(num_blocks=4, block_size=4, max_tokens=64)
    a, b = make_requests(8, 12)
    sched.add(a.seqs[0]); sched.add(b.seqs[0])
    out = run_step(sched)
    assert [s.seq for s in out.scheduled] == [a.seqs[0]]
    assert sched.num_preemptions == 0


# --- logits rows and update_from_output ---------------------------------------------------------------
from services.common.sampling_params import SamplingParams  # noqa: E402
from services.engine.request import Request, SampledToken  # noqa: E402


def test_logit_rows_one_rule_for_sampling_and_prompt_logprobs():
    sched = make_scheduler(num_blocks=32, max_tokens=12)
    plain = Request("plain", None, [5, 6, 7], SamplingParams())
    lps = Request("lps", None, list(range(10, 20)), SamplingParams(prompt_logprobs=1))
    sched.add(plain.seqs[0]); sched.add(lps.seqs[0])
    out = sched.schedule()  # plain: 3 tokens, caught up; lps: 9 of its 10 (budget), not caught up
    (a, b) = out.scheduled
    assert (a.sample_row, a.prompt_logprob_rows) == (0, range(0))
    assert (b.sample_row, b.prompt_logprob_rows) == (None, range(1, 10))
    assert out.num_logit_rows == 10
    sched.update_from_output(out, {plain.seqs[0].seq_id: [SampledToken(1, -0.5)]}, now=1.0)
    out = sched.schedule()  # plain decodes; lps's last prompt token computes, is logged and samples
    (a, b) = out.scheduled
    assert (a.sample_row, b.prompt_logprob_rows, b.sample_row, out.num_logit_rows) == (0, range(1, 2), 1, 2)


def test_update_appends_applies_token_stops_and_forks_n_samples():
    sched = make_scheduler(num_blocks=32, max_tokens=64)
    sched.eos_token_ids = frozenset({2})
    n3 = Request("n3", None, [5, 6, 7, 8, 9], SamplingParams(n=3, max_tokens=4, stop_token_ids=[99], min_tokens=2))
    sched.add(n3.seqs[0])
    out = sched.schedule()
    root = n3.seqs[0]
    first = [SampledToken(2, -1.0), SampledToken(99, -2.0), SampledToken(41, -3.0)]
    touched = sched.update_from_output(out, {root.seq_id: first}, now=7.0)
    assert list(touched) == ["n3"] and n3.first_token_time == 7.0 and n3.first_scheduled_time == 7.0
    assert [s.index for s in n3.seqs] == [0, 1, 2] and [s.output_token_ids for s in n3.seqs] == [[2], [99], [41]]
    assert sched.running == n3.seqs  # siblings right after the root, in order; EOS / 99 before min_tokens: no stop
    assert all(s.num_computed_tokens == 5 for s in n3.seqs)
    tables = [sched.blocks.block_ids(s.seq_id) for s in n3.seqs]
    assert tables[0] == tables[1] == tables[2]  # the prompt's blocks are shared, not copied
    s0, s1, s2 = n3.seqs
    assert [s.cumulative_logprob for s in n3.seqs] == [-1.0, -2.0, -3.0]

    def step(tokens):
        out = sched.schedule()
        sched.update_from_output(out, {s.seq.seq_id: [SampledToken(tokens[s.seq.index], -0.5)]
                                       for s in out.scheduled}, now=8.0)

    step({0: 2, 1: 99, 2: 50})
    assert (s0.finish_reason, s0.stop_reason) == ("stop", None)  # EOS
    assert (s1.finish_reason, s1.stop_reason) == ("stop", 99)  # a stop token id
    assert s2.finish_reason is None and sched.running == [s2]
    step({2: 51})
    step({2: 52})
    assert (s2.finish_reason, s2.output_token_ids) == ("length", [41, 50, 51, 52])  # max_tokens
    assert n3.finished and not sched.running
    sched.blocks.check_invariants()
    assert sched.blocks.num_used_blocks() == 0


def test_context_length_ends_a_sequence():
    sched = make_scheduler(num_blocks=32, max_tokens=64)
    sched.config.max_model_len = 7
    r = Request("r", None, [5, 6, 7, 8, 9], SamplingParams(max_tokens=None, ignore_eos=True))
    sched.add(r.seqs[0])
    for t in (10, 11):
        out = sched.schedule()
        sched.update_from_output(out, {r.seqs[0].seq_id: [SampledToken(t, 0.0)]}, now=0.0)
    assert r.seqs[0].finish_reason == "length" and r.seqs[0].num_tokens == 7


# --- asynchronous scheduling: placeholders (docs/engine.md) --------------------------------------------
def test_placeholders_keep_decoding_drop_a_stopped_token_and_skip_a_sure_end():
    from services.engine.request import PENDING

    sched = make_scheduler(num_blocks=32, max_tokens=64)
    sched.eos_token_ids = frozenset({2})
    a = Request("a", None, [5, 6, 7], SamplingParams(max_tokens=2))
    b = Request("b", None, [8, 9], SamplingParams(max_tokens=8))
    for r in (a, b):
        sched.add(r.seqs[0])
    sa, sb = a.seqs[0], b.seqs[0]
    out1 = sched.schedule()
    sched.advance(out1, [sa, sb])  # launched; tokens still on the device
    assert sa.token_ids[-1] == sb.token_ids[-1] == PENDING and sa.num_pending == 1
    out2 = sched.schedule()  # scheduled before step 1 is resolved: each decodes its placeholder
    assert [(s.seq, s.num_new_tokens, s.sample_row) for s in out2.scheduled] == [(sa, 1, 0), (sb, 1, 1)]
    sched.advance(out2, [sa, sb])
    assert sa.num_pending == 2 and sa.num_output_tokens == 2
    # Step 1 resolves: b drew EOS, so its token of step 2 (in flight) must be dropped, never appended.
    touched = sched.resolve(out1, {sa.seq_id: [SampledToken(11, 0.0)], sb.seq_id: [SampledToken(2, 0.0)]}, now=1.0)
    assert set(touched) == {"a", "b"}
    assert (sb.finish_reason, sb.token_ids, sb.num_pending) == ("stop", [8, 9, 2], 0)
    assert sa.token_ids == [5, 6, 7, 11, PENDING] and sa.num_pending == 1
    # a's token in flight is its last by max_tokens: it is not scheduled again whatever that token is.
    assert not sched.schedule().scheduled
    touched = sched.resolve(out2, {sa.seq_id: [SampledToken(12, 0.0)], sb.seq_id: [SampledToken(13, 0.0)]}, now=2.0)
    assert set(touched) == {"a"} and sb.token_ids == [8, 9, 2]
    assert (sa.finish_reason, sa.token_ids) == ("length", [5, 6, 7, 11, 12])
    assert not sched.has_unfinished() and not sched.blocks.tables
    sched.blocks.check_invariants()


def test_a_sequence_preempted_with_its_token_in_flight_waits_for_it():
    sched = make_scheduler(num_blocks=32, max_tokens=64)
    r = Request("r", None, [5, 6, 7], SamplingParams(max_tokens=8))
    sched.add(r.seqs[0])
    seq = r.seqs[0]
    out = sched.schedule()
    sched.advance(out, [seq])
    sched._preempt(seq, out)  # the pool ran short while its token was in flight
    assert sched.waiting[0] is seq and not sched.schedule().scheduled  # not admitted with a placeholder
    sched.resolve(out, {seq.seq_id: [SampledToken(11, 0.0)]}, now=1.0)
    assert seq.token_ids == [5, 6, 7, 11] and seq.num_pending == 0
    again = sched.schedule()  # recomputed from scratch, its new token included
    assert [(s.seq, s.num_new_tokens) for s in again.scheduled] == [(seq, 4)]
