"""Beam search inside the engine: the beams are sequences that fork on shared KV blocks.

The algorithm is the one transformers' `generate(num_beams=W, do_sample=False)` runs, so the results
match it token for token (tests/test_beam_search.py). A request keeps up to W live beams, each a
Sequence holding blocks. Once every live beam's log-probabilities for its next position are known,
one beam step runs:

  1. each live beam b proposes its K most likely next tokens t, scored cum(b) + logprob(t | b);
     the K best proposals over all beams are kept, best first (K = 2W with one EOS token, so that
     W survive even if W of them end);
  2. a proposal that ends its beam (EOS unless ignore_eos, or max_tokens / max_model_len reached) is
     a finished hypothesis if it ranks among the W best proposals, scored
     cum / generated_len ** length_penalty (EOS counted); only the W best hypotheses are kept;
  3. the W best proposals that do not end become the next live beams. A beam with one surviving
     child keeps its sequence and appends the token; with k > 1 children it is first forked k - 1
     times (`Scheduler.fork` -> `BlockManager.fork`: every block shared, the partly filled last one
     copied on the next write); a beam with no child is freed. The prompt is never recomputed;
  4. the search stops when no proposal can continue, or per `early_stopping` (transformers'
     semantics): True once W hypotheses are finished; False (default) once W are finished and the
     best live beam's score at its current length cannot beat the worst of them; "never" likewise
     but scored at max_tokens when length_penalty > 0.

The output is the finished hypotheses, best score first; `cumulative_logprob` is the plain sum. The
engine reports them as token deltas; their text is the output processor's, like any other output's.

Beams wait for each other: a beam whose logits arrived while a sibling was left out of the step (token
budget) or preempted sits idle, holding its blocks, until the sibling catches up. A beam preempted while
idle keeps its proposals; its children then start in the waiting queue and are recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.engine.request import Request, Sequence, SeqStatus
from services.common.sampling_params import BeamSearchParams, SamplingParams


def sampling_params_for(params: BeamSearchParams) -> SamplingParams:
    """What the rest of the engine sees of a beam request: greedy-looking, one sequence, no extras."""
    return SamplingParams(n=1, temperature=0.0, max_tokens=params.max_tokens, ignore_eos=params.ignore_eos)


@dataclass
class Hypothesis:
    token_ids: list[int]
    """Generated tokens, the ending one (EOS) included."""
    cumulative_logprob: float
    score: float
    finish_reason: str


class BeamSearch:
    """The beam state of one request; the engine feeds it logits and calls `advance` after each step."""

    def __init__(self, request: Request, params: BeamSearchParams, scheduler, eos_token_ids: frozenset[int],
                 max_model_len: int):
        self.request = request
        self.params = params
        self.scheduler = scheduler
        self.eos_token_ids = frozenset() if params.ignore_eos else eos_token_ids
        self.max_model_len = max_model_len
        self.live: list[Sequence] = list(request.seqs)
        self.root = request.seqs[0]
        # Enough proposals per step that W survive even if every beam's EOS tokens are among them.
        self.num_proposals = max(2, 1 + len(self.eos_token_ids)) * params.beam_width
        self.proposals: dict[int, tuple[list[float], list[int]]] = {}
        """seq_id -> the beam's best (logprob, token) pairs for its next position."""
        self.finished: list[Hypothesis] = []
        self.done = False

    # --- fed by the engine --------------------------------------------------------------------------
    def add_logits(self, seq: Sequence, logits: torch.Tensor) -> None:
        """`seq` caught up: `logits` [vocab] predict its next token."""
        x = logits.float()
        if self.params.temperature > 0:
            x = x / self.params.temperature
        k = min(self.num_proposals, x.shape[-1])
        vals, ids = torch.log_softmax(x, dim=-1).topk(k)
        self.proposals[seq.seq_id] = (vals.tolist(), ids.tolist())

    def advance(self) -> bool:
        """Run a beam step if every live beam has its proposals. True once the search is over (then
        `request.seqs` holds the finished hypotheses as finished sequences, best first)."""
        if self.done or any(s.seq_id not in self.proposals for s in self.live):
            return False
        W = self.params.beam_width
        cands = []  # (total, rank within beam, beam index, token): ties fall to the better beam
        for b, seq in enumerate(self.live):
            vals, ids = self.proposals.pop(seq.seq_id)
            cands += [(seq.cumulative_logprob + v, r, b, t) for r, (v, t) in enumerate(zip(vals, ids))]
        cands.sort(key=lambda c: (-c[0], c[2], c[1]))
        cands = cands[:self.num_proposals]

        n_prompt = self.live[0].num_prompt_tokens
        gen_len = self.live[0].num_output_tokens + 1  # live beams are always equally long
        at_limit = gen_len >= self.params.max_tokens or n_prompt + gen_len >= self.max_model_len
        survivors = []
        for rank, (total, _, b, tok) in enumerate(cands):
            if at_limit or tok in self.eos_token_ids:
                if rank < W:
                    self._add_hypothesis(self.live[b].output_token_ids + [tok], total, gen_len,
                                         "length" if at_limit and tok not in self.eos_token_ids else "stop")
            elif len(survivors) < W:
                survivors.append((total, b, tok))

        self.live = self._regroup(survivors)
        if not self.live or self._cannot_improve(gen_len):
            self._finish()
        return self.done

    # --- the step's pieces ------------------------------------------------------------------------------
    def _add_hypothesis(self, token_ids: list[int], total: float, gen_len: int, reason: str) -> None:
        score = total / gen_len ** self.params.length_penalty
        self.finished.append(Hypothesis(token_ids, total, score, reason))
        self.finished.sort(key=lambda h: -h.score)
        del self.finished[self.params.beam_width:]

    def _regroup(self, survivors: list[tuple[float, int, int]]) -> list[Sequence]:
        """Turn the surviving (score, parent beam, token) triples into sequences, best first: fork a
        parent once per extra child before any token is appended, free parents with no child."""
        children: dict[int, list[int]] = {}
        for i, (_, b, _) in enumerate(survivors):
            children.setdefault(b, []).append(i)
        new: list[Sequence | None] = [None] * len(survivors)
        for b, parent in enumerate(self.live):
            kids = children.get(b)
            if not kids:
                self.scheduler.finish(parent)
                continue
            for i in kids[1:]:
                child = Sequence(self.request, 0, list(parent.token_ids), parent.num_prompt_tokens,
                                 cumulative_logprob=parent.cumulative_logprob)
                self.scheduler.fork(parent, child)
                new[i] = child
            new[kids[0]] = parent
        for seq, (total, _, tok) in zip(new, survivors):
            seq.token_ids.append(tok)
            seq.cumulative_logprob = total
        for i, seq in enumerate(new):
            seq.index = i
        self.request.seqs = new
        return new

    def _cannot_improve(self, gen_len: int) -> bool:
        p = self.params
        if len(self.finished) < p.beam_width:
            return False
        if p.early_stopping is True:
            return True
        length = p.max_tokens if p.early_stopping == "never" and p.length_penalty > 0 else gen_len
        best_live = self.live[0].cumulative_logprob / length ** p.length_penalty
        return best_live <= self.finished[-1].score

    def _finish(self) -> None:
        """Free the live beams and replace the request's sequences with the finished hypotheses."""
        for seq in self.live:
            self.scheduler.finish(seq)
        req = self.request
        n_prompt = len(req.prompt_token_ids)
        outs = []
        for i, h in enumerate(self.finished[:self.params.n or self.params.beam_width]):
            s = Sequence(req, i, list(req.prompt_token_ids) + h.token_ids, n_prompt,
                         status=SeqStatus.FINISHED, cumulative_logprob=h.cumulative_logprob,
                         finish_reason=h.finish_reason, num_cached_tokens=self.root.num_cached_tokens)
            outs.append(s)
        req.seqs = outs
        self.live = []
        self.done = True
