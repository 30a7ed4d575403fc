"""Tool calling in chat completions: `tools` + `tool_choice` -> a plan (and its output constraint); output -> OpenAI's tool_calls.

`required` and a named function are enforced by structured output: a named call's output is its
arguments object (the function's parameter schema); `required` outputs a JSON array of
`{"name": ..., "parameters": {...}}` (one item unless parallel_tool_calls), as vLLM does. `ToolCallStream`
turns that output, piece by piece, into OpenAI's call headers (id, name) and `arguments` deltas, so
a streamed response's deltas concatenate to the non-streamed one's calls (both go through it).
`auto` parses the model's own format with a parser from services/router/openai/tool_parsers.py.
Tools sent without tool_choice mean `auto` (OpenAI's default), never dropped.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from services.common.errors import InvalidArgument
from services.common.structured_output import StructuredOutputs


@dataclass
class ToolPlan:
    mode: str
    """"auto", "required" or "named" ("none" has no plan)."""
    tools: list[dict]
    """The function definitions ({"name", "description", "parameters"}), validated."""
    name: str | None = None
    parallel: bool = True
    constraint: StructuredOutputs | None = None


def plan(tools: list | None, tool_choice, parallel_tool_calls: bool | None) -> ToolPlan | None:
    """The request's tool plan, or None when no tool may be called. 400 naming the field on bad input."""
    functions = [_function(i, t) for i, t in enumerate(tools or [])]
    choice = "auto" if tool_choice is None else tool_choice
    if choice == "none" or (not functions and tool_choice in (None, "auto")):
        return None
    if not functions:
        raise InvalidArgument("tool_choice: requires tools")
    parallel = parallel_tool_calls is not False
    if choice == "auto":
        return ToolPlan("auto", functions, parallel=parallel)
    if choice == "required":
        items = [{"type": "object", "properties": {"name": {"const": f["name"]}, "parameters": f["parameters"]},
                  "required": ["name", "parameters"], "additionalProperties": False} for f in functions]
        schema = {"type": "array", "minItems": 1, "items": items[0] if len(items) == 1 else {"anyOf": items}}
        if not parallel:
            schema["maxItems"] = 1
        so = StructuredOutputs.from_schema(schema, "tools")
        so.validate()
        return ToolPlan("required", functions, parallel=parallel, constraint=so)
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        i = next((i for i, f in enumerate(functions) if f["name"] == name), None)
        if i is None:
            raise InvalidArgument(f"tool_choice.function.name: no tool named {name!r} in tools")
        so = StructuredOutputs.from_schema(functions[i]["parameters"], f"tools[{i}].function.parameters")
        so.validate()
        return ToolPlan("named", functions, name=name, parallel=parallel, constraint=so)
    raise InvalidArgument("tool_choice: must be none, auto, required or {\"type\": \"function\", \"function\": {\"name\": ...}}")


def _function(i: int, tool) -> dict:
    if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(tool.get("function"), dict):
        raise InvalidArgument(f"tools[{i}]: must be {{\"type\": \"function\", \"function\": {{...}}}}")
    fn = tool["function"]
    name = fn.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
        raise InvalidArgument(f"tools[{i}].function.name: must be 1-64 letters, digits, '_', '.' or '-'")
    params = fn.get("parameters")
    if params is None:
        params = {"type": "object", "properties": {}}
    if not isinstance(params, dict):
        raise InvalidArgument(f"tools[{i}].function.parameters: must be a JSON schema object")
    return {"name": name, "description": fn.get("description"), "parameters": params}


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCallDelta:
    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def to_dict(self) -> dict:
        d: dict = {"index": self.index}
        if self.id is not None:
            d.update(id=self.id, type="function", function={"name": self.name, "arguments": self.arguments})
        else:
            d["function"] = {"arguments": self.arguments}
        return d


_CALL_HEAD = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"parameters"\s*:\s*')


@dataclass
class ToolCallStream:
    """Output text of a `required` / named plan, fed in pieces -> call headers and arguments deltas."""

    plan: ToolPlan
    buf: str = ""
    pos: int = 0
    calls: list[dict] = field(default_factory=list)
    """Every call so far: {"id", "type", "function": {"name", "arguments"}}."""
    _depth: int = 0
    _in_args: bool = False
    _in_str: bool = False
    _esc: bool = False

    def feed(self, text: str) -> list[ToolCallDelta]:
        self.buf += text
        if self.plan.mode == "named":
            out = []
            if not self.calls:
                self.calls.append(self._new(self.plan.name))
                out.append(ToolCallDelta(0, self.calls[0]["id"], self.plan.name, ""))
            if text:
                self.calls[0]["function"]["arguments"] += text
                if out:
                    out[0].arguments = text
                else:
                    out.append(ToolCallDelta(0, arguments=text))
            return out
        out: list[ToolCallDelta] = []
        while self.pos < len(self.buf):
            if not self._in_args:
                m = _CALL_HEAD.search(self.buf, self.pos)
                if m is None:
                    break
                name = json.loads(f'"{m.group(1)}"')
                self.calls.append(self._new(name))
                out.append(ToolCallDelta(len(self.calls) - 1, self.calls[-1]["id"], name, ""))
                self.pos, self._in_args, self._depth = m.end(), True, 0
                continue
            start = self.pos
            while self.pos < len(self.buf) and self._in_args:
                ch = self.buf[self.pos]
                self.pos += 1
                if self._depth == 0 and ch in " \t\n\r":  # whitespace before the arguments object
                    start = self.pos
                    continue
                if self._in_str:
                    self._in_str = not (ch == '"' and not self._esc)
                    self._esc = ch == "\\" and not self._esc
                elif ch == '"':
                    self._in_str = True
                elif ch in "{[":
                    self._depth += 1
                elif ch in "}]":
                    self._depth -= 1
                    self._in_args = self._depth > 0
            piece = self.buf[start:self.pos]
            if piece:
                self.calls[-1]["function"]["arguments"] += piece
                if out and out[-1].index == len(self.calls) - 1:
                    out[-1].arguments += piece
                else:
                    out.append(ToolCallDelta(len(self.calls) - 1, arguments=piece))
        return out

    @staticmethod
    def _new(name: str) -> dict:
        return {"id": call_id(), "type": "function", "function": {"name": name, "arguments": ""}}
