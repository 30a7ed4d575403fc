"""Structured output through the whole stack (issue 14): the official openai client, the bundled model, xgrammar.

json_schema (strict) outputs validate against their schema with `jsonschema` for five schemas (nested
objects, arrays, enums, bounded integers, required fields), greedy and sampled, streamed and not, n=2;
json_object parses; regex and choice match (also under vLLM's guided_* and structured_outputs names);
an uncompilable schema / regex / grammar is a 400 naming the field, and the same over gRPC is
INVALID_ARGUMENT; a constrained request does not disturb an unconstrained one beside it.
The requests run concurrently so they share the engine's batches (the bundled model is slow on CPU).
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

from folio.stack import free_port
from tests.integration.helpers import start_stack

pytestmark = pytest.mark.timeout(600)

SCHEMAS = {
    "person": {  # required fields, bounded integer, short string
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 10}, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"], "additionalProperties": False,
    },
    "enum": {
        "type": "object",
        "properties": {"color": {"type": "string", "enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}},
        "required": ["color", "ok"], "additionalProperties": False,
    },
    "array": {
        "type": "object",
        "properties": {"scores": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 9},
                                  "minItems": 1, "maxItems": 3}},
        "required": ["scores"], "additionalProperties": False,
    },
    "nested": {
        "type": "object",
        "properties": {"user": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99},
                                                                  "role": {"enum": ["admin", "guest"]}},
                                "required": ["id", "role"], "additionalProperties": False}},
        "required": ["user"], "additionalProperties": False,
    },
    "list_of_objects": {
        "type": "array", "minItems": 1, "maxItems": 2,
        "items": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -5, "maximum": 5}},
                  "required": ["x"], "additionalProperties": False},
    },
}
MAX_TOKENS = 48


@pytest.fixture(scope="module")
def so_stack(tmp_path_factory):
    port = free_port()
    s = start_stack(tmp_path_factory, "structured", engines=1, http_port=port, warm_structured=True,
                    engine_args=["--num-kv-blocks", "256", "--max-model-len", "1024", "--dtype", "float32",
                                 "--device", "cpu", "--max-num-seqs", "32"])
    s.http_url = f"http://127.0.0.1:{port}"
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(so_stack):
    return openai.OpenAI(base_url=so_stack.http_url + "/v1", api_key="unused", max_retries=0, timeout=300)


def _chat(client, content: str, stream: bool, **kw) -> list[tuple[str, str]]:
    """(text, finish_reason) per choice, streamed deltas joined when streaming."""
    messages = [{"role": "user", "content": content}]
    if not stream:
        r = client.chat.completions.create(messages=messages, stream=False, **kw)
        return [(c.message.content, c.finish_reason) for c in sorted(r.choices, key=lambda c: c.index)]
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    for ev in client.chat.completions.create(messages=messages, stream=True, **kw):
        for c in ev.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
    return [(texts[i], reasons.get(i)) for i in sorted(texts)]


def _model(client) -> str:
    return client.models.list().data[0].id


def test_json_schema_strict_validates(client):
    model = _model(client)
    cases = []
    for name, schema in SCHEMAS.items():
        rf = {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
        prompt = f"Reply with JSON for a {name.replace('_', ' ')}."
        cases.append((name, prompt, False, dict(temperature=0, n=1)))
        cases.append((name, prompt, True, dict(temperature=1.0, n=2, seed=7)))
        kw = dict(model=model, max_tokens=MAX_TOKENS, response_format=rf)
        cases[-2] = cases[-2][:3] + ({**cases[-2][3], **kw},)
        cases[-1] = cases[-1][:3] + ({**cases[-1][3], **kw},)
    with ThreadPoolExecutor(len(cases)) as pool:
        results = list(pool.map(lambda c: _chat(client, c[1], c[2], **c[3]),
                                cases))
    checked = 0
    for (name, _, stream, kw), choices in zip(cases, results):
        assert len(choices) == kw["n"]
        for text, reason in choices:
            assert reason == "stop", (name, stream, text, reason)  # ended by the grammar (EOS), not by length
            jsonschema.validate(json.loads(text), SCHEMAS[name])
            checked += 1
    assert checked == 5 * 3


def test_json_object_regex_choice(client):
    model = _model(client)
    jobs = [
        ("json_object", dict(response_format={"type": "json_object"}, temperature=0, n=1),
         lambda t: isinstance(json.loads(t), dict)),
        ("regex", dict(extra_body={"structured_outputs": {"regex": r"\d{3}-\d{4}"}}),
         lambda t: re.fullmatch(r"\d{3}-\d{4}", t)),
        ("guided_regex", dict(extra_body={"guided_regex": r"(yes|no)!"}), lambda t: t in ("yes!", "no!")),
        ("choice", dict(extra_body={"structured_outputs": {"choice": ["alpha", "beta", "gamma"]}}),
         lambda t: t in ("alpha", "beta", "gamma")),
        ("guided_choice", dict(extra_body={"guided_choice": ["cat", "dog"]}), lambda t: t in ("cat", "dog")),
        ("grammar", dict(extra_body={"guided_grammar": 'root ::= "A" [0-9] [0-9]'}), lambda t: re.fullmatch(r"A\d\d", t)),
    ]
    prompt = 'Reply with the JSON object {"ok": true} and nothing else.'
    with ThreadPoolExecutor(len(jobs) + 1) as pool:
        futs = [pool.submit(_chat, client, prompt, False, **{"model": model, "max_tokens": MAX_TOKENS,
                                                              "temperature": 0.8, "n": 2, **kw}) for _, kw, _ in jobs]
        plain = pool.submit(client.completions.create, model=model, prompt="The capital of France is", max_tokens=5,
                            temperature=0)
        for (name, _, check), f in zip(jobs, futs):
            for text, reason in f.result():
                assert check(text), (name, text)
                assert reason == "stop", (name, text, reason)
        # The unconstrained request in the same batches: as the model writes it alone.
        alone = client.completions.create(model=model, prompt="The capital of France is", max_tokens=5, temperature=0)
        assert plain.result().choices[0].text == alone.choices[0].text


@pytest.mark.parametrize("body,param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format.json_schema.schema"),
    ({"guided_regex": "(abc"}, "guided_regex"),
    # a keyword xgrammar would accept but not enforce (an output breaking it would pass): refused
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"n": {"type": "integer", "not": {"const": 3}}}}}}},
     "response_format.json_schema.schema"),
    ({"guided_json": {"allOf": [{"type": "integer"}, {"minimum": 1}]}}, "guided_json"),
    ({"guided_grammar": "root ::= undefined_rule"}, "guided_grammar"),
    ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json"),
    ({"guided_choice": ["a"], "guided_regex": "a"}, "guided_choice"),
])
def test_uncompilable_is_400_naming_the_field(client, body, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=_model(client), messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=4, extra_body=body)
    err = e.value.body
    assert err["param"] == param, err
    assert err["message"].startswith(param), err


def test_grpc_structured_outputs_and_invalid_argument(so_stack):
    import grpc

    from protos.gen.folio.v1 import common_pb2, router_pb2, router_pb2_grpc

    with grpc.insecure_channel(so_stack.router_address) as ch:
        stub = router_pb2_grpc.RouterStub(ch)
        params = common_pb2.SamplingParams(max_tokens=8, temperature=0.0,
                                           structured_outputs=common_pb2.StructuredOutputs(
                                               choice=common_pb2.ChoiceList(values=["left", "right"])))
        text = ""
        for msg in stub.Generate(router_pb2.GenerateRequest(text="Go", params=params), timeout=120):
            text += "".join(c.text for c in msg.choices)
        assert text in ("left", "right"), text
        bad = common_pb2.SamplingParams(max_tokens=8, structured_outputs=common_pb2.StructuredOutputs(regex="(x"))
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(router_pb2.GenerateRequest(text="Go", params=bad), timeout=60))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "structured_outputs" in e.value.details()


WEATHER_PARAMS = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                   "unit": {"enum": ["c", "f"]}},
                  "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": WEATHER_PARAMS}},
         {"type": "function", "function": {"name": "get_time", "description": "Time in a city", "parameters": {
             "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"],
             "additionalProperties": False}}}]
SCHEMA_OF = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def _calls_nonstream(client, **kw):
    r = client.chat.completions.create(stream=False, **kw)
    c = r.choices[0]
    return c.finish_reason, [(t.function.name, t.function.arguments) for t in c.message.tool_calls or []], \
        [t.id for t in c.message.tool_calls or []]


def _calls_stream(client, **kw):
    calls: dict[int, dict] = {}
    finish = None
    for ev in client.chat.completions.create(stream=True, **kw):
        for c in ev.choices:
            assert not c.delta.content, c.delta.content  # calls only, no content
            for t in c.delta.tool_calls or []:
                entry = calls.setdefault(t.index, {"name": None, "arguments": "", "id": None})
                if t.id:
                    entry["id"], entry["name"] = t.id, t.function.name
                entry["arguments"] += t.function.arguments or ""
            finish = c.finish_reason or finish
    return finish, [(c["name"], c["arguments"]) for _, c in sorted(calls.items())], [c["id"] for c in calls.values()]


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_tool_choice_enforced_and_streamed_equals_whole(client, tool_choice):
    kw = dict(model=_model(client), messages=[{"role": "user", "content": "What is the weather in Paris?"}],
              tools=TOOLS, tool_choice=tool_choice, temperature=0, max_tokens=60, parallel_tool_calls=False)
    with ThreadPoolExecutor(2) as pool:
        whole = pool.submit(_calls_nonstream, client, **kw)
        streamed = pool.submit(_calls_stream, client, **kw)
        whole, streamed = whole.result(), streamed.result()
    assert whole[0] == streamed[0] == "tool_calls"
    assert whole[1] == streamed[1]
    assert len(whole[1]) == 1 and all(i and i.startswith("call_") for i in whole[2] + streamed[2])
    name, args = whole[1][0]
    if isinstance(tool_choice, dict):
        assert name == "get_weather"
    jsonschema.validate(json.loads(args), SCHEMA_OF[name])


def test_tools_without_tool_choice_are_auto_and_a_round_trip_works(client):
    model = _model(client)
    # Tools alone: auto (OpenAI's default), 200; the answer is content or calls, never an error.
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], tools=TOOLS,
                                       max_tokens=8, temperature=0)
    assert r.choices[0].message.content is not None or r.choices[0].message.tool_calls
    # The conversation after a call: the assistant's tool_calls and the tool's answer are accepted.
    r = client.chat.completions.create(model=model, tools=TOOLS, tool_choice="none", max_tokens=8, temperature=0,
                                       messages=[{"role": "user", "content": "Weather in Paris?"},
                                                 {"role": "assistant", "content": None, "tool_calls": [
                                                     {"id": "call_1", "type": "function", "function": {
                                                         "name": "get_weather",
                                                         "arguments": '{"city": "Paris", "unit": "c"}'}}]},
                                                 {"role": "tool", "tool_call_id": "call_1", "content": "21 C, sunny"}])
    assert r.choices[0].message.content and not r.choices[0].message.tool_calls


def test_langchain_structured_output_and_bind_tools(so_stack, client):
    """LangChain's with_structured_output (json_schema, function_calling, json_mode) and a bind_tools
    round trip: tool call -> tool message -> final answer."""
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class Person(BaseModel):
        name: str = Field(max_length=10)
        age: int = Field(ge=0, le=120)

    @tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return f"21 C and sunny in {city}"

    llm = ChatOpenAI(base_url=so_stack.http_url + "/v1", api_key="unused", model=_model(client), temperature=0,
                     max_tokens=40, max_retries=0, timeout=300)
    prompt = "Give me a person with a name and an age, as JSON."
    json_mode_schema = {"title": "Anything", "type": "object"}
    jobs = [("json_schema", Person), ("function_calling", Person), ("json_mode", json_mode_schema)]
    with ThreadPoolExecutor(4) as pool:
        futs = [pool.submit(llm.with_structured_output(schema, method=m).invoke, prompt) for m, schema in jobs]
        bound = llm.bind_tools([get_weather], tool_choice="get_weather")
        question = HumanMessage("What is the weather in Paris?")
        call_msg = pool.submit(bound.invoke, [question])
        for (method, _), f in zip(jobs, futs):
            out = f.result()
            if method == "json_mode":
                assert isinstance(out, dict), out
            else:
                assert isinstance(out, Person), (method, out)
        call_msg = call_msg.result()
    assert call_msg.tool_calls and call_msg.tool_calls[0]["name"] == "get_weather", call_msg
    call = call_msg.tool_calls[0]
    assert isinstance(call["args"].get("city"), str)
    answer = llm.invoke([question, call_msg, ToolMessage(content=get_weather.invoke(call["args"]),
                                                         tool_call_id=call["id"])])
    assert isinstance(answer.content, str) and answer.content and not answer.tool_calls


def test_logit_bias(client):
    from services.common.bundled_model import bundled_model_dir
    from services.common.tokenizer import Tokenizer

    model = _model(client)
    piece = Tokenizer(bundled_model_dir()).decode([28])
    plain = client.completions.create(model=model, prompt="The capital of France is", max_tokens=3, temperature=0)
    forced = client.completions.create(model=model, prompt="The capital of France is", max_tokens=3, temperature=0,
                                       logit_bias={"28": 100})
    assert forced.choices[0].text == piece * 3 != plain.choices[0].text
    for bias in [{"28": 101}, {"x": 1}, {"999999": 1}]:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=model, prompt="Hi", max_tokens=1, logit_bias=bias)
        assert e.value.body["param"] == "logit_bias", e.value.body


def test_tokenize_detokenize(so_stack, client):
    """vLLM's /tokenize and /detokenize shapes, against the tokenizer the engines use."""
    import httpx

    from services.common.bundled_model import bundled_model_dir
    from services.common.tokenizer import Tokenizer

    tok = Tokenizer(bundled_model_dir())
    r = httpx.post(so_stack.http_url + "/tokenize", json={"prompt": "Hello world, how are you?"}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == tok.encode("Hello world, how are you?") and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == 1024
    messages = [{"role": "user", "content": "Hi"}]
    r = httpx.post(so_stack.http_url + "/tokenize", json={"messages": messages}, timeout=60).json()
    assert r["tokens"] == tok.encode_chat(messages)
    r = httpx.post(so_stack.http_url + "/detokenize", json={"tokens": body["tokens"]}, timeout=60)
    assert r.status_code == 200 and r.json() == {"prompt": "Hello world, how are you?"}
    bad = httpx.post(so_stack.http_url + "/tokenize", json={"prompt": "x", "messages": messages}, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt"
    bad = httpx.post(so_stack.http_url + "/detokenize", json={"tokens": [10**9]}, timeout=60)
    assert bad.status_code == 400, bad.text


def test_resumed_stream_fast_forwards_the_grammar(offline_llm):
    """A stream resumed elsewhere arrives as prompt + output so far with resume_tokens = len(output so far):
    the matcher is fast-forwarded over those tokens, so the continuation completes the same output (greedy)
    instead of starting the pattern again."""
    from folio import SamplingParams
    from services.common.structured_output import StructuredOutputs

    prompt = "My phone number is"
    so = StructuredOutputs(regex=r"\d{3}-\d{4}")
    whole = offline_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=16, structured_outputs=so),
                                 use_tqdm=False)[0]
    out = list(whole.outputs[0].token_ids)
    assert re.fullmatch(r"\d{3}-\d{4}", whole.outputs[0].text), whole.outputs[0].text
    k = len(out) // 2
    resumed = offline_llm.generate(
        {"prompt_token_ids": list(whole.prompt_token_ids) + out[:k]},
        SamplingParams(temperature=0, max_tokens=16, structured_outputs=StructuredOutputs(regex=so.regex,
                                                                                            resume_tokens=k)),
        use_tqdm=False)[0]
    assert list(resumed.outputs[0].token_ids) == out[k:]


