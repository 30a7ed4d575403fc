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
