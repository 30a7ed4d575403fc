"""A launched step whose tokens are still on the device, and how its rows map to sequences.

With asynchronous scheduling (docs/engine.md) a step is launched in one `LLMEngine.step` and resolved in the next:
`sample_step` picks the rows to sample and samples them on the device, recording the step as an `InFlight`;
the next step's inputs read the tokens still on the device where a sequence holds a placeholder
(`fill_pending_inputs`); once read back, `sampled_by_seq` gives each sequence its tokens.
"""

from __future__ import annotations

import dataclasses

import torch

from services.engine.engine_outputs import record_prompt_logprobs
from services.engine.request import Request, SampledToken, SeqStatus
from services.engine.sampler import DeviceSample, Sampler, device_tensor
from services.engine.scheduler_output import SchedulerOutput
from services.engine.structured import GrammarBackend


@dataclasses.dataclass
class InFlight:
    """A launched step whose sampled tokens have not been read back yet."""

    out: SchedulerOutput
    sample: DeviceSample | None
    seqs: list
    """The sequence of each sampled row (a prompt forking into n samples appears n times)."""
    placeholders: list
    """Sequences holding a placeholder for this step's token (each knows its row: `pending_row`)."""
    beam_reqs: list
    needs_sync: bool
    """The next schedule needs these tokens on the host (forks, beams, grammars, penalties)."""
    ended: dict = dataclasses.field(default_factory=dict)
    """seq_id -> (sequence, finish reason): rows the grammar ends instead of sampling (GrammarBackend.fill)."""
    forks: bool = False
    """Some prompt forks into its n samples in this step (its rows repeat one sequence)."""
    advance_deferred: bool = False
    """A steady step whose rows are those of the step before it: launched without advancing its
    sequences; resolving the step before advances them in the same pass (Scheduler.resolve_steady)."""

    @property
    def rows_are_placeholders(self) -> bool:
        """Row i of the sampled tokens is `placeholders[i]`'s token, for every row (nothing forks or ends)."""
        return self.placeholders is self.seqs


def sample_step(out: SchedulerOutput, logits: torch.Tensor, sampler: Sampler,
                grammar: GrammarBackend | None, eos_token_ids: frozenset[int]) -> InFlight:
    """Record prompt logprobs, feed beams their rows and sample the rest, reading the rows the
    scheduler assigned. A request whose prompt just completed samples all n of its sequences
    from its row (the scheduler forks the siblings when it resolves them). A row whose grammar
    ends its sequence instead (GrammarBackend.fill) is sampled with the rest and its token dropped."""
    seqs, rows = [], []
    fork_index: dict[int, int] = {}  # row -> sample index, for the n rows of a prompt forking now
    beam_reqs: dict[str, Request] = {}
    ended: dict[int, tuple] = {}
    needs_sync = False
    finished = SeqStatus.FINISHED
    for s in out.scheduled:
        row = s.sample_row
        if s.prompt_logprob_rows:
            r = s.prompt_logprob_rows
            record_prompt_logprobs(s.seq.request, logits[r.start:r.stop].float(), s.seq.num_computed_tokens)
        if row is None:
            continue
        seq = s.seq
        if seq.status is finished:  # (by the step before, resolved early in _launch)
            continue
        req = seq.request
        if req.plain:  # one sequence, no beam, no penalties: the common row
            seq.pending_row = len(seqs)
            seqs.append(seq)
            rows.append(row)
            continue
        if req.beam is not None:  # beam search picks the tokens (beam_search.py)
            req.beam.add_logits(seq, logits[row].float())
            beam_reqs[req.request_id] = req
            needs_sync = True
            continue
        params = req.params
        needs_sync = needs_sync or params.has_penalties  # penalties read the output ids on the host
        forks = params.n - len(req.seqs)
        if forks:
            needs_sync = True  # the siblings are forked on the host once the token is read
            for i in range(seq.index, seq.index + 1 + forks):
                fork_index[len(seqs)] = i
                seqs.append(seq)
                rows.append(row)
            continue
        seq.pending_row = len(seqs)
        seqs.append(seq)
        rows.append(row)
    placeholders = seqs if not fork_index else [seq for i, seq in enumerate(seqs) if i not in fork_index]
    sample = None
    if seqs:
        if rows != list(range(logits.shape[0])):  # decode-only steps sample every row as is
            logits = logits[device_tensor(rows, logits.device)]
        bitmask, end_rows = (grammar.fill(seqs) if grammar is not None and grammar.active
                             else (None, {}))
        # The next step reads this token back before its masks (_launch); a sequence the grammar
        # ends now holds no placeholder, so the next schedule must see it finished.
        needs_sync = needs_sync or bool(end_rows)
        indexes = [fork_index.get(i, seq.index) for i, seq in enumerate(seqs)] if fork_index else None
        sample = sampler.sample(logits, seqs, eos_token_ids, indexes, bitmask)
        if end_rows:  # they end without a token: no placeholder for one (their rows' samples are dropped)
            for i in end_rows:
                ended[seqs[i].seq_id] = (seqs[i], end_rows[i])
            placeholders = [seq for seq in placeholders if seq.seq_id not in ended]
    return InFlight(out, sample, seqs, placeholders, list(beam_reqs.values()), needs_sync, ended,
                     forks=bool(fork_index))


def fill_pending_inputs(out: SchedulerOutput, inputs, prev: InFlight) -> None:
    """Input positions holding a placeholder take the token `prev` sampled, on the device. Such a
    sequence was caught up, so its one new token is its placeholder (its first input position);
    `Sequence.pending_row` is its row of `prev`'s tokens."""
    tokens = prev.sample.tokens
    if (prev.rows_are_placeholders and out.num_tokens == len(out.seqs) == tokens.shape[0]
            and out.seqs == prev.placeholders):  # the same decode batch as before, in order
        inputs.input_ids.copy_(tokens)
        return
    dst, src, off = [], [], 0
    for s in out.scheduled:
        seq = s.seq
        if seq.num_pending:
            dst.append(off)
            src.append(seq.pending_row)
        off += s.num_new_tokens
    if not dst:
        return
    if len(dst) == off == tokens.shape[0] and dst == src:  # every row in place
        inputs.input_ids.copy_(tokens)
        return
    idx = device_tensor([dst, src], inputs.input_ids.device, torch.long)
    inputs.input_ids[idx[0]] = tokens[idx[1]]


def sampled_by_seq(f: InFlight, result) -> dict[int, list[SampledToken]]:
    """seq_id -> its sampled tokens (n of them for a prompt forking into n samples), rows the
    grammar ended left out."""
    sampled: dict[int, list[SampledToken]] = {}
    if result is None:
        return sampled
    ended = f.ended
    top = result.top or [None] * len(f.seqs)
    for seq, tok, lp, t in zip(f.seqs, result.token_ids, result.logprobs, top):
        if ended and seq.seq_id in ended:
            continue
        sampled.setdefault(seq.seq_id, []).append(SampledToken(tok, lp, t))
    return sampled
