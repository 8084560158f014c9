"""Median step time of tiny_gpt at each 4-rank layout on this machine (CPU, gloo).

    .venv/bin/python scripts/bench/step_time.py [--steps 20] [--layouts tp2,pp2,dp4]
    .venv/bin/python scripts/bench/step_time.py --steps 4 --layouts dp4           # quick

The median skips the first two steps (warm-up). Each run's output goes to
``<tmp>/<layout>.log``; a run that fails is reported with the tail of its log. Prints one
line per layout and, last, a JSON object {layout: median_step_s or null}.
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
LAYOUTS = {  # key (--layouts) -> (name, overrides)
    "tp2": ("TP=2 DP=2", ["strategy.tensor_model_parallel_size=2"]),
    "pp2": ("TP=1 PP=2 DP=2", ["strategy.pipeline_model_parallel_size=2"]),
    "dp4": ("DP=4, 2 optimizer instances", ["strategy.num_distributed_optimizer_instances=2"]),
}


def median_step(overrides: list[str], steps: int, run_dir: Path) -> float:
    """Runs the layout under torchrun; raises RuntimeError with the log's tail on failure."""
    from nemo_checkpointless.comm.world import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           str(REPO / "recipes" / "pretrain.py"), *overrides, f"trainer.max_steps={steps}",
           f"hydra.run.dir={run_dir}"]
    log = run_dir.parent / f"{run_dir.name}.log"
    with open(log, "w") as out:
        code = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=out,
                              stderr=subprocess.STDOUT).returncode
    if code != 0:
        tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-6:])
        raise RuntimeError(f"exit {code} (see {log}): {tail[-600:]}")
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["step_time_s"] for r in rows[2:])  # skip warm-up steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--layouts", default=",".join(LAYOUTS),
                        help=f"comma-separated, of {', '.join(LAYOUTS)}")
    args = parser.parse_args()
    keys = args.layouts.split(",")
    unknown = [k for k in keys if k not in LAYOUTS]
    if unknown:
        parser.error(f"unknown layout {', '.join(unknown)}: use {', '.join(LAYOUTS)}")
    if args.steps < 3:
        parser.error("--steps must be at least 3 (the first two are warm-up)")
    root = Path(tempfile.mkdtemp(prefix="ncl-steptime-"))
    print(f"runs under {root}", flush=True)
    result: dict[str, object] = {}
    failed = False
    for key in keys:
        name, overrides = LAYOUTS[key]
        try:
            result[name] = round(median_step(overrides, args.steps, root / key), 4)
            print(f"{name:32s} median step {result[name]:.3f} s", flush=True)
        except RuntimeError as e:
            failed, result[name] = True, None
            print(f"{name:32s} FAILED: {e}", flush=True)
    print(json.dumps(result))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
