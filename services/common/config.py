"""Service configs are dataclasses; their command-line flags are derived from the fields.

One convention, vLLM's: a field's attribute docstring (the string literal under it) is its flag's
help, and a `Literal[...]` type (optionally `| None`) gives the flag's choices; a config built in code
checks the same choices with `check_choices`. Every field has a docstring (`add_args` refuses a field
without one). Environment variables are read only by a service's `main()` (as flag defaults), never at
import time.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing


@functools.cache
def field_docs(cls) -> dict[str, str]:
    """Each field's attribute docstring, read from the source of `cls` and its dataclass bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for stmt, nxt in zip(body, body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[stmt.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def choices(typ) -> tuple | None:
    """The values a `Literal[...]` (or `Literal[...] | None`) type allows; None for any other type."""
    if typing.get_origin(typ) is typing.Literal:
        return typing.get_args(typ)
    for arg in typing.get_args(typ):
        if typing.get_origin(arg) is typing.Literal:
            return typing.get_args(arg)
    return None


def check_choices(obj) -> None:
    """Raise ValueError naming the field when a Literal-typed field of the dataclass `obj` holds another value."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        allowed = choices(hints[f.name])
        value = getattr(obj, f.name)
        if allowed is not None and value is not None and value not in allowed:
            raise ValueError(f"{f.name} must be one of {allowed}, got {value!r}")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _help(doc: str, default) -> str:
    """The docstring, and the default unless it is None (the docstring says what None means)."""
    return doc if default is None else f"{doc} (default: {default})"


def _optional_of(typ):
    """`X` for `X | None`; `typ` itself otherwise."""
    if typing.get_origin(typ) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(typ) if a is not type(None))
    return typ


def add_args(parser, cls, defaults: dict | None = None, only: typing.Iterable[str] | None = None,
             forward: bool = False) -> None:
    """Add one `--field-name` flag per init field of `cls` (or of those named in `only`).

    `defaults` replaces fields' defaults (shown in the help). With `forward`, an absent flag leaves no
    attribute in the namespace (argparse.SUPPRESS): a launcher passes on only the flags it was given
    (`to_argv`), so the child's own defaults stay the only ones.
    """
    hints, docs, defaults = typing.get_type_hints(cls), field_docs(cls), defaults or {}
    wanted = None if only is None else set(only)
    for f in dataclasses.fields(cls):
        if not f.init or (wanted is not None and f.name not in wanted):
            continue
        if f.name not in docs:
            raise TypeError(f"{cls.__name__}.{f.name} has no docstring: it is the flag's help")
        typ = hints[f.name]
        default = defaults.get(f.name, _default(f))
        kw = {"default": argparse.SUPPRESS} if forward else {"default": default}
        base, allowed = _optional_of(typ), choices(typ)
        if typing.get_origin(base) in (list, tuple):
            parser.add_argument(_flag(f.name), action="append", help=f"{docs[f.name]} (repeatable)",
                                default=argparse.SUPPRESS if forward else None)
            if not forward:
                parser.set_defaults(**{f.name: default})
        elif base is bool:
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction,
                                help=_help(docs[f.name], default), **kw)
        elif allowed is not None:
            parser.add_argument(_flag(f.name), type=type(allowed[0]), choices=allowed,
                                help=_help(docs[f.name], default), **kw)
        else:
            parser.add_argument(_flag(f.name), type=base if base in (int, float, str) else str,
                                help=_help(docs[f.name], default), **kw)


def from_args(cls, ns: argparse.Namespace, **overrides):
    """Build `cls` from parsed flags (unknown attributes of `ns` are ignored)."""
    kw = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if f.init and hasattr(ns, f.name)}
    kw.update(overrides)
    return cls(**kw)


def to_argv(cls, ns: argparse.Namespace, only: typing.Iterable[str] | None = None) -> list[str]:
    """The flags of `cls` (or of those named in `only`) present in `ns`, added with `forward=True`,
    as a child process's arguments."""
    argv: list[str] = []
    wanted = None if only is None else set(only)
    for f in dataclasses.fields(cls):
        if not hasattr(ns, f.name) or (wanted is not None and f.name not in wanted):
            continue
        v = getattr(ns, f.name)
        if isinstance(v, bool):
            argv.append(_flag(f.name) if v else "--no-" + f.name.replace("_", "-"))
        elif isinstance(v, (list, tuple)):
            for item in v:
                argv += [_flag(f.name), str(item)]
        else:
            argv += [_flag(f.name), str(v)]
    return argv
