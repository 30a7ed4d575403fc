"""Parsers of a model's own tool-call format (tool_choice auto), chosen by the router's --tool-call-parser as in vLLM.

Each takes the whole output text and returns (content, calls): the text outside the calls (None if
empty) and (name, arguments JSON string) per call. Output that does not parse as that format's calls
comes back whole as content with no calls: a malformed call is the model's text, never an error.
"""

from __future__ import annotations

import json
import re
from typing import Callable

Calls = list[tuple[str, str]]


def _call(obj, args_keys=("arguments", "parameters")) -> tuple[str, str] | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = next((obj[k] for k in args_keys if k in obj), {})
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return obj["name"], json.dumps(args, ensure_ascii=False)


def hermes(text: str) -> tuple[str | None, Calls]:
    """Hermes / Qwen: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, any number of them."""
    blocks = re.findall(r"<tool_call>(.*?)(?:</tool_call>|$)", text, re.S)
    if not blocks:
        return text, []
    calls = []
    for b in blocks:
        try:
            c = _call(json.loads(b.strip()))
        except json.JSONDecodeError:
            c = None
        if c is None:
            return text, []
        calls.append(c)
    content = text[:text.index("<tool_call>")].strip()
    return content or None, calls


def llama3_json(text: str) -> tuple[str | None, Calls]:
    """Llama 3.x JSON tool calls: the whole output is `{"name": ..., "parameters": {...}}` (optionally after
    `<|python_tag|>`), several separated by `;`."""
    body = text.strip().removeprefix("<|python_tag|>").strip()
    if not body.startswith("{"):
        return text, []
    dec = json.JSONDecoder()
    calls, i = [], 0
    while i < len(body):
        try:
            obj, end = dec.raw_decode(body, i)
        except json.JSONDecodeError:
            return text, []
        c = _call(obj)
        if c is None:
            return text, []
        calls.append(c)
        i = end
        while i < len(body) and body[i] in " \t\n;":
            i += 1
    return None, calls


def mistral(text: str) -> tuple[str | None, Calls]:
    """Mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` after any content."""
    if "[TOOL_CALLS]" not in text:
        return text, []
    content, _, rest = text.partition("[TOOL_CALLS]")
    try:
        obj, _ = json.JSONDecoder().raw_decode(rest.strip())
    except json.JSONDecodeError:
        return text, []
    objs = obj if isinstance(obj, list) else [obj]
    calls = [_call(o) for o in objs]
    if not calls or any(c is None for c in calls):
        return text, []
    return content.strip() or None, calls


PARSERS: dict[str, Callable[[str], tuple[str | None, Calls]]] = {
    "hermes": hermes, "llama3_json": llama3_json, "mistral": mistral}