@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_0_with_echo_scores_the_prompt(client, stream):
    """Prompt scoring (lm-eval's loglikelihood): the prompt echoed with its logprobs, nothing generated."""
    model = _model(client)
    prompt = "The capital of France is Paris"
    ref = client.completions.create(model=model, prompt=prompt, max_tokens=1, temperature=0, echo=True, logprobs=1)
    kw = dict(model=model, prompt=prompt, max_tokens=0, echo=True, logprobs=1, temperature=0)
    if stream:
        events = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
        text = "".join(c.text for e in events for c in e.choices)
        tokens = [t for e in events for c in e.choices if c.logprobs for t in c.logprobs.tokens]
        lps = [x for e in events for c in e.choices if c.logprobs for x in c.logprobs.token_logprobs]
        finish = [c.finish_reason for e in events for c in e.choices if c.finish_reason]
        u = events[-1].usage
    else:
        r = client.completions.create(**kw)
        text, tokens, lps = r.choices[0].text, r.choices[0].logprobs.tokens, r.choices[0].logprobs.token_logprobs
        finish, u = [r.choices[0].finish_reason], r.usage
    n_prompt = len(ref.choices[0].logprobs.tokens) - 1
    assert text == prompt and finish == ["length"]
    assert tokens == ref.choices[0].logprobs.tokens[:n_prompt]
    assert lps == ref.choices[0].logprobs.token_logprobs[:n_prompt] and lps[0] is None
    assert u.completion_tokens == 0 and u.prompt_tokens == n_prompt
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt=prompt, max_tokens=0)
    assert e.value.body["param"] == "max_tokens"


