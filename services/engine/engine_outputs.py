"""What the engine hands out per request: its token delta since the last one, and its prompt logprobs.

Tokens only: text, stop strings and hold-back are services/common/output_processor.py's.
"""

from __future__ import annotations

import torch

from services.common.outputs import Logprob, RequestDelta, SequenceDelta
from services.engine.request import Request


def record_prompt_logprobs(req: Request, chunk_logits: torch.Tensor, start: int) -> None:
    """Append the prompt logprobs of positions start + 1 ... that `chunk_logits` (the chunk's rows)
    predict to req.prompt_logprobs, skipping those already recorded (before a preemption)."""
    seq = req.seqs[0]
    k = seq.params.prompt_logprobs
    lp = torch.log_softmax(chunk_logits, dim=-1)
    n_prompt = seq.num_prompt_tokens
    for j in range(chunk_logits.shape[0]):
        p = start + j + 1  # the logits at position p-1 predict token p
        if p >= n_prompt or len(req.prompt_logprobs) != p:
            continue  # past the prompt, or already recorded before a preemption
        tok = seq.token_ids[p]
        row = lp[j]
        entry = {tok: Logprob(row[tok].item(), int((row > row[tok]).sum().item()) + 1)}
        if k:
            vals, ids = row.topk(k)
            for r, (t, v) in enumerate(zip(ids.tolist(), vals.tolist())):
                entry.setdefault(t, Logprob(v, r + 1))
        req.prompt_logprobs.append(entry)


def request_delta(req: Request) -> RequestDelta:
    """What `req` produced since its last delta: new tokens and logprobs per sequence, finish
    reasons once, prompt logprobs once (`finished` once it has ended: the engine then forgets it)."""
    seqs = []
    for s in req.seqs:
        n_out = s.num_resolved_output_tokens  # a placeholder in flight is not a token yet
        new = n_out - s.num_emitted_tokens
        report_finish = s.finish_reason is not None and not s.finish_emitted
        if new <= 0 and not report_finish:
            continue
        first = s.num_prompt_tokens + s.num_emitted_tokens
        seqs.append(SequenceDelta(
            index=s.index, token_ids=s.token_ids[first:s.num_prompt_tokens + n_out], cumulative_logprob=s.cumulative_logprob,
            logprobs=None if s.logprobs is None else s.logprobs[s.num_emitted_tokens:n_out],
            finish_reason=s.finish_reason if report_finish else None,
            stop_token_id=s.stop_reason if report_finish else None))
        s.num_emitted_tokens = n_out
        s.finish_emitted = s.finish_emitted or report_finish
    finished = req.aborted or req.finished
    prompt_lps = None
    if req.prompt_logprobs is not None and seqs and not req.prompt_logprobs_emitted:
        prompt_lps, req.prompt_logprobs_emitted = req.prompt_logprobs, True
    return RequestDelta(request_id=req.request_id, sequences=seqs, finished=finished, prompt_logprobs=prompt_lps,
                        num_cached_tokens=req.seqs[0].num_cached_tokens, arrival_time=req.arrival_time,
                        first_scheduled_time=req.first_scheduled_time, first_token_time=req.first_token_time)
