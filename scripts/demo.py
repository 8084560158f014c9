"""`make demo`: tiny_gpt on 4 CPU ranks through ncl-launch, one rank killed mid-run.

Prints the recovery timeline and whether the final state hash and every per-step loss
equal a fault-free run of the same configuration.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = ["recipe=tiny_gpt", "checkpointless=tier4",
             "strategy.num_distributed_optimizer_instances=2", "trainer.max_steps=12"]
FAULT = "fault.plan=[{rank:1,step:6,phase:optimizer,kind:kill}]"


def launch(run_dir: Path, extra: list[str], spares: int) -> None:
    from nemo_checkpointless.comm.world import free_port

    cmd = [sys.executable, "-m", "nemo_checkpointless.launch.agent", "--nproc-per-node", "4",
           "--spares", str(spares), "--master-port", str(free_port()),
           str(REPO / "recipes" / "pretrain.py"), *OVERRIDES, *extra,
           f"hydra.run.dir={run_dir}"]
    log = run_dir.parent / f"{run_dir.name}.log"
    with open(log, "w") as out:
        code = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT,
                               env=dict(os.environ, OMP_NUM_THREADS="1"))
    if code != 0:
        sys.exit(f"run failed (exit {code}); see {log}")


def rows(run_dir: Path, name: str) -> list[dict]:
    path = run_dir / name
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="ncl-demo-"))
    print("tiny_gpt, 4 CPU ranks (DP=4, 2 distributed-optimizer instances), 12 steps, "
          "1 warm spare;\nrank 1 is SIGKILLed at step 6 in the optimizer phase.\n")
    launch(root / "faulty", [FAULT], spares=1)
    for e in rows(root / "faulty", "events.jsonl"):
        if e["event"] == "fault":
            print(f"fault: rank {e['fault_rank']} {e['kind']} at step {e['step']} "
                  f"({e['phase']})")
        elif e["event"] == "recovery_phase":
            extra = ""
            if e["phase"] == "state_transfer":
                extra = f"  {e['bytes'] / 1e6:.1f} MB from peers, {e.get('mb_per_s') or 0:.0f} MB/s"
            if e["phase"] == "first_step":
                extra = f"  -> step {e['step']} done, {e['total_s']:.2f} s after the fault"
            print(f"  {e['phase']:<15s} {e['duration_s']:7.3f} s{extra}")
    print("\nsame configuration without the fault ...")
    launch(root / "clean", [], spares=0)
    a, b = rows(root / "faulty", "metrics.jsonl"), rows(root / "clean", "metrics.jsonl")
    for ra, rb in zip(a, b):
        mark = "==" if ra["loss_hex"] == rb["loss_hex"] else "!="
        print(f"  step {ra['step']:2d}  loss {ra['loss']:.6f} {mark} {rb['loss']:.6f}")
    ha = json.loads((root / "faulty" / "summary.json").read_text())["state_sha256"]
    hb = json.loads((root / "clean" / "summary.json").read_text())["state_sha256"]
    same = ha == hb and [r["loss_hex"] for r in a] == [r["loss_hex"] for r in b]
    print(f"\nstate_sha256 with the failure:    {ha}\nstate_sha256 without the failure: {hb}")
    print("bit-for-bit identical: " + ("yes" if same else "NO"))
    print(f"run directories: {root}")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
