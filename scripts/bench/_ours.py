"""Our side of the peer comparison: bench_gpt through ncl-launch with one warm spare.

``run(run_dir, steps, kill_step)`` launches the real recipe (tier 4, DP=4, 2 optimizer
instances) and returns its summary; ``kill_step`` is 1-based, as our step counter. The
kill-to-first-step time is ``summary.json`` ``recoveries[0].total_s``; exactness is
``state_sha256`` and every ``loss_hex`` equal to the fault-free run's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run(run_dir: Path, steps: int, kill_step: int | None) -> dict:
    from nemo_checkpointless.comm.world import free_port

    fault = [] if kill_step is None else [
        f"fault.plan=[{{rank:1,step:{kill_step},phase:optimizer,kind:kill}}]"]
    cmd = [sys.executable, "-m", "nemo_checkpointless.launch.agent", "--nproc-per-node", "4",
           "--spares", "1", "--master-port", str(free_port()),
           # a loaded 2-core machine stalls ranks for seconds: a silent rank is not a hung one
           "--hang-timeout", "30", str(REPO / "recipes" / "pretrain.py"), "recipe=bench_gpt", "checkpointless=tier4",
           f"trainer.max_steps={steps}", *fault, f"hydra.run.dir={run_dir}"]
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    if not (run_dir / "summary.json").exists():  # else: a finished run, reused
        _launch(cmd, run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"summary": summary, "loss_hex": [m["loss_hex"] for m in metrics]}


def _launch(cmd: list[str], run_dir: Path) -> None:
    with open(run_dir.parent / f"{run_dir.name}.log", "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))


def compare(steps: int, kill_step: int, root: Path) -> dict:
    """The fault-free run and the faulted one; kill-to-first-step and exactness."""
    ref = run(root / "ours_ref", steps, None)
    hit = run(root / "ours_fault", steps, kill_step)
    rec = hit["summary"]["recoveries"][0]
    exact = (hit["summary"]["state_sha256"] == ref["summary"]["state_sha256"]
             and hit["loss_hex"] == ref["loss_hex"])
    return {"s": rec["total_s"], "phases": rec.get("phases", {}), "exact": exact,
            "restores": "model + optimizer shard + RNG + data position, from DP peers (in memory)",
            "sha256": hit["summary"]["state_sha256"], "ref_sha256": ref["summary"]["state_sha256"]}
