"""docs/models.md's table is the test suite's own list, and every registered architecture is tested."""

from pathlib import Path

from services.engine.model.registry import ARCHITECTURES as REGISTRY
from tests.models.architectures import ALIASES, ARCHITECTURES, TABLE_BEGIN, TABLE_END, table_markdown

ROOT = Path(__file__).resolve().parents[2]


def test_docs_table_matches_the_architecture_list():
    text = (ROOT / "docs" / "models.md").read_text()
    table = text.split(TABLE_BEGIN)[1].split(TABLE_END)[0].strip()
    assert table == table_markdown(ROOT).strip(), "docs/models.md is stale: run python -m tests.models.architectures"


def test_every_registered_architecture_has_a_test_model():
    tested = {a.architecture for a in ARCHITECTURES}
    assert set(REGISTRY) == tested | set(ALIASES), (set(REGISTRY) ^ (tested | set(ALIASES)))
    assert all(v in tested for v in ALIASES.values())
