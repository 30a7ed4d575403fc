"""Steps both endpoints share: request -> SamplingParams, the context-limit check, accumulating
choices for a JSON body, and the small pieces of a response (usage, SSE framing, stop_reason)."""

from __future__ import annotations

import json

from services.common.errors import InvalidArgument
from services.common.outputs import Logprob
from services.common.sampling_params import SamplingParams
from services.router.core import Chunk
from services.router.openai.protocol import GenerationRequest
from services.router.openai.run import Run
from services.router.openai.structured import structured_outputs


def sampling_params(r: GenerationRequest, max_tokens: int | None, logprobs: int | None,
                    prompt_logprobs: int | None = None, structured=None) -> SamplingParams:
    """`structured`: a StructuredOutputs that wins over the request's own fields (tool calling's)."""
    if r.stream_options is not None and not r.stream:
        raise InvalidArgument("stream_options: only allowed when stream is true")
    return SamplingParams(
        n=r.n, temperature=1.0 if r.temperature is None else r.temperature,
        top_p=1.0 if r.top_p is None else r.top_p, top_k=-1 if r.top_k in (None, 0) else r.top_k,
        min_p=r.min_p or 0.0, repetition_penalty=1.0 if r.repetition_penalty is None else r.repetition_penalty,
        presence_penalty=r.presence_penalty or 0.0, frequency_penalty=r.frequency_penalty or 0.0, seed=r.seed,
        max_tokens=max_tokens, min_tokens=r.min_tokens, stop=r.stop, stop_token_ids=r.stop_token_ids,
        ignore_eos=r.ignore_eos, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
        skip_special_tokens=r.skip_special_tokens, include_stop_str_in_output=r.include_stop_str_in_output,
        logit_bias=_logit_bias(r.logit_bias), structured_outputs=structured or structured_outputs(r),
        use_beam_search=r.use_beam_search, best_of=r.best_of, length_penalty=r.length_penalty,
        early_stopping=r.early_stopping)


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI's logit_bias has token ids as JSON object keys (strings)."""
    if not bias:
        return None
    try:
        return {int(k): v for k, v in bias.items()}
    except ValueError:
        raise InvalidArgument("logit_bias: keys must be token ids") from None


GRAMMAR_DEAD_END = "grammar_dead_end"
"""stop_reason beside finish_reason "error": the request's grammar allowed no next token (docs/structured-output.md)."""


def stop_reason(params: SamplingParams, reason: str | int | None, finish_reason: str | None = None) -> str | int | None:
    """Like vLLM: the stop string or a requested stop token id; EOS is None. A sequence the engine ended
    with "error" (the only cause today: a structured-output dead end) says why."""
    if finish_reason == "error":
        return GRAMMAR_DEAD_END
    if isinstance(reason, int) and reason not in params.stop_token_ids:
        return None
    return reason


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens}


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class Choice:
    """One choice's output as it accumulates (for a JSON body)."""

    def __init__(self):
        self.text = ""
        self.token_ids: list[int] = []
        self.logprobs: list[dict[int, Logprob] | None] = []
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None


class Collected:
    """A whole run accumulated: choices by index (prompt × n + i), each prompt's first and last chunk."""

    def __init__(self, n: int, num_prompts: int):
        self.n = n
        self.choices = {i: Choice() for i in range(n * num_prompts)}
        self.finals: list[Chunk] = []
        self.firsts: dict[int, Chunk] = {}

    @classmethod
    async def of(cls, run: Run, n: int, num_prompts: int) -> Collected:
        out = cls(n, num_prompts)
        async for p, chunk in run.chunks():
            out.add(p, chunk)
        return out

    def add(self, p: int, chunk: Chunk) -> None:
        if chunk.prompt_token_ids is not None:
            self.firsts[p] = chunk
        for c in chunk.choices:
            ch = self.choices[p * self.n + c.index]
            ch.text += c.text
            ch.token_ids += c.token_ids
            if c.logprobs is not None:
                ch.logprobs += c.logprobs
            if c.finish_reason is not None:
                ch.finish_reason, ch.stop_reason = c.finish_reason, c.stop_reason
        if chunk.finished:
            self.finals.append(chunk)

    def usage(self) -> dict:
        return usage(sum(f.usage.prompt_tokens for f in self.finals), sum(f.usage.completion_tokens for f in self.finals))