def test_grpc_prompt_logprobs(so_stack, client):
    """Router gRPC Generate returns prompt_logprobs (one entry per prompt token, the first empty), equal
    to the HTTP API's echoed prompt logprobs."""
    import grpc

    from protos.gen.folio.v1 import common_pb2, router_pb2, router_pb2_grpc

    prompt = "The capital of France is Paris"
    ref = client.completions.create(model=_model(client), prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    with grpc.insecure_channel(so_stack.router_address) as ch:
        msgs = list(router_pb2_grpc.RouterStub(ch).Generate(router_pb2.GenerateRequest(
            text=prompt, params=common_pb2.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)),
            timeout=120))
    first = msgs[0]
    assert len(first.prompt_logprobs) == len(first.prompt_token_ids) == len(ref.choices[0].logprobs.tokens)
    assert not first.prompt_logprobs[0].entries
    for tok, pos, want in zip(first.prompt_token_ids[1:], first.prompt_logprobs[1:],
                              ref.choices[0].logprobs.token_logprobs[1:]):
        own = next(e for e in pos.entries if e.token_id == tok)
        assert own.logprob == pytest.approx(want, abs=1e-4)
        assert 1 <= len(pos.entries) <= 2


# --- grammar dead ends, refusals only the engine can make (issue 14, must-show 5) ---------------------------
DEAD_END = 'root ::= "a" x\nx ::= x "b"'  # after "a", rule x can never end: no token is allowed


