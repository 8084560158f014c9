"""The planner's replica sets are the groups megatron actually builds.

A 4-rank and an 8-rank gloo job run ``initialize_model_parallel`` (through
``parallel.initialize``) for several layouts and report, per rank: the TP, PP, DP x CP,
intra- and inter-instance groups, the shard key recovery uses, and the parameters the
rank's model chunks hold (built on the meta device). Each must equal the planner's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import _env, free_port
from nemo_checkpointless.config import compose
from nemo_checkpointless.plan import megatron_groups, plan_layout, stage_parameters

pytestmark = [pytest.mark.dist, pytest.mark.timeout(120)]

WORKER = Path(__file__).with_name("plan_groups_worker.py")
K2 = "strategy.num_distributed_optimizer_instances=2"
LAYOUTS = {
    4: [
        [K2],                                                             # dp4 (e2e tests)
        ["strategy.tensor_model_parallel_size=2", K2],                    # tp2 (e2e tests)
        ["strategy.pipeline_model_parallel_size=2", K2],                  # pp2 (e2e tests)
        ["strategy.num_distributed_optimizer_instances=4"],
        ["strategy.tensor_model_parallel_size=2", "strategy.use_distributed_optimizer=false"],
        [],                                                               # one instance
    ],
    8: [
        ["strategy.tensor_model_parallel_size=2", "strategy.context_parallel_size=2", K2],
        ["strategy.tensor_model_parallel_size=2", "strategy.pipeline_model_parallel_size=2",
         "strategy.virtual_pipeline_model_parallel_size=2", K2],
        ["strategy.pipeline_model_parallel_size=2", "strategy.context_parallel_size=2",
         "strategy.num_distributed_optimizer_instances=4"],
        ["strategy.context_parallel_size=4", K2],
    ],
}


def run_job(world: int) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           str(WORKER), json.dumps(LAYOUTS[world])]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return [json.loads(line.split("RESULT ", 1)[1]) for line in proc.stdout.splitlines()
            if line.startswith("RESULT ")]


def group_of(groups: list[list[int]], rank: int) -> list[int]:
    (group,) = [g for g in groups if rank in g]
    return group


@pytest.mark.parametrize("world", [4, 8])
def test_replica_sets_equal_megatron_groups(world):
    results = run_job(world)
    assert len(results) == world * len(LAYOUTS[world])
    for index, overrides in enumerate(LAYOUTS[world]):
        cfg = compose(["recipe=tiny_gpt", *overrides])
        plan = plan_layout(cfg, world, ranks_per_node=2)
        groups = megatron_groups(plan.layout)
        s = cfg.strategy
        stage = stage_parameters(cfg.model, s.tensor_model_parallel_size,
                                 s.pipeline_model_parallel_size, cfg.data.seq_length)
        for got in (r for r in results if r["layout"] == index):
            rank, why = got["rank"], (overrides, got)
            for name in ("tp", "pp", "dp_cp", "intra_instance"):
                assert got[name] == group_of(groups[name], rank), why
            key = tuple(got["shard_key"])
            assert plan.replicas.key_of[rank] == key, why
            holders = list(plan.replicas.holders[key])
            if not s.use_distributed_optimizer:
                assert holders == sorted(got["dp_cp"]), why
            elif s.num_distributed_optimizer_instances > 1:
                assert got["inter_instance"] == group_of(groups["inter_instance"], rank), why
                assert holders == sorted(got["inter_instance"]), why
            else:
                assert got["inter_instance"] is None and holders == [rank], why
            if got["params"] is not None:
                assert got["params"] == stage[got["pp_rank"]], why
