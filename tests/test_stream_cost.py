"""A long stream costs linear time: the per-token work of the output path (engine step and delta,
the engine server's message, the output processor's text with stop strings and logprobs) does not
grow with the tokens already generated.

The model runner is faked (named so below): the forward pass's cost grows with the context by nature,
and it is not what this test is about. Everything else is the real engine on a tiny random Llama that
carries the bundled model's tokenizer. The old path rebuilt each request's cumulative output every step
(every token id so far, copied into each message and diffed back by the server): the first check below,
"each step emits only its new token", fails on it at once; the timing check is the user-visible one.
"""

from __future__ import annotations

import shutil
import statistics
import time

import pytest
import torch

from services.common.output_processor import OutputProcessor
from services.common.sampling_params import SamplingParams
from services.engine.engine import EngineConfig, LLMEngine
from services.engine.server import _Progress, delta_message

N_TOKENS = 4000
WINDOW = 500
TEXT = "Le café coûte 3 €; naïve façade — 日本語のテキスト, and plain English words too.\n"


class FakeRunner:
    """Stands in for the model: each step's logits put the next token of a fixed cycle on top."""

    def __init__(self, vocab: int, cycle: list[int]):
        self.vocab, self.cycle, self.calls = vocab, cycle, 0

    def copy_blocks(self, pairs) -> None:
        pass

    def prepare(self, out, blocks, tokens=None) -> int:
        return out.num_logit_rows

    def execute(self, num_rows: int) -> torch.Tensor:
        logits = torch.zeros(num_rows, self.vocab)
        logits[:, self.cycle[self.calls % len(self.cycle)]] = 10.0
        self.calls += 1
        return logits


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, model_dir):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=49152, max_position_embeddings=8192,
                      eos_token_id=2, bos_token_id=1)
    d = tmp_path_factory.mktemp("tiny_llama_stream")
    LlamaForCausalLM(cfg).save_pretrained(d)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir / name, d / name)
    return d


def test_stream_of_4000_tokens_costs_the_same_per_token_at_the_end_with_a_fake_model_runner(tiny_dir, one_thread):
    # Synchronous loop: the fake runner reads no device-side inputs, and each step must emit its token.
    engine = LLMEngine(EngineConfig(model=str(tiny_dir), dtype="float32", num_kv_blocks=4200 // 16 + 2,
                                    async_scheduling=False))
    tok = engine.tokenizer
    cycle = tok.encode(TEXT)
    engine.runner = FakeRunner(engine.vocab_size, cycle)
    decoded = []  # tokens each tokenizer.decode call was given
    real_decode = tok.decode
    tok.decode = lambda ids, skip=True: decoded.append(len(ids)) or real_decode(ids, skip)

    params = SamplingParams(temperature=0, max_tokens=N_TOKENS, ignore_eos=True, logprobs=2,
                            stop=["this never appears"])  # stop strings on: hold-back and search every token
    prompt = tok.encode("Say it again and again:")
    engine.add_request("long", None, params, prompt_token_ids=prompt)
    proc = OutputProcessor(tok, stream=True)
    proc.add_request("long", None, prompt, params)
    prog = _Progress(len(prompt))

    step_s, decoded_per_step, text, n = [], [], [], 0
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        decoded.clear()
        deltas = engine.step()
        msg = delta_message(deltas, prog, tok.decode_token)
        (out, stopped), = [proc.process(d) for d in deltas]
        step_s.append(time.perf_counter() - t0)
        decoded_per_step.append(sum(decoded))
        # each step emits only its new token, on the engine's delta, the wire and the processor's output
        assert [len(d.token_ids) for d in deltas[0].sequences] == [1]
        assert [len(s.token_ids) for s in msg.sequences] == [1] and len(msg.sequences[0].logprobs) == 1
        assert len(out.outputs[0].token_ids) == 1 and len(out.outputs[0].logprobs) == 1
        assert not stopped
        text.append(out.outputs[0].text)
        n += 1

    assert n == N_TOKENS and out.finished and out.outputs[0].finish_reason == "length"
    want = real_decode((cycle * (N_TOKENS // len(cycle) + 1))[:N_TOKENS])
    assert "".join(text) == want  # the streamed pieces are the text, nothing lost or doubled
    assert max(decoded_per_step) <= 16  # detokenization looks at a few recent tokens, never the whole output
    first = statistics.median(step_s[:WINDOW])
    last = statistics.median(step_s[-WINDOW:])
    assert last < 2.0 * first, f"per-token time grew from {first * 1e6:.0f} us to {last * 1e6:.0f} us"
