"""The one owner of text: turns the engine's token deltas into what a user sees.

The engine speaks tokens only (it stops on EOS, stop token ids and lengths). Everything about text
lives here, used by the offline `LLM` (over a local tokenizer) and by the router (over the text its
detokenizer gives: in its own process, or the tokenizer service's stream):

- `TextStream`: one sequence's visible text. Stop strings are searched only where the newest text
  (plus the longest stop string's reach back) can complete one, and the last `max_stop_len - 1`
  characters are held back until they can no longer begin one, so text once shown is never taken back.
- `SequenceText`: a `TextStream` fed by incremental detokenization over a local tokenizer.
- `fill_token_text`: the text shown beside a logprob.
- `OutputProcessor`: accumulates `RequestDelta`s into `RequestOutput`s for the offline API.

Every per-token cost here is bounded by the newest piece and the longest stop string, never by the
text already generated, so a stream's cost is linear in its length.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from services.common.outputs import CompletionOutput, Logprob, RequestDelta, RequestOutput, SequenceDelta
from services.common.sampling_params import SamplingParams
from services.common.tokenizer import IncrementalDetokenizer, Tokenizer


class TextStream:
    """One sequence's visible text: stop strings (SamplingParams.find_stop), hold-back,
    include_stop_str_in_output, min_tokens."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.stop_string: str | None = None
        """The stop string that ended the text, once one has."""
        self._hold = max(0, params.max_stop_len - 1)
        self._pending = ""  # seen but not released: at most `_hold` characters plus the newest piece
        self._released: list[str] = []

    @property
    def text(self) -> str:
        """Everything released so far."""
        if len(self._released) > 1:
            self._released = ["".join(self._released)]
        return self._released[0] if self._released else ""

    def add(self, text: str, num_output_tokens: int, check_stop: bool = True) -> str:
        """Feed newly detokenized text (of the tokens so far = num_output_tokens); returns text that may
        be shown now. After a stop-string hit returns the last piece (cut per include_stop_str_in_output)
        and sets .stop_string; later calls return "". `check_stop=False` feeds text that must not end
        the sequence (that of the EOS or stop token that already ended it)."""
        if self.stop_string is not None or not text:
            return ""
        p = self.params
        pending = self._pending + text
        if check_stop and p.stop and num_output_tokens >= p.min_tokens:
            # The pending text starts exactly where find_stop's reach back into the old text begins.
            hit = p.find_stop(pending, len(text))
            if hit is not None:
                i, s = hit
                self.stop_string = s
                self._pending = ""
                return self._release(pending[:i + len(s)] if p.include_stop_str_in_output else pending[:i])
        keep = min(self._hold, len(pending))
        self._pending = pending[len(pending) - keep:]
        return self._release(pending[:len(pending) - keep])

    def flush(self) -> str:
        """End of sequence (not after a stop hit): release the held-back text."""
        pending, self._pending = self._pending, ""
        return self._release(pending)

    def _release(self, piece: str) -> str:
        if piece:
            self._released.append(piece)
        return piece


class SequenceText:
    """One sequence's text from its token ids over a local tokenizer.

    `incremental` decodes as tokens arrive (streaming, or stop strings to find); otherwise the text is
    decoded once, from all the tokens, when the sequence ends (cheaper, and the offline API needs no more).
    """

    def __init__(self, tokenizer: Tokenizer | None, params: SamplingParams, incremental: bool):
        self.tokenizer = tokenizer
        self.params = params
        self.stream = TextStream(params)
        self._detok = IncrementalDetokenizer(tokenizer, params.skip_special_tokens) \
            if tokenizer is not None and incremental else None

    @property
    def text(self) -> str:
        return self.stream.text

    @property
    def stop_string(self) -> str | None:
        return self.stream.stop_string

    def add(self, token_ids: list[int], num_output_tokens: int, check_stop: bool = True) -> str:
        """New tokens (the sequence now has num_output_tokens); returns the text that may be shown now."""
        if self._detok is None:
            return ""
        return self.stream.add(self._detok.add(token_ids), num_output_tokens, check_stop)

    def finish(self, output_token_ids: list[int], num_output_tokens: int) -> str:
        """The sequence ended without a stop string: release everything left."""
        if self.stream.stop_string is not None or self.tokenizer is None:
            return ""
        if self._detok is None:
            text = self.tokenizer.decode(output_token_ids, self.params.skip_special_tokens)
            return self.stream.add(text, num_output_tokens, check_stop=False) + self.stream.flush()
        return self.stream.add(self._detok.flush(), num_output_tokens, check_stop=False) + self.stream.flush()


def fill_token_text(tokenizer: Tokenizer | None, entries: list[dict[int, Logprob] | None] | None) -> None:
    """Set `decoded_token` (each token's own text, lone bytes of a multi-byte character kept raw) on
    logprob entries that lack it."""
    if tokenizer is None or not entries:
        return
    for entry in entries:
        for token_id, lp in (entry or {}).items():
            if lp.decoded_token is None:
                lp.decoded_token = tokenizer.decode_token(token_id)


@dataclass
class _SeqState:
    index: int
    text: SequenceText
    token_ids: list[int] = field(default_factory=list)
    logprobs: list | None = None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class _RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: dict[int, _SeqState] = field(default_factory=dict)
    prompt_logprobs: list | None = None
    finished: bool = False


