"""Service configs are dataclasses; their command-line flags are derived from the fields.

Each field's `metadata["help"]` is its flag's help. Environment variables are read only by a
service's `main()` (as flag defaults), never at import time.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing


def add_args(parser: argparse.ArgumentParser, cls, defaults: dict | None = None) -> None:
    """Add one `--field-name` flag per dataclass field of `cls`."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init or f.metadata.get("cli") is False:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = (defaults or {}).get(f.name, f.default if f.default is not dataclasses.MISSING else
                                       (f.default_factory() if f.default_factory is not dataclasses.MISSING else None))
        typ = hints[f.name]
        help_ = f.metadata.get("help", "")
        args = typing.get_args(typ)
        base = next((a for a in args if a is not type(None)), typ) if args else typ
        if typing.get_origin(typ) in (list, tuple) or typing.get_origin(base) in (list, tuple):
            parser.add_argument(flag, action="append", default=None, help=help_ + " (repeatable)")
            parser.set_defaults(**{f.name: default})
        elif base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_)
        else:
            parser.add_argument(flag, type=base if base in (int, float, str) else str, default=default,
                                help=f"{help_} (default: {default})")


def from_args(cls, ns: argparse.Namespace, **overrides):
    """Build `cls` from parsed flags (unknown attributes of `ns` are ignored)."""
    kw = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if f.init and hasattr(ns, f.name)}
    kw.update(overrides)
    return cls(**kw)


def field(default, help: str, **kw):
    """A dataclass field with help text for its command-line flag."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return dataclasses.field(default=default, metadata={"help": help, **kw})
