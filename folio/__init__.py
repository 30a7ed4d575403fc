"""Folio: LLM serving with PagedAttention and continuous batching, as gRPC services or in-process."""

from services.common.sampling_params import BeamSearchParams, SamplingParams

from services.common.outputs import CompletionOutput, Logprob, RequestOutput

__all__ = ["LLM", "SamplingParams", "BeamSearchParams", "RequestOutput", "CompletionOutput", "Logprob"]


def __getattr__(name):
    # Importing torch and the engine only when LLM is used keeps `folio` CLI start-up fast.
    if name == "LLM":
        from folio.llm import LLM

        return LLM
    raise AttributeError(name)