class OutputProcessor:
    """Accumulates the engine's per-step deltas into RequestOutputs over a local tokenizer (the
    offline API). A stop string ends a sequence here; `process` reports which, so the caller stops
    them in the engine before its next step.

    Not streaming, a request's one output comes when it finishes, holding everything. Streaming,
    every delta gives an output holding only what is new (text, token ids, logprobs since the last
    one, like vLLM's DELTA outputs), so a long stream costs linear time."""

    def __init__(self, tokenizer: Tokenizer | None, stream: bool = False):
        self.tokenizer = tokenizer
        self.stream = stream
        self.requests: dict[str, _RequestState] = {}

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams) -> None:
        """`params` decide the text (stop strings, skip_special_tokens, min_tokens) and the number of
        sequences to expect (n)."""
        self.requests[request_id] = _RequestState(request_id, prompt, list(prompt_token_ids), params)

    def abort_request(self, request_id: str) -> None:
        self.requests.pop(request_id, None)

    def process(self, delta: RequestDelta) -> tuple[RequestOutput | None, list[int]]:
        """Apply one delta. Returns (the request's output, the indexes of sequences a stop string just
        ended). The output is None unless the request finished or the processor streams."""
        req = self.requests.get(delta.request_id)
        if req is None:
            return None, []
        if delta.prompt_logprobs is not None:
            req.prompt_logprobs = delta.prompt_logprobs
            fill_token_text(self.tokenizer, req.prompt_logprobs)
        stopped, fresh = [], []
        for d in delta.sequences:
            seq = req.seqs.get(d.index)
            if seq is None:
                incremental = self.stream or bool(req.params.stop)
                seq = req.seqs[d.index] = _SeqState(d.index, SequenceText(self.tokenizer, req.params, incremental))
            if seq.finish_reason is not None:
                continue  # ended by a stop string here: the engine's later news about it is moot
            piece = self._apply(seq, d)
            if seq.stop_reason is not None and isinstance(seq.stop_reason, str):
                stopped.append(d.index)
            fresh.append((seq, d, piece))
        req.finished = delta.finished or (
            len(req.seqs) >= req.params.n and all(s.finish_reason is not None for s in req.seqs.values()))
        out = None
        if self.stream:
            out = self._delta_output(req, delta, fresh)
        elif req.finished:
            out = self._output(req, delta)
        if req.finished:
            del self.requests[req.request_id]
        return out, stopped

    def _apply(self, seq: _SeqState, d: SequenceDelta) -> str:
        """Fold one sequence delta in; returns the text it makes visible."""
        seq.token_ids.extend(d.token_ids)
        seq.cumulative_logprob = d.cumulative_logprob
        if d.logprobs is not None:
            fill_token_text(self.tokenizer, d.logprobs)
            if seq.logprobs is None:
                seq.logprobs = []
            seq.logprobs.extend(d.logprobs)
        n = len(seq.token_ids)
        # The EOS or stop token that ended the sequence is not searched for stop strings.
        ended_by_token = d.finish_reason == "stop"
        piece = seq.text.add(d.token_ids, n, check_stop=not ended_by_token)
        if seq.text.stop_string is not None:
            seq.finish_reason, seq.stop_reason = "stop", seq.text.stop_string
        elif d.finish_reason is not None:
            seq.finish_reason, seq.stop_reason = d.finish_reason, d.stop_token_id
            piece += seq.text.finish(seq.token_ids, n)
        return piece

    def _request_output(self, req: _RequestState, delta: RequestDelta, outs: list[CompletionOutput],
                        prompt_logprobs) -> RequestOutput:
        return RequestOutput(
            request_id=req.request_id, prompt=req.prompt, prompt_token_ids=req.prompt_token_ids,
            prompt_logprobs=prompt_logprobs, outputs=outs, finished=req.finished,
            num_cached_tokens=delta.num_cached_tokens,
            metrics={"arrival_time": delta.arrival_time, "first_scheduled_time": delta.first_scheduled_time,
                     "first_token_time": delta.first_token_time})

    def _output(self, req: _RequestState, delta: RequestDelta) -> RequestOutput:
        outs = [CompletionOutput(index=s.index, text=s.text.text, token_ids=list(s.token_ids),
                                 cumulative_logprob=s.cumulative_logprob, logprobs=s.logprobs,
                                 finish_reason=s.finish_reason, stop_reason=s.stop_reason)
                for s in sorted(req.seqs.values(), key=lambda s: s.index)]
        return self._request_output(req, delta, outs, req.prompt_logprobs)

    def _delta_output(self, req: _RequestState, delta: RequestDelta, fresh) -> RequestOutput:
        outs = [CompletionOutput(index=seq.index, text=piece, token_ids=list(d.token_ids),
                                 cumulative_logprob=seq.cumulative_logprob,
                                 logprobs=None if d.logprobs is None else list(d.logprobs),
                                 finish_reason=seq.finish_reason, stop_reason=seq.stop_reason)
                for seq, d, piece in fresh]
        return self._request_output(req, delta, outs, delta.prompt_logprobs)
