"""Protobuf <-> domain objects, at the service boundary only (domain code never touches protobuf)."""

from __future__ import annotations

from protos.gen.folio.v1 import common_pb2 as pb
from services.common.sampling_params import SamplingParams
from services.common.structured_output import StructuredOutputs
from services.common.outputs import Logprob

FINISH_TO_PB = {None: pb.FINISH_REASON_UNSPECIFIED, "stop": pb.FINISH_REASON_STOP,
                "length": pb.FINISH_REASON_LENGTH, "abort": pb.FINISH_REASON_ABORT, "error": pb.FINISH_REASON_ERROR}
FINISH_FROM_PB = {v: k for k, v in FINISH_TO_PB.items()}
EARLY_STOPPING_TO_PB = {False: pb.EARLY_STOPPING_HEURISTIC, True: pb.EARLY_STOPPING_TRUE,
                        "never": pb.EARLY_STOPPING_NEVER}
EARLY_STOPPING_FROM_PB = {v: k for k, v in EARLY_STOPPING_TO_PB.items()}


def params_from_pb(p: pb.SamplingParams) -> SamplingParams:
    """Build (and so validate) SamplingParams; raises ValueError naming the field."""
    opt = lambda name, default: getattr(p, name) if p.HasField(name) else default  # noqa: E731
    max_tokens = opt("max_tokens", 16)
    return SamplingParams(
        n=opt("n", 1), temperature=opt("temperature", 1.0), top_p=opt("top_p", 1.0), top_k=opt("top_k", -1),
        min_p=p.min_p, repetition_penalty=opt("repetition_penalty", 1.0), presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty, seed=opt("seed", None), max_tokens=max_tokens or None,
        min_tokens=p.min_tokens, stop=list(p.stop), stop_token_ids=list(p.stop_token_ids), ignore_eos=p.ignore_eos,
        logprobs=opt("logprobs", None), prompt_logprobs=opt("prompt_logprobs", None),
        skip_special_tokens=opt("skip_special_tokens", True),
        include_stop_str_in_output=p.include_stop_str_in_output,
        structured_outputs=structured_from_pb(p.structured_outputs) if p.HasField("structured_outputs") else None,
        logit_bias=dict(p.logit_bias) or None,
        use_beam_search=p.use_beam_search, best_of=opt("best_of", None), length_penalty=opt("length_penalty", 1.0),
        early_stopping=_early_stopping_from_pb(p.early_stopping),
    )


def _early_stopping_from_pb(v: int):
    if v not in EARLY_STOPPING_FROM_PB:
        raise ValueError(f"early_stopping: unknown value {v}")
    return EARLY_STOPPING_FROM_PB[v]


def structured_from_pb(s: pb.StructuredOutputs) -> StructuredOutputs:
    kind = s.WhichOneof("kind")
    if kind is None:
        raise ValueError("structured_outputs: give exactly one of json, json_object, regex, choice, grammar")
    if kind == "choice":
        return StructuredOutputs(choice=tuple(s.choice.values), resume_tokens=s.resume_tokens)
    return StructuredOutputs(**{kind: getattr(s, kind)}, resume_tokens=s.resume_tokens)


def structured_to_pb(so: StructuredOutputs) -> pb.StructuredOutputs:
    if so.choice is not None:
        return pb.StructuredOutputs(choice=pb.ChoiceList(values=list(so.choice)), resume_tokens=so.resume_tokens)
    return pb.StructuredOutputs(**{so.kind: getattr(so, so.kind)}, resume_tokens=so.resume_tokens)


def params_to_pb(sp: SamplingParams) -> pb.SamplingParams:
    p = pb.SamplingParams(
        n=sp.n, temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k, min_p=sp.min_p,
        repetition_penalty=sp.repetition_penalty, presence_penalty=sp.presence_penalty,
        frequency_penalty=sp.frequency_penalty, max_tokens=sp.max_tokens or 0, min_tokens=sp.min_tokens,
        stop=sp.stop, stop_token_ids=sp.stop_token_ids, ignore_eos=sp.ignore_eos,
        skip_special_tokens=sp.skip_special_tokens, include_stop_str_in_output=sp.include_stop_str_in_output)
    if sp.seed is not None:
        p.seed = sp.seed
    if sp.logprobs is not None:
        p.logprobs = sp.logprobs
    if sp.prompt_logprobs is not None:
        p.prompt_logprobs = sp.prompt_logprobs
    if sp.logit_bias:
        p.logit_bias.update(sp.logit_bias)
    if sp.structured_outputs is not None:
        p.structured_outputs.CopyFrom(structured_to_pb(sp.structured_outputs))
    if sp.use_beam_search:
        p.use_beam_search = True
        p.length_penalty = sp.length_penalty
        p.early_stopping = EARLY_STOPPING_TO_PB[sp.early_stopping]
    if sp.best_of is not None:
        p.best_of = sp.best_of
    return p


def position_to_pb(entry: dict[int, Logprob] | None, token_text=None) -> pb.PositionLogprobs:
    """`token_text(token_id)` gives decoded_token where the entry has none (the engine sends no text)."""
    if not entry:
        return pb.PositionLogprobs()
    return pb.PositionLogprobs(entries=[
        pb.TokenLogprob(token_id=t, logprob=lp.logprob, rank=lp.rank or 0,
                        decoded_token=lp.decoded_token if lp.decoded_token is not None else
                        (token_text(t) if token_text is not None else ""))
        for t, lp in entry.items()])


def position_from_pb(p: pb.PositionLogprobs) -> dict[int, Logprob] | None:
    if not p.entries:
        return None
    return {e.token_id: Logprob(e.logprob, e.rank or None, e.decoded_token) for e in p.entries}
