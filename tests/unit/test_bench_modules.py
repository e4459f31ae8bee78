"""The benchmark scripts stay importable and keep their command-line entry points (they run outside CI)."""

from __future__ import annotations

import importlib

import pytest

from bench.__main__ import ALL


@pytest.mark.parametrize("name", [*ALL, "faults", "whatif"])
def test_each_benchmark_imports_and_has_a_main(name):
    module = importlib.import_module(f"bench.{name}")
    assert callable(getattr(module, "main", None)), f"bench.{name} has no main()"
