"""Request fields that constrain the output -> StructuredOutputs: OpenAI's response_format, vLLM's structured_outputs and guided_*."""

from __future__ import annotations

from services.common.errors import InvalidArgument
from services.common.structured_output import KINDS, StructuredOutputs
from services.router.openai.protocol import GenerationRequest

_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def structured_outputs(r: GenerationRequest) -> StructuredOutputs | None:
    """The one constraint the request asks for (None: unconstrained). Two at once is a 400; so is a
    schema, regex or grammar that cannot be compiled (the message names the field)."""
    found: list[StructuredOutputs] = []
    rf = r.response_format
    if rf is not None:
        kind = rf.get("type")
        if kind == "json_object":
            found.append(StructuredOutputs(json_object=True, field_name="response_format"))
        elif kind == "json_schema":
            js = rf.get("json_schema")
            if not isinstance(js, dict) or "schema" not in js:
                raise InvalidArgument("response_format.json_schema: must be an object with a `schema`")
            found.append(StructuredOutputs.from_schema(js["schema"], "response_format.json_schema.schema"))
        elif kind not in (None, "text"):
            raise InvalidArgument(f"response_format.type: must be text, json_object or json_schema, got {kind!r}")
    if r.structured_outputs:
        so = {k: v for k, v in r.structured_outputs.items() if v is not None and v is not False}
        unknown = sorted(set(so) - set(KINDS) - {"disable_fallback", "disable_any_whitespace",
                                                  "disable_additional_properties", "whitespace_pattern"})
        if unknown:
            raise InvalidArgument(f"structured_outputs.{unknown[0]}: not supported (give one of {', '.join(KINDS)})")
        for kind in KINDS:
            if kind in so:
                found.append(_one(kind, so[kind], f"structured_outputs.{kind}"))
    for name, kind in _GUIDED.items():
        value = getattr(r, name)
        if value is not None:
            found.append(_one(kind, value, name))
    if len(found) > 1:
        raise InvalidArgument(f"{found[1].field_name}: only one structured output constraint per request "
                              f"(also given: {found[0].field_name})")
    return found[0] if found else None


def _one(kind: str, value, field: str) -> StructuredOutputs:
    if kind == "json":
        return StructuredOutputs.from_schema(value, field)
    if kind == "json_object":
        return StructuredOutputs(json_object=True, field_name=field)
    if kind == "choice":
        if not isinstance(value, list):
            raise InvalidArgument(f"{field}: must be a list of strings")
        return StructuredOutputs(choice=tuple(value), field_name=field)
    if not isinstance(value, str):
        raise InvalidArgument(f"{field}: must be a string")
    return StructuredOutputs(**{kind: value}, field_name=field)
