"""A NeMo 2 recipe object submitted by NeMo-Run's own Slurm executor, as a user would.

    NEMORUN_HOME=/tmp/nemorun-home .venv-nemo/bin/python tests/e2e/scripts/nemo_run_slurm.py \\
        /abs/run_dir [--kill RANK:STEP:PHASE]

``run.run(apply_checkpointless(recipe), executor=run.SlurmExecutor(..., launcher=NclLaunch))``
on the single-node Slurm of this machine (scripts/slurm/local_cluster.sh): NeMo-Run writes
the batch script and the node script, submits with ``sbatch`` through a ``LocalTunnel``
(this machine is the login node) and follows the job with ``sacct`` until it ends. The node
runs one ``ncl-launch`` agent (``ntasks_per_node=1``) with 2 CPU ranks and a warm spare;
``--kill`` has the fault plan SIGKILL one rank. tests/e2e/test_slurm_entries.py runs it.
NeMo-Run 0.11 replaces "/nemo_run" in the paths of its batch script (its directory inside a
container) by the job's directory, also without a container: keep that string out of
NEMORUN_HOME (its default, ~/.nemo_run, is fine).
"""

from __future__ import annotations

import argparse
import sys

import nemo_run as run

from nemo_checkpointless.comm.world import free_port
from nemo_checkpointless.nemo import NclLaunch, apply_checkpointless, tiny_llama


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="absolute: metrics.jsonl, events, summary, NeMo logs")
    parser.add_argument("--kill", default=None, metavar="RANK:STEP:PHASE")
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args(argv)
    plan = []
    if args.kill:
        rank, step, phase = args.kill.split(":")
        plan = [dict(rank=int(rank), step=int(step), phase=phase, kind="kill")]

    recipe = tiny_llama.pretrain_recipe(max_steps=args.steps, dir=f"{args.run_dir}/log")
    recipe = apply_checkpointless(recipe, run_dir=args.run_dir, fault_plan=plan)
    executor = run.SlurmExecutor(
        account="root", partition="debug", nodes=1, ntasks_per_node=1, exclusive=True,
        time="00:20:00",
        # this machine is the login node; NeMo-Run's LocalTunnel copies nothing, so its
        # job_dir must be NeMo-Run's own experiment directory ("" picks it)
        tunnel=run.LocalTunnel(job_dir=""),
        # nothing to ship: the package is installed in the environment the node runs
        packager=run.Packager(),
        env_vars={"NCL_FORCE_CPU": "1", "OMP_NUM_THREADS": "1",
                  "NCL_HANG_TIMEOUT_S": "30"},  # NeMo's set-up is slow on 2 shared cores
        launcher=NclLaunch(nproc_per_node=2, nnodes=1, spares=1, port=free_port(),
                           python=sys.executable))
    run.run(recipe, executor=executor, name="tiny", tail_logs=False)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
