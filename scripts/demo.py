"""`make demo`: tiny_gpt on 4 CPU ranks, run twice, showing the loss curve and that the
two runs end in the same state hash (the exactness that recovery is measured against)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(run_dir: Path, overrides: list[str]) -> dict:
    from nemo_checkpointless.comm.world import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           str(REPO / "recipes" / "pretrain.py"), *overrides, f"hydra.run.dir={run_dir}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL,
                   stderr=open(run_dir.with_suffix(".log"), "w"))
    return json.loads((run_dir / "summary.json").read_text())


def main() -> None:
    overrides = ["recipe=tiny_gpt", "strategy.tensor_model_parallel_size=2", "trainer.max_steps=20"]
    root = Path(tempfile.mkdtemp(prefix="ncl-demo-"))
    print(f"tiny_gpt, 4 CPU ranks (TP=2, DP=2), 20 steps; run dirs under {root}")
    a = run(root / "a", overrides)
    for line in (root / "a" / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        print(f"  step {row['step']:3d}  loss {row['loss']:.4f}  {row['step_time_s']:.3f}s")
    b = run(root / "b", overrides)
    same = a["state_sha256"] == b["state_sha256"]
    print(f"state_sha256 run 1: {a['state_sha256']}")
    print(f"state_sha256 run 2: {b['state_sha256']}")
    print("bitwise identical: " + ("yes" if same else "NO"))
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
