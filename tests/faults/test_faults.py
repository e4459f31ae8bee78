"""Each scenario against real processes and servers; the pass rule is lost = 0 and duplicate committed
outputs = 0, plus the scenario's own expectations (see tests/faults/scenarios.py)."""

from __future__ import annotations

import json

import pytest

from tests.faults.conftest import FULL
from tests.faults.scenarios import SCENARIOS

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_no_item_is_lost_or_committed_twice(scenario, fault_env):
    report = SCENARIOS[scenario](fault_env, FULL)
    print(json.dumps(report.as_dict(), indent=1))
    assert report.lost == 0, report
    assert report.duplicate_outputs == 0, report
    assert not report.checks, report
