"""The generated stubs: fresh, reproducible from one command, importable under grpcio 1.84 and 1.85."""

from __future__ import annotations

import filecmp
import importlib
import sys

import grpc

from protos import generate as gen


def test_stubs_are_fresh_and_reproducible(tmp_path):
    gen.ensure_generated()
    assert gen.is_fresh(), "protos/gen is older than protos/folio/v1/*.proto: run `make protos`"
    out = tmp_path / "gen"
    gen.generate(out)
    cmp = filecmp.dircmp(gen.GEN / "folio" / "v1", out / "folio" / "v1", ignore=["__pycache__"])
    assert not cmp.diff_files and not cmp.left_only and not cmp.right_only, (cmp.diff_files, cmp.left_only, cmp.right_only)


def test_stubs_import_on_grpcio_1_84(monkeypatch):
    names = [f"protos.gen.folio.v1.{s}_pb2_grpc" for s in ("tokenizer", "engine", "router")]
    for name in names:
        mod = importlib.import_module(name)
        assert mod.GRPC_GENERATED_VERSION == gen.MIN_GRPC_VERSION == "1.84.0"
    monkeypatch.setattr(grpc, "__version__", "1.84.0")
    for name in names:
        sys.modules.pop(name)
        importlib.import_module(name)  # raises RuntimeError if the version check refuses 1.84
    monkeypatch.setattr(grpc, "__version__", "1.83.0")
    sys.modules.pop(names[0])
    try:
        importlib.import_module(names[0])
        raise AssertionError("the version check should refuse grpcio 1.83")
    except RuntimeError:
        pass
    finally:
        sys.modules.pop(names[0], None)


def test_every_proto_field_and_enum_is_documented():
    import re

    for path in sorted(gen.SRC.glob("*.proto")):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            s = line.strip()
            is_field = re.match(r"^(optional |repeated )?[\w.]+ \w+ = \d+;", s) or re.match(r"^[A-Z_]+ = \d+;", s)
            if is_field:
                assert lines[i - 1].strip().startswith("//"), f"{path.name}:{i + 1}: {s} has no comment above it"
        for m in re.finditer(r"enum (\w+) \{\s*//[^\n]*\n\s*(\w+) = 0;", path.read_text()):
            assert m.group(2).endswith("_UNSPECIFIED") and m.group(2).startswith(re.sub(r"(?<!^)([A-Z])", r"_\1", m.group(1)).upper())
