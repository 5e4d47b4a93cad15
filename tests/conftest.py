"""Shared fixtures live in tests/fixtures_*.py, one module per area."""

pytest_plugins = [
    "tests.fixtures_cli",
    "tests.fixtures_store",
    "tests.fixtures_titan",
]
