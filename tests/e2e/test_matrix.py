"""The full fault matrix: every phase x every kind x every layout (``make test-matrix``).

One run per (layout, kind) carries seven faults, one per phase at steps 2..8, on rotating
ranks; each run must end bit for bit equal to the fault-free run.
"""

from __future__ import annotations

import pytest

from conftest import FaultFreeRuns, ncl_launch
from nemo_checkpointless.recovery.faults import KINDS
from nemo_checkpointless.steps import PHASES
from test_recovery import LAYOUTS, plan

pytestmark = [pytest.mark.matrix, pytest.mark.timeout(900)]

STEPS = 10
BASE = ["checkpointless=tier4", f"trainer.max_steps={STEPS}"]


@pytest.fixture(scope="module")
def matrix_reference(tmp_path_factory):
    return FaultFreeRuns(tmp_path_factory, BASE, LAYOUTS, "mref")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_phase(layout, kind, tmp_path, matrix_reference):
    faults = [((i + 1) % 4, i + 2, phase, kind) for i, phase in enumerate(PHASES)]
    result = ncl_launch(4, [*BASE, *LAYOUTS[layout], plan(*faults)], tmp_path / "run",
                        spares=2, timeout=800)
    result.check()
    ref = matrix_reference(layout)
    assert [r["loss_hex"] for r in result.metrics] == [r["loss_hex"] for r in ref.metrics]
    assert result.summary["state_sha256"] == ref.summary["state_sha256"]
    assert len(result.summary["recoveries"]) == len(PHASES)