def test_grammar_dead_end_ends_with_error_and_spares_the_batch(so_stack, client):
    """A grammar that reaches a state allowing no token ends that sequence with finish_reason "error"
    (vLLM's) and stop_reason "grammar_dead_end", streamed or not, over HTTP and gRPC, never a hang; the
    unconstrained request sharing its batches is what the model writes alone. A grammar complete while
    min_tokens still bans EOS ends there as "stop" (the grammar wins, as in vLLM)."""
    import grpc

    from protos.gen.folio.v1 import common_pb2, router_pb2, router_pb2_grpc

    model = _model(client)
    plain_kw = dict(model=model, prompt="The capital of France is", max_tokens=6, temperature=0)
    dead_kw = dict(model=model, prompt="Say a", max_tokens=8, temperature=0, extra_body={"guided_grammar": DEAD_END})

    def streamed(kw):
        text, finish, stop = "", None, None
        for ev in client.completions.create(stream=True, **kw):
            for c in ev.choices:
                text += c.text
                if c.finish_reason:
                    finish, stop = c.finish_reason, getattr(c, "stop_reason", None)
        return text, finish, stop

    with ThreadPoolExecutor(4) as pool:
        plain = pool.submit(client.completions.create, **plain_kw)
        dead = pool.submit(client.completions.create, **dead_kw)
        dead_stream = pool.submit(streamed, dead_kw)
        done_early = pool.submit(client.completions.create, model=model, prompt="Answer yes or no:", max_tokens=8,
                                 temperature=0, extra_body={"guided_choice": ["yes", "no"], "min_tokens": 6})
        d = dead.result().choices[0]
        assert (d.text, d.finish_reason, d.model_extra.get("stop_reason")) == ("a", "error", "grammar_dead_end")
        assert dead_stream.result() == ("a", "error", "grammar_dead_end")
        e = done_early.result().choices[0]
        assert e.text in ("yes", "no") and e.finish_reason == "stop", (e.text, e.finish_reason)
        alone = client.completions.create(**plain_kw)
        assert plain.result().choices[0].text == alone.choices[0].text
    with grpc.insecure_channel(so_stack.router_address) as ch:
        msgs = list(router_pb2_grpc.RouterStub(ch).Generate(router_pb2.GenerateRequest(
            text="Say a", params=common_pb2.SamplingParams(
                max_tokens=8, temperature=0.0, structured_outputs=common_pb2.StructuredOutputs(grammar=DEAD_END))),
            timeout=120))
    assert "".join(c.text for m in msgs for c in m.choices) == "a"
    assert [c.finish_reason for m in msgs for c in m.choices if c.finish_reason] == [common_pb2.FINISH_REASON_ERROR]


