"""The fault suite: ``pytest tests/faults`` runs the fast subset (as CI does); ``AIGC_FAULTS=full`` runs
every scenario, and ``python -m bench.faults`` prints the table of figures for all of them."""

from __future__ import annotations

import os

import pytest

from tests.conftest import PG_ADMIN_URL
from tests.faults.scenarios import FAST

FULL = os.environ.get("AIGC_FAULTS", "").lower() == "full"


def pytest_collection_modifyitems(config, items):
    """Outside full mode the slow scenarios are deselected (counted as such in the summary), not skipped."""
    if FULL:
        return
    keep, drop = [], []
    for item in items:
        scenario = getattr(getattr(item, "callspec", None), "params", {}).get("scenario")
        (drop if scenario is not None and scenario not in FAST else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(scope="session")
def fault_env(tmp_path_factory, s3_server):
    from tests.faults.harness import FaultEnv
    from tests.support.models import build_tiny_text_model

    model = build_tiny_text_model(tmp_path_factory.mktemp("fault-model") / "m", n_layer=4, n_embd=128)
    env = FaultEnv(tmp_path_factory.mktemp("faults"), PG_ADMIN_URL, s3_server, model)
    yield env
    env.close()
