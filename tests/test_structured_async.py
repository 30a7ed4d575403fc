"""Structured output under asynchronous scheduling (docs/structured-output.md): the same tokens as the
synchronous loop, and steps still overlap while grammars constrain the batch.

A grammar's mask for step N+1 needs step N's token on the host. The engine launches step N+1's forward
first and reads step N back while it runs (LLMEngine._launch), so constrained requests keep the overlap
instead of forcing every step synchronous; a sequence the grammar ends (a dead end) falls back to one
synchronous step. The bundled model, greedy and seeded, a JSON schema, a choice, a dead end and plain
requests in one batch.
"""

import json

import jsonschema
import pytest

from folio import SamplingParams
from services.common.structured_output import StructuredOutputs
from tests.test_async_scheduling import each_mode, overlap_counter, summary

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "age"], "additionalProperties": False}


def test_structured_async_equals_sync_and_overlaps(llm, one_thread):
    engine = llm.engine
    counter = overlap_counter(engine)
    constrained = {"grammar": 0}
    step = engine.step

    def spy():  # count steps left in flight while a grammar constrained the batch
        deltas = step()
        if engine._inflight is not None and engine.grammar._compiled:
            constrained["grammar"] += 1
        return deltas

    engine.step = spy
    prompts = ["A person as JSON:", "Answer yes or no: is the sky blue?", "Say a", "The capital of France is",
               "Another person as JSON:"]
    params = [SamplingParams(temperature=0, max_tokens=24, structured_outputs=StructuredOutputs.from_schema(SCHEMA, "s")),
              SamplingParams(temperature=0, max_tokens=4, structured_outputs=StructuredOutputs(choice=("yes", "no"))),
              SamplingParams(temperature=0, max_tokens=6, structured_outputs=StructuredOutputs(
                  grammar='root ::= "a" x\nx ::= x "b"')),
              SamplingParams(temperature=0, max_tokens=10),
              SamplingParams(temperature=0.8, seed=3, n=2, max_tokens=24,
                             structured_outputs=StructuredOutputs.from_schema(SCHEMA, "s"))]
    runs = {}
    for mode in each_mode(engine):
        counter[0] = constrained["grammar"] = 0
        runs[mode] = llm.generate(prompts, params, use_tqdm=False)
        if mode:
            assert constrained["grammar"] > 0, "steps never overlapped while a grammar constrained the batch"
    assert summary(runs[True]) == summary(runs[False])
    out = runs[True]
    jsonschema.validate(json.loads(out[0].outputs[0].text), SCHEMA)
    assert out[1].outputs[0].text in ("yes", "no")
    assert (out[2].outputs[0].text, out[2].outputs[0].finish_reason) == ("a", "error")
    for c in out[4].outputs:
        if c.finish_reason == "stop":
            jsonschema.validate(json.loads(c.text), SCHEMA)


def test_a_complete_grammar_with_ignore_eos_keeps_generating_eos_in_a_batch(llm, one_thread):
    """ignore_eos past the grammar's end: the matcher has accepted its stop token, so its row may only be
    EOS; xgrammar's batch fill refuses such a matcher, so it must be left out of the fill (the GPU
    bench crashed every step of the batch on it). Two such requests and a plain one, both modes."""
    params = [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                             structured_outputs=StructuredOutputs(choice=("yes", "no"))),
              SamplingParams(temperature=0, max_tokens=40, ignore_eos=True,
                             structured_outputs=StructuredOutputs.from_schema(SCHEMA, "s")),
              SamplingParams(temperature=0, max_tokens=8)]
    prompts = ["Answer yes or no: is the sky blue?", "A person as JSON:", "The capital of France is"]
    runs = {mode: llm.generate(prompts, params, use_tqdm=False) for mode in each_mode(llm.engine)}
    assert summary(runs[True]) == summary(runs[False])
    eos = set(llm.engine.eos_token_ids)
    for o, n in zip(runs[True][:2], (30, 40)):
        ids = o.outputs[0].token_ids
        first = next(k for k, t in enumerate(ids) if t in eos)  # the grammar's end; only EOS after it
        assert len(ids) == n and set(ids[first:]) <= eos, ids
    assert runs[True][0].outputs[0].text.startswith(("yes", "no"))