def test_engine_refuses_what_only_it_can_check_as_invalid_argument(so_stack):
    """What validation before the engine cannot see ends as INVALID_ARGUMENT naming the field, with the
    grammar's own words, not a silent abort: here a resumed stream whose tokens leave its grammar (only the
    engine holds the compiled grammar to check them against)."""
    import grpc

    from protos.gen.folio.v1 import common_pb2, engine_pb2
    from tests.integration.helpers import engine_stub

    ch, stub = engine_stub(so_stack.engine_addresses[0])
    with ch:
        params = common_pb2.SamplingParams(max_tokens=4, temperature=0.0, structured_outputs=common_pb2.StructuredOutputs(
            regex=r"\d+", resume_tokens=2))
        with pytest.raises(grpc.RpcError) as e:  # prompt ends in two tokens that are not digits
            list(stub.Generate(engine_pb2.EngineGenerateRequest(request_id="resume-bad", prompt_token_ids=[504, 3575, 282],
                                                                params=params), timeout=60))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details().startswith("structured_outputs.resume_tokens: "), e.value.details()
        ok = list(stub.Generate(engine_pb2.EngineGenerateRequest(request_id="resume-ok", prompt_token_ids=[504, 3575, 282],
                                                                 params=common_pb2.SamplingParams(
                                                                     max_tokens=3, temperature=0.0,
                                                                     structured_outputs=common_pb2.StructuredOutputs(
                                                                         regex=r"\d+"))), timeout=60))
        assert ok[-1].finished


