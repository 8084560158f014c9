"""Median step time of tiny_gpt at each 4-rank layout on this machine (CPU, gloo).

    .venv/bin/python scripts/bench/step_time.py [--steps 20]

Prints one line per layout and, last, a JSON object {layout: median_step_s}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LAYOUTS = {
    "TP=2 DP=2": ["strategy.tensor_model_parallel_size=2"],
    "TP=1 PP=2 DP=2": ["strategy.pipeline_model_parallel_size=2"],
    "DP=4, 2 optimizer instances": ["strategy.num_distributed_optimizer_instances=2"],
}


def median_step(overrides: list[str], steps: int, run_dir: Path) -> float:
    from nemo_checkpointless.comm.world import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           str(REPO / "recipes" / "pretrain.py"), *overrides, f"trainer.max_steps={steps}",
           f"hydra.run.dir={run_dir}"]
    subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["step_time_s"] for r in rows[2:])  # skip warm-up steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="ncl-steptime-"))
    result = {}
    for i, (name, overrides) in enumerate(LAYOUTS.items()):
        result[name] = round(median_step(overrides, args.steps, root / str(i)), 4)
        print(f"{name:32s} median step {result[name]:.3f} s", flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
