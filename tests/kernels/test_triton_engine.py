"""The engine on the triton backend gives the torch backend's greedy tokens on the bundled model.

On a CPU machine this runs the kernels under the Triton interpreter (slow: kept to a few tokens);
on a GPU machine, on the device.
"""

import pytest

from folio import LLM, SamplingParams

PROMPTS = ["The capital of France is", "What is 2+2? The answer"]
# Longer than one 16-token block, run twice: the second run hits the prefix cache, so its prompt is
# an extend (a chunk after cached tokens) rather than a fresh prefill.
LONG = "Here is a list of the planets of the solar system, in order from the sun: Mercury, Venus,"


def _generate(backend):
    llm = LLM(model=None, attention_backend=backend)
    params = SamplingParams(max_tokens=4, temperature=0, logprobs=0)
    first = llm.generate(PROMPTS + [LONG], params, use_tqdm=False)
    again = llm.generate([LONG], params, use_tqdm=False)
    return first + again


@pytest.fixture(scope="module")
def reference():
    return _generate("torch")


def test_triton_engine_matches_torch_backend(reference):
    got = _generate("triton")
    assert got[-1].num_cached_tokens > 0, "the second run of LONG should reuse cached blocks"
    for a, b in zip(got, reference):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            (tok, pa), = la.items()
            assert pa.logprob == pytest.approx(lb[tok].logprob, abs=1e-3)