# --- beam search over HTTP and gRPC (vLLM's use_beam_search) ---------------------------------------------------
def test_beam_search_http_and_grpc_equal_the_offline_beam_search(so_stack, client, offline_llm):
    """use_beam_search through the official openai client (extra_body), streamed and not, completions and
    chat, and through the router's gRPC Generate: the beams, best first, are the offline LLM's beam search
    on the same model, token for token. Sampling-only fields are refused naming the field."""
    import grpc

    from folio import BeamSearchParams
    from protos.gen.folio.v1 import common_pb2, router_pb2, router_pb2_grpc

    model = _model(client)
    prompt, chat = "The capital of France is", [{"role": "user", "content": "What is 2+2?"}]
    tok = offline_llm.llm.engine.tokenizer
    ref = offline_llm.beam_search(prompt, BeamSearchParams(beam_width=3, max_tokens=6, length_penalty=0.5, n=2))[0]
    ref_chat = offline_llm.beam_search({"prompt_token_ids": tok.encode_chat(chat, True)},
                                       BeamSearchParams(beam_width=2, max_tokens=8))[0]
    want = [c.text for c in ref.outputs]
    assert len(want) == 2
    beam = dict(use_beam_search=True, best_of=3, length_penalty=0.5)

    def streamed():
        texts: dict[int, str] = {}
        for ev in client.completions.create(model=model, prompt=prompt, n=2, max_tokens=6, stream=True,
                                            extra_body=beam):
            for c in ev.choices:
                texts[c.index] = texts.get(c.index, "") + c.text
        return [texts[i] for i in sorted(texts)]

    with ThreadPoolExecutor(3) as pool:
        whole = pool.submit(client.completions.create, model=model, prompt=prompt, n=2, max_tokens=6, extra_body=beam)
        stream = pool.submit(streamed)
        chat_r = pool.submit(client.chat.completions.create, model=model, messages=chat, n=2, max_tokens=8,
                             extra_body={"use_beam_search": True})
        assert [c.text for c in sorted(whole.result().choices, key=lambda c: c.index)] == want
        assert stream.result() == want
        assert [c.message.content for c in sorted(chat_r.result().choices, key=lambda c: c.index)] == \
            [c.text for c in ref_chat.outputs]
    with grpc.insecure_channel(so_stack.router_address) as ch:
        msgs = list(router_pb2_grpc.RouterStub(ch).Generate(router_pb2.GenerateRequest(
            text=prompt, params=common_pb2.SamplingParams(n=2, max_tokens=6, use_beam_search=True, best_of=3,
                                                          length_penalty=0.5)), timeout=120))
        got: dict[int, list[int]] = {}
        for m in msgs:
            for c in m.choices:
                got.setdefault(c.index, []).extend(c.token_ids)
        assert [got[0], got[1]] == [list(c.token_ids) for c in ref.outputs]
        with pytest.raises(grpc.RpcError) as e:
            list(router_pb2_grpc.RouterStub(ch).Generate(router_pb2.GenerateRequest(
                text=prompt, params=common_pb2.SamplingParams(n=2, best_of=1, use_beam_search=True)), timeout=60))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith("best_of")
    for bad, param in (({"top_p": 0.5}, "top_p"), ({"logprobs": 1}, "logprobs"), ({"best_of": 4}, None)):
        kw = dict(model=model, prompt=prompt, max_tokens=4, n=2, extra_body={"use_beam_search": True})
        kw.update({k: v for k, v in bad.items() if k != "best_of"})
        if "best_of" in bad:  # without use_beam_search best_of must equal n
            kw["extra_body"], kw["best_of"] = {}, bad["best_of"]
            param = "best_of"
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(**kw)
        assert e.value.body["message"].startswith(param), e.value.body
