"""One config-field convention: a field's docstring is its flag's help, a Literal type its choices; every
service's --help documents every flag, and `folio up` passes EngineConfig's flags on to its engines."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import typing
from dataclasses import dataclass
from typing import Literal

import pytest

from folio import cli
from services.common import config as cfg
from services.engine import server as engine_server
from services.engine.config import SERVED_DEFAULTS, EngineConfig
from services.router import server as router_server
from services.tokenizer import server as tokenizer_server


def _up_parser() -> argparse.ArgumentParser:
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["up"]


PARSERS = {"engine": engine_server.build_parser, "router": router_server.build_parser,
           "tokenizer": tokenizer_server.build_parser, "folio up": _up_parser}


@pytest.mark.parametrize("name", PARSERS)
def test_every_flag_of_every_service_has_help(name):
    parser = PARSERS[name]()
    flags = [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]
    assert flags
    for a in flags:
        assert a.help and a.help != argparse.SUPPRESS and a.help.strip(" .()").strip(), f"{name}: {a.option_strings}"


def test_engine_help_prints_each_fields_docstring():
    """Must-show 5, through the real command."""
    out = subprocess.run([sys.executable, "-m", "services.engine", "--help"], capture_output=True, text=True,
                         check=True).stdout
    flat = " ".join(out.split())
    for name, doc in cfg.field_docs(EngineConfig).items():
        assert "--" + name.replace("_", "-") in flat
        assert " ".join(doc.split()) in flat, name
    for name, doc in cfg.field_docs(engine_server.EngineServerConfig).items():
        assert " ".join(doc.split()) in flat, name
    assert "--dtype {auto,float32,bfloat16,float16}" in flat and "--attention-backend {torch,triton}" in flat


@dataclass
class _Demo:
    mode: Literal["fast", "slow"] = "fast"
    """How to go."""
    backend: Literal["a", "b"] | None = None
    """Which one; None picks."""
    names: list[str] = dataclasses.field(default_factory=list)
    """Names,
    one per flag."""
    on: bool = True
    """Whether it is on."""

    def __post_init__(self):
        cfg.check_choices(self)


@dataclass
class _Undocumented:
    size: int = 1


def test_docstrings_become_help_and_literals_become_choices(capsys):
    assert cfg.field_docs(_Demo) == {"mode": "How to go.", "backend": "Which one; None picks.",
                                     "names": "Names,\none per flag.", "on": "Whether it is on."}
    p = argparse.ArgumentParser()
    cfg.add_args(p, _Demo)
    d = cfg.from_args(_Demo, p.parse_args(["--mode", "slow", "--names", "x", "--names", "y", "--no-on"]))
    assert d == _Demo(mode="slow", backend=None, names=["x", "y"], on=False)
    with pytest.raises(SystemExit):
        p.parse_args(["--backend", "c"])
    assert "invalid choice: 'c'" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"mode must be one of \('fast', 'slow'\), got 'medium'"):
        _Demo(mode="medium")
    fwd = argparse.ArgumentParser()
    cfg.add_args(fwd, _Demo, forward=True)
    assert cfg.to_argv(_Demo, fwd.parse_args([])) == []  # nothing given, nothing passed on
    given = ["--mode", "slow", "--names", "x", "--names", "y", "--no-on"]
    assert cfg.to_argv(_Demo, fwd.parse_args(given)) == given
    with pytest.raises(TypeError, match="_Undocumented.size has no docstring"):
        cfg.add_args(argparse.ArgumentParser(), _Undocumented)


def test_engine_config_checks_its_choices_when_built_in_code():
    with pytest.raises(ValueError, match="load_format must be one of"):
        EngineConfig(load_format="pickle")
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        EngineConfig(attention_backend="flash")
    with pytest.raises(ValueError, match="dtype must be one of"):
        EngineConfig(dtype="float8")


def test_engine_dtype_choices_are_the_loaders():
    from services.engine.model.loader import DTYPES

    assert cfg.choices(typing.get_type_hints(EngineConfig)["dtype"]) == ("auto", *DTYPES)


def test_folio_up_passes_on_exactly_the_engine_flags_it_was_given():
    args = cli.build_parser().parse_args(["up", "--engines", "2", "--device", "cpu", "--max-model-len", "2048",
                                          "--cpu-kv-cache-bytes", "134217728", "--no-enable-prefix-caching"])
    argv = cfg.to_argv(EngineConfig, args, only=cli._engine_flags())
    assert argv == ["--device", "cpu", "--max-model-len", "2048", "--cpu-kv-cache-bytes", "134217728",
                    "--no-enable-prefix-caching"]
    ec, _ = engine_server.parse_config(argv)
    assert ec == EngineConfig(device="cpu", max_model_len=2048, cpu_kv_cache_bytes=134217728,
                              enable_prefix_caching=False, **SERVED_DEFAULTS)
    assert cfg.to_argv(EngineConfig, cli.build_parser().parse_args(["up"]), only=cli._engine_flags()) == []


def test_folio_up_offers_every_engine_field_but_the_model():
    up_flags = {s for a in _up_parser()._actions for s in a.option_strings}
    for f in dataclasses.fields(EngineConfig):
        assert ("--" + f.name.replace("_", "-")) in up_flags
    assert "--model" in up_flags  # folio up's own: it serves the tokenizer too, and is not forwarded twice
    assert "model" not in cli._engine_flags()


def test_folio_up_passes_extra_flags_to_each_service():
    args = cli.build_parser().parse_args([
        "up", "--max-model-len", "2048", "--engine-arg=--metrics-port 9100",
        "--router-arg=--tool-call-parser mistral", "--router-arg", "--max-n 8",
        "--tokenizer-arg=--log-level DEBUG"])
    c = cli.stack_config(args)
    assert c.engine_args == ["--max-model-len", "2048", "--metrics-port", "9100"]
    assert c.router_args == ["--tool-call-parser", "mistral", "--max-n", "8"]
    assert c.tokenizer_args == ["--log-level", "DEBUG"]
    for service, argv in (("router", c.router_args), ("tokenizer", c.tokenizer_args)):
        PARSERS[service]().parse_args(argv)  # each is a flag that service has
