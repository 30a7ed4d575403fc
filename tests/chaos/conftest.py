"""Chaos fixtures: the offline reference model, shared with the integration tests."""

from tests.integration.conftest import offline_llm  # noqa: F401
