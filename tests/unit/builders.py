"""Small builders for scheduler / block-manager tests (no torch)."""

from services.engine.block_manager import BlockManager
from services.engine.request import Request
from services.common.sampling_params import SamplingParams
from services.engine.scheduler import Scheduler, SchedulerConfig


def make_scheduler(num_blocks=16, block_size=4, max_num_seqs=8, max_tokens=64, max_waiting=None, prefix=True):
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=prefix)
    return Scheduler(SchedulerConfig(max_num_seqs, max_tokens, max_waiting), bm)


def make_requests(*prompt_lens, n=1, start_token=100):
    reqs = []
    for i, L in enumerate(prompt_lens):
        ids = [start_token + 1000 * i + j for j in range(L)]
        reqs.append(Request(f"r{i}", None, ids, SamplingParams(n=n, max_tokens=8)))
    return reqs


def run_step(sched):
    """Schedule one step and pretend the model ran: advance sequences; caught-up ones get a token."""
    out = sched.schedule()
    sched.after_step(out)
    for s in out.scheduled:
        seq = s.seq
        if seq.num_computed_tokens == seq.num_tokens:
            seq.token_ids.append(7)
    return out
