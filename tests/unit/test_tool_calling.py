"""Tool calling's router-side pieces: tool_choice plans, the required/named output as call deltas, the auto parsers.

The parser cases are recorded outputs of the models each format belongs to (Hermes/Qwen, Llama 3.x,
Mistral), well-formed and malformed; a malformed call must come back as plain content.
"""

from __future__ import annotations

import json

import pytest

from services.common.errors import InvalidArgument
from services.router.openai.tool_parsers import hermes, llama3_json, mistral
from services.router.openai.tools import ToolCallStream, plan

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def test_plan_modes_and_errors():
    assert plan(None, None, None) is None
    assert plan([WEATHER], "none", None) is None
    assert plan([WEATHER], None, None).mode == "auto"  # tools without tool_choice: auto, never dropped
    req = plan([WEATHER, TIME], "required", False)
    assert req.mode == "required" and req.constraint is not None and '"maxItems": 1' in req.constraint.json
    named = plan([WEATHER, TIME], {"type": "function", "function": {"name": "get_time"}}, None)
    assert named.mode == "named" and named.name == "get_time"
    for tools, choice, field in [
        (None, "required", "tool_choice"),
        ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "tool_choice.function.name"),
        ([WEATHER], "sometimes", "tool_choice"),
        ([{"type": "function", "function": {"name": "bad name!"}}], "auto", "tools[0].function.name"),
        ([{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}],
         {"type": "function", "function": {"name": "f"}}, "tools[0].function.parameters"),
    ]:
        with pytest.raises(ValueError) as e:
            plan(tools, choice, None)
        assert str(e.value).startswith(field), str(e.value)


@pytest.mark.parametrize("cut", [1, 3, 7, 1000])
def test_required_output_streams_to_the_same_calls(cut):
    text = '[{"name": "get_weather", "parameters": {"city": "Pa\\"ris {x}"}}, {"name": "get_time", "parameters": {}}]'
    p = plan([WEATHER, TIME], "required", True)
    whole = ToolCallStream(p)
    whole.feed(text)
    stream = ToolCallStream(p)
    calls: dict[int, dict] = {}
    for i in range(0, len(text), cut):
        for d in stream.feed(text[i:i + cut]):
            c = calls.setdefault(d.index, {"name": None, "arguments": ""})
            if d.id is not None:
                c["name"] = d.name
            c["arguments"] += d.arguments
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in whole.calls] == \
        [(c["name"], c["arguments"]) for _, c in sorted(calls.items())]
    assert json.loads(whole.calls[0]["function"]["arguments"]) == {"city": 'Pa"ris {x}'}
    assert json.loads(whole.calls[1]["function"]["arguments"]) == {}


def test_named_output_is_the_arguments():
    s = ToolCallStream(plan([WEATHER], {"type": "function", "function": {"name": "get_weather"}}, None))
    first = s.feed('{"city": ')
    assert first[0].id and first[0].name == "get_weather" and first[0].arguments == '{"city": '
    assert s.feed('"Oslo"}')[0].arguments == '"Oslo"}'
    assert s.calls[0]["function"]["arguments"] == '{"city": "Oslo"}'


HERMES_OK = ('I will check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
             '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')
LLAMA_OK = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "parameters": {}}'
MISTRAL_OK = '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "arguments": {}}]'


@pytest.mark.parametrize("parser,text,content", [
    (hermes, HERMES_OK, "I will check."), (llama3_json, LLAMA_OK, None), (mistral, MISTRAL_OK, None)])
def test_parsers_read_their_format(parser, text, content):
    got_content, calls = parser(text)
    assert got_content == content
    assert [(n, json.loads(a)) for n, a in calls] == [("get_weather", {"city": "Paris"}), ("get_time", {})]


@pytest.mark.parametrize("parser,text", [
    (hermes, "The weather in Paris is sunny."),
    (hermes, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'),  # cut off
    (hermes, '<tool_call>{"arguments": {}}</tool_call>'),  # no name
    (llama3_json, "Paris is the capital of France."),
    (llama3_json, '{"name": "get_weather", "parameters": {"city": }}'),
    (llama3_json, '{"answer": 42}'),
    (mistral, "No tools needed."),
    (mistral, '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}'),
    (mistral, '[TOOL_CALLS]not json'),
])
def test_malformed_output_is_plain_content(parser, text):
    assert parser(text) == (text, [])


def test_invalid_argument_is_a_value_error():
    assert issubclass(InvalidArgument, ValueError)
