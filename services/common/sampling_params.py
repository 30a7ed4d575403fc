"""Per-request generation settings, validated at construction (vLLM's names and defaults)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from services.common.structured_output import StructuredOutputs

_GREEDY_EPS = 1e-5
_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")


@dataclass
class SamplingParams:
    n: int = 1
    """Number of sequences sampled for the prompt (they share the prompt's KV blocks)."""
    temperature: float = 1.0
    """0 means greedy; otherwise logits are divided by it."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p, in (0, 1]."""
    top_k: int = -1
    """Keep the k most likely tokens; -1 (or 0 is rejected) keeps all."""
    min_p: float = 0.0
    """Drop tokens less likely than min_p times the most likely one, in [0, 1]."""
    repetition_penalty: float = 1.0
    """> 1 discourages tokens already in the prompt or output (CTRL-style), > 0."""
    presence_penalty: float = 0.0
    """Subtracted once from the logit of every token already generated, in [-2, 2]."""
    frequency_penalty: float = 0.0
    """Subtracted per occurrence from the logit of generated tokens, in [-2, 2]."""
    seed: int | None = None
    """Per-request seed: the same seed gives the same samples whatever else shares the batch."""
    max_tokens: int | None = 16
    """Most tokens to generate; None means up to the model's context length."""
    min_tokens: int = 0
    """EOS and stop token ids are suppressed until this many tokens are generated."""
    stop: list[str] | str | None = None
    """Strings that end generation; they are not included in the returned text."""
    stop_token_ids: list[int] | None = None
    """Token ids that end generation (kept in token_ids, like EOS)."""
    ignore_eos: bool = False
    """Keep generating past EOS."""
    logprobs: int | None = None
    """Return this many top alternatives (plus the sampled token) per generated token."""
    prompt_logprobs: int | None = None
    """Return this many top alternatives per prompt token."""
    skip_special_tokens: bool = True
    """Leave special tokens out of the returned text."""
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None
    """Added to the logits of these token ids before sampling, each in [-100, 100] (OpenAI's logit_bias)."""
    structured_outputs: StructuredOutputs | None = None
    """Constrain the output to a JSON schema, any JSON object, a regex, a choice or a grammar."""
    use_beam_search: bool = False
    """vLLM's beam search extra parameter: keep best_of (default n) beams on shared KV blocks and return
    the n best finished ones, best first (services/engine/beam_search.py). The engine reports them once,
    when the search ends. Sampling-only fields (top_p/top_k/min_p, penalties, logit_bias, seed), stop
    strings, min_tokens, logprobs and structured output are refused with it."""
    best_of: int | None = None
    """With use_beam_search: the beam width (>= n; default n). Without it: None or n."""
    length_penalty: float = 1.0
    """With use_beam_search: a finished beam scores cumulative logprob / length ** length_penalty."""
    early_stopping: bool | str = False
    """With use_beam_search: when the search ends (transformers' meaning, see BeamSearchParams)."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self._validate()

    def _validate(self) -> None:
        def bad(name: str, value, allowed: str):
            raise ValueError(f"{name} must be {allowed}, got {value!r}")

        if not isinstance(self.n, int) or isinstance(self.n, bool) or self.n < 1:
            bad("n", self.n, "an integer >= 1")
        for name in _FLOAT_FIELDS:  # NaN passes every range check below; infinities some
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                bad(name, v, "a finite number")
        if self.temperature < 0:
            bad("temperature", self.temperature, ">= 0")
        if not 0 < self.top_p <= 1:
            bad("top_p", self.top_p, "in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k == 0 or self.top_k < -1:
            bad("top_k", self.top_k, "-1 (disabled) or an integer >= 1")
        if not 0 <= self.min_p <= 1:
            bad("min_p", self.min_p, "in [0, 1]")
        if self.repetition_penalty <= 0:
            bad("repetition_penalty", self.repetition_penalty, "> 0")
        if not -2 <= self.presence_penalty <= 2:
            bad("presence_penalty", self.presence_penalty, "in [-2, 2]")
        if not -2 <= self.frequency_penalty <= 2:
            bad("frequency_penalty", self.frequency_penalty, "in [-2, 2]")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            bad("max_tokens", self.max_tokens, "an integer >= 1")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            bad("min_tokens", self.min_tokens, "an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", self.min_tokens, f"<= max_tokens ({self.max_tokens})")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= 20):
            bad("logprobs", self.logprobs, "an integer in [0, 20]")
        if self.prompt_logprobs is not None and (
            not isinstance(self.prompt_logprobs, int) or not 0 <= self.prompt_logprobs <= 20
        ):
            bad("prompt_logprobs", self.prompt_logprobs, "an integer in [0, 20]")
        if self.seed is not None and not isinstance(self.seed, int):
            bad("seed", self.seed, "an integer")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                bad("stop", self.stop, "a list of non-empty strings")
        for t in self.stop_token_ids:
            if not isinstance(t, int) or t < 0:
                bad("stop_token_ids", self.stop_token_ids, "a list of non-negative integers")
        if self.logit_bias is not None and len(self.logit_bias) > 1024:
            bad("logit_bias", f"{len(self.logit_bias)} entries", "at most 1024 entries")
        for t, b in (self.logit_bias or {}).items():
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                bad("logit_bias", t, "keyed by non-negative token ids")
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not -100 <= b <= 100:
                bad("logit_bias", b, "in [-100, 100] for each token")
        if self.best_of is not None and (isinstance(self.best_of, bool) or not isinstance(self.best_of, int)
                                         or self.best_of < self.n):
            bad("best_of", self.best_of, f"an integer >= n ({self.n})")
        if self.use_beam_search:
            self._validate_beam_search()
        elif self.best_of not in (None, self.n):
            bad("best_of", self.best_of, f"equal to n ({self.n}) without use_beam_search")
        if self.structured_outputs is not None:
            self.structured_outputs.validate()  # ValueError naming the request field

    def _validate_beam_search(self) -> None:
        self.beam_search_params(1)  # length_penalty, early_stopping, temperature
        unsupported = {"top_p": self.top_p != 1.0, "top_k": self.top_k != -1, "min_p": self.min_p != 0.0,
                       "repetition_penalty": self.repetition_penalty != 1.0,
                       "presence_penalty": self.presence_penalty != 0.0, "frequency_penalty": self.frequency_penalty != 0.0,
                       "logit_bias": bool(self.logit_bias), "stop": bool(self.stop), "min_tokens": self.min_tokens > 0,
                       "logprobs": self.logprobs is not None, "prompt_logprobs": self.prompt_logprobs is not None,
                       "structured_outputs": self.structured_outputs is not None}
        name = next((k for k, v in unsupported.items() if v), None)
        if name is not None:
            raise ValueError(f"{name}: not supported with use_beam_search")

    def beam_search_params(self, max_tokens: int) -> "BeamSearchParams":
        """The engine's beam search settings for a use_beam_search request (`max_tokens`: where the
        request gives none, the room left in the context)."""
        return BeamSearchParams(beam_width=self.best_of or self.n, max_tokens=self.max_tokens or max_tokens,
                                ignore_eos=self.ignore_eos, length_penalty=self.length_penalty,
                                temperature=self.temperature, early_stopping=self.early_stopping, n=self.n)

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def max_stop_len(self) -> int:
        return max((len(s) for s in self.stop), default=0)

    def find_stop(self, text: str, delta_len: int) -> tuple[int, str] | None:
        """The earliest stop string that `text`'s last `delta_len` characters completed: (index, string).
        Only the new text, plus the longest stop string's reach back into the old, can complete one."""
        begin = max(0, len(text) - delta_len - self.max_stop_len + 1)
        best = None
        for s in self.stop:
            i = text.find(s, begin)
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        return best


@dataclass
class BeamSearchParams:
    beam_width: int
    """Beams kept per step (they fork on shared KV blocks)."""
    max_tokens: int
    """Most tokens generated per beam."""
    ignore_eos: bool = False
    length_penalty: float = 1.0
    """Scores are cumulative logprob / length ** length_penalty."""
    temperature: float = 0.0
    """Log-probabilities come from logits / temperature; 0 means the raw logits (same as 1)."""
    early_stopping: bool | str = False
    """transformers' meaning: True stops once beam_width beams have finished; False (the default)
    also stops when the best live beam, scored at its current length, cannot beat the worst finished
    one; "never" scores it at max_tokens instead when length_penalty > 0 (the exact search)."""
    n: int | None = None
    """How many finished beams to return, best first (default beam_width; at most beam_width)."""

    def __post_init__(self) -> None:
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if not isinstance(self.beam_width, int) or self.beam_width < 1:
            raise ValueError(f"beam_width must be an integer >= 1, got {self.beam_width!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.n is not None and (not isinstance(self.n, int) or not 1 <= self.n <= self.beam_width):
            raise ValueError(f"n must be an integer in [1, beam_width ({self.beam_width})], got {self.n!r}")
        for name in ("temperature", "length_penalty"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
