"""What a request constrains its output to (JSON schema, any JSON object, regex, choice, EBNF grammar), validated.

The request-side half of structured output, shared by the router (HTTP/gRPC validation, 400 before
any engine is asked) and the engine (which compiles it against its tokenizer off the step's critical
path: services/engine/structured.py). Validation builds xgrammar's tokenizer-independent `Grammar`,
so an uncompilable schema, regex or grammar is a ValueError naming the field, in milliseconds.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

KINDS = ("json", "json_object", "regex", "choice", "grammar")

# JSON-schema keywords xgrammar 0.2.8 accepts but does not enforce (an instance that breaks them still
# passes its grammar; measured): refused, so a schema never promises what the output may not keep.
# allOf is enforced only with a single subschema. oneOf is enforced as anyOf (the usual disjoint
# alternatives, e.g. pydantic's discriminated unions, mean the same).
_UNENFORCED = ("not", "if", "then", "else", "contains", "minContains", "maxContains", "dependentSchemas",
               "unevaluatedItems")
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_ONE = ("items", "additionalProperties", "additionalItems", "propertyNames", "unevaluatedProperties")


def unenforced_keyword(schema, path: str = "") -> str | None:
    """The JSON pointer of the first keyword in `schema` that xgrammar would not enforce, or None."""
    if not isinstance(schema, dict):
        return None
    for k in _UNENFORCED:
        if k in schema:
            return f"{path}/{k}"
    if isinstance(schema.get("allOf"), list) and len(schema["allOf"]) > 1:
        return f"{path}/allOf"
    for k in _SCHEMA_MAPS:
        if isinstance(schema.get(k), dict):
            for name, sub in schema[k].items():
                found = unenforced_keyword(sub, f"{path}/{k}/{name}")
                if found:
                    return found
    for k in _SCHEMA_LISTS:
        if isinstance(schema.get(k), list):
            for i, sub in enumerate(schema[k]):
                found = unenforced_keyword(sub, f"{path}/{k}/{i}")
                if found:
                    return found
    for k in _SCHEMA_ONE:
        found = unenforced_keyword(schema.get(k), f"{path}/{k}")
        if found:
            return found
    return None


@dataclass(frozen=True)
class StructuredOutputs:
    """Exactly one constraint. `json` is a JSON schema as a JSON string (property order kept: the output follows it)."""

    json: str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    """An EBNF (GBNF) grammar whose start rule is `root`."""
    resume_tokens: int = 0
    """The prompt's last `resume_tokens` tokens were generated under this constraint (the router resumes
    a stream on another engine with prompt + output so far): the engine's matcher is fast-forwarded
    over them before it constrains the next token."""
    field_name: str = field(default="structured_outputs", compare=False)
    """The request field errors name (e.g. response_format.json_schema.schema, guided_regex)."""

    def __post_init__(self) -> None:
        if isinstance(self.choice, list):
            object.__setattr__(self, "choice", tuple(self.choice))
        if sum(x is not None and x is not False for x in (self.json, self.json_object or None, self.regex,
                                                            self.choice, self.grammar)) != 1:
            raise ValueError(f"{self.field_name}: give exactly one of json, json_object, regex, choice, grammar")
        if isinstance(self.resume_tokens, bool) or not isinstance(self.resume_tokens, int) or self.resume_tokens < 0:
            raise ValueError(f"{self.field_name}.resume_tokens: must be an integer >= 0")
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) and c for c in self.choice)):
            raise ValueError(f"{self.field_name}: choice must be a non-empty list of non-empty strings")

    @classmethod
    def from_schema(cls, schema, field_name: str) -> "StructuredOutputs":
        """A JSON schema given as an object or a JSON string."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ValueError(f"{field_name}: not valid JSON ({e.msg})") from None
        if not isinstance(schema, (dict, bool)):
            raise ValueError(f"{field_name}: a JSON schema must be an object")
        return cls(json=json.dumps(schema), field_name=field_name)

    def _check_keywords(self) -> None:
        """A keyword the grammar engine would not enforce is refused, naming where it is."""
        found = unenforced_keyword(json.loads(self.json))
        if found:
            raise ValueError(f"{self.field_name}: unsupported keyword {found.rsplit('/', 1)[1]!r} at {found!r} "
                             "(structured output cannot enforce it)")

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    @property
    def key(self) -> tuple:
        """Cache key of the compiled grammar."""
        return (self.kind, getattr(self, self.kind))

    def grammar_obj(self):
        """xgrammar's tokenizer-independent Grammar; ValueError naming the field when it cannot be built."""
        import xgrammar as xgr

        if self.json is not None:
            self._check_keywords()
        try:
            if self.json is not None:
                return xgr.Grammar.from_json_schema(self.json, any_whitespace=False, strict_mode=True)
            if self.json_object:
                # Any object (OpenAI's json_object): properties of any name and value.
                return xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
            if self.regex is not None:
                return xgr.Grammar.from_regex(self.regex)
            if self.choice is not None:
                return xgr.Grammar.from_ebnf("root ::= " + " | ".join(json.dumps(c) for c in self.choice))
            return xgr.Grammar.from_ebnf(self.grammar)
        except Exception as e:  # xgrammar raises RuntimeError / its own errors with a message
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            msg = re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", msg)  # xgrammar's "[time] file.cc:line: " prefix
            raise ValueError(f"{self.field_name}: cannot be compiled: {msg}") from None

    def validate(self) -> None:
        self.grammar_obj()

    # --- the wire form (a dict; services/common/convert.py maps it to protobuf) ---------------
    def to_dict(self) -> dict:
        return {self.kind: list(self.choice) if self.choice is not None else getattr(self, self.kind)}


def warm_structured_outputs() -> None:
    """Import xgrammar and build one grammar (what a service validating requests pays once, ~2.5 s of CPU),
    so that it happens at start (on a thread) rather than inside the first structured request."""
    try:
        StructuredOutputs(json_object=True).validate()
    except Exception:  # noqa: BLE001 - a warm-up only: the first real request reports any problem
        pass
