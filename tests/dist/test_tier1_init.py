"""Tier 1 start-up on 4 to 16 CPU ranks: groups, node loss, and the training entry point.

Ranks are plain processes configured by environment variables only (RANK, WORLD_SIZE,
NCL_STORE_ENDPOINTS, NCL_JOB_ID/SECRET), forked from one "zygote" (this file run as a
script) that imports torch and megatron once, so 16 ranks fit in seconds on 2 cores. Store
servers are agent stand-ins: one child process per node, killable like a node's agent.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest

HERE = Path(__file__).resolve()
REPO = HERE.parents[2]
pytestmark = [pytest.mark.dist]


def _zygote(spec: dict) -> dict:
    """Run one scenario; returns a summary (printed as the last line of stdout)."""
    import datetime

    import torch  # noqa: F401  (imported before forking)
    from megatron.core import parallel_state  # noqa: F401

    from nemo_checkpointless.comm.init import host_shard
    from nemo_checkpointless.comm.store import JobIdentity, connect
    from nemo_checkpointless.comm.world import free_port

    world, agents = spec["world"], spec["agents"]
    out = Path(spec["out"])
    identity = JobIdentity.generate("test-tier1")
    eps = [("127.0.0.1", free_port()) for _ in range(agents)]
    servers = {i: host_shard(ep, identity) for i, ep in enumerate(eps)}
    env = {"NCL_STORE_ENDPOINTS": ",".join(f"{h}:{p}" for h, p in eps), "WORLD_SIZE": str(world),
           "LOCAL_WORLD_SIZE": str(world // agents), "NCL_STORE_TIMEOUT_S": "60",
           "NCL_PG_TIMEOUT_S": "60", "OMP_NUM_THREADS": "1", **identity.env()}
    per_node = world // agents

    def fork(rank: int, phase: str) -> int:
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                os.environ.update(env, RANK=str(rank), LOCAL_RANK=str(rank % per_node),
                                  GROUP_RANK=str(rank // per_node))
                _rank_main(spec, rank, phase, out)
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        return pid

    def reap(pids: dict, timeout: float) -> dict:
        codes, deadline = {}, time.time() + timeout
        while len(codes) < len(pids) and time.time() < deadline:
            for r, pid in pids.items():
                if r not in codes and os.waitpid(pid, os.WNOHANG)[0]:
                    codes[r] = 0 if (out / f"done-{r}").exists() else 1
            time.sleep(0.05)
        for r, pid in pids.items():
            if r not in codes:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                codes[r] = "killed"
        return codes

    summary: dict = {"endpoints": env["NCL_STORE_ENDPOINTS"]}
    pids = {r: fork(r, "first") for r in range(world)}
    if spec["scenario"] == "node0_loss":
        node0 = [r for r in range(world) if r // per_node == 0]
        deadline = time.time() + 90
        while len(list(out.glob("gen0-*.json"))) < world and time.time() < deadline:
            time.sleep(0.05)
        for r in node0:  # node 0 dies: its ranks and its agent (a store server)
            os.kill(pids.pop(r), signal.SIGKILL)
        os.kill(servers[0], signal.SIGKILL)
        os.waitpid(servers[0], 0)
        client = connect(eps, identity, datetime.timedelta(seconds=30))
        gen = client.add("gen", 1)  # an agent bumps; gen survives on the other servers
        servers[0] = host_shard(eps[0], identity)  # the node is replaced
        client.set(f"gen/{gen}", json.dumps({"reason": "node 0 lost", "gen": gen}))
        summary["bumped_to"] = gen
        for r in node0:
            pids[r] = fork(r, "replacement")
    summary["codes"] = reap(pids, 120)
    check = connect(eps, identity)
    summary["server_ops"] = {ep: c.get("total", 0) for ep, c in check.server_op_counts().items()}
    summary["gen_per_server"] = [
        int(connect([ep], identity, datetime.timedelta(seconds=5)).get("gen") or 0)
        for ep in eps] if spec["scenario"] == "node0_loss" else []
    for pid in servers.values():
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    summary["results"] = [json.loads(p.read_text()) for p in sorted(out.glob("gen*.json"))]
    return summary


def _rank_main(spec: dict, rank: int, phase: str, out: Path) -> None:
    import torch.distributed as dist

    from nemo_checkpointless.comm import init
    from nemo_checkpointless.comm.store_client import ShardedStore

    reads: list[str] = []
    for name in ("get", "wait", "check"):  # record every key this rank reads
        original = getattr(ShardedStore, name)

        def spy(self, keys, *args, _original=original, _name=name):
            reads.extend([keys] if _name == "get" else list(keys))
            return _original(self, keys, *args)

        setattr(ShardedStore, name, spy)
    world = init("gloo")
    _check_groups(spec, out, world.generation, reads)
    if spec["scenario"] == "node0_loss" and phase == "first":
        if rank < spec["world"] // spec["agents"]:
            time.sleep(600)  # node 0: killed here
        world.store.wait(["gen/1"])  # what the agent tells its ranks
        reads.clear()
        world.reform(int(world.store.get("gen")))
        _check_groups(spec, out, world.generation, reads)
    dist.barrier()
    (out / f"done-{rank}").write_text("ok")


def _check_groups(spec: dict, out: Path, gen: int, reads: list[str]) -> None:
    """initialize_model_parallel, then membership and an all-reduce on every group."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    tp, pp, k = spec["tp"], spec["pp"], spec.get("instances", 1)
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 num_distributed_optimizer_instances=k)
    r, n = dist.get_rank(), dist.get_world_size()
    stage_size = n // pp
    stage, within = r // stage_size, r % stage_size
    t_rank, d_rank = within % tp, within // tp
    dp = stage_size // tp
    expect = {
        "tp": [stage * stage_size + d_rank * tp + t for t in range(tp)],
        "pp": [s * stage_size + within for s in range(pp)],
        "dp": [stage * stage_size + d * tp + t_rank for d in range(dp)],
        "mp": sorted(s * stage_size + d_rank * tp + t for s in range(pp) for t in range(tp)),
        "world": list(range(n)),
    }
    expect["dp_gloo"] = expect["dp"]
    groups = {"tp": ps.get_tensor_model_parallel_group(),
              "pp": ps.get_pipeline_model_parallel_group(),
              "dp": ps.get_data_parallel_group(), "dp_gloo": ps.get_data_parallel_group_gloo(),
              "mp": ps.get_model_parallel_group(), "world": dist.group.WORLD}
    if k > 1:
        groups["intra_dp"] = ps.get_data_parallel_group(with_context_parallel=True,
                                                        partial_data_parallel=True)
        size = dp // k
        first = stage * stage_size + t_rank + (d_rank // size) * size * tp
        expect["intra_dp"] = [first + i * tp for i in range(size)]
    got, sums = {}, {}
    for name, group in groups.items():
        got[name] = dist.get_process_group_ranks(group)
        x = torch.tensor([float(r)])
        dist.all_reduce(x, group=group)
        sums[name] = x.item() == float(sum(got[name]))
    (out / f"gen{gen}-{r}.json").write_text(json.dumps({
        "rank": r, "gen": gen, "ok": got == expect and all(sums.values()), "got": got,
        "expect": expect, "sums": sums, "stale_reads": [k for k in reads
                                                        if k.startswith(f"pg/{gen - 1}/")]}))


def run_scenario(tmp_path: Path, **spec) -> dict:
    spec["out"] = str(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-W", "ignore", str(HERE), json.dumps(spec)],
                          capture_output=True, text=True, timeout=170, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(180)
@pytest.mark.parametrize("world,agents,instances", [(4, 2, 1), (8, 4, 1), (16, 4, 2)])
def test_tier1_start_up_forms_correct_megatron_groups(tmp_path, world, agents, instances):
    s = run_scenario(tmp_path, scenario="groups", world=world, agents=agents, tp=2, pp=2,
                     instances=instances)
    assert all(c == 0 for c in s["codes"].values()), s
    assert len(s["results"]) == world and all(r["ok"] for r in s["results"]), s["results"]
    ops = list(s["server_ops"].values())
    assert len(ops) == agents and min(ops) > 0  # every agent served a share
    assert max(ops) / sum(ops) < 0.5 + 1.0 / agents


@pytest.mark.timeout(180)
def test_losing_node_0_and_its_agent_the_job_reforms(tmp_path):
    s = run_scenario(tmp_path, scenario="node0_loss", world=8, agents=4, tp=2, pp=2)
    assert s["bumped_to"] == 1
    assert all(c == 0 for c in s["codes"].values()), s
    gen1 = [r for r in s["results"] if r["gen"] == 1]
    assert sorted(r["rank"] for r in gen1) == list(range(8)), s["results"]
    assert all(r["ok"] for r in s["results"]), s["results"]
    assert all(not r["stale_reads"] for r in gen1)  # nothing of generation 0 was read
    assert s["gen_per_server"] == [1, 1, 1, 1]  # including the replaced agent's server


@pytest.mark.matrix
@pytest.mark.timeout(600)
def test_node_0_and_its_agent_killed_mid_run_recovers_exactly(tmp_path):
    """Through ncl-launch and tier4 recovery: node 0 (its agent, which serves a store shard,
    and its ranks) dies at step 3 and is replaced; the run equals the fault-free run."""
    from conftest import Agents, ncl_launch

    base = ["checkpointless=tier4", "trainer.max_steps=8",
            "strategy.num_distributed_optimizer_instances=2"]
    reference = ncl_launch(4, base, tmp_path / "ref" / "run", spares=0).check()
    agents = Agents(2, 2, base, tmp_path / "run")
    agents.start(0)
    agents.start(1)
    agents.wait_for_step(3)
    agents.kill_node(0)
    agents.start(0)
    result = agents.wait(timeout=400).check()
    assert [r["loss_hex"] for r in result.metrics] == [r["loss_hex"] for r in reference.metrics]
    assert result.summary["state_sha256"] == reference.summary["state_sha256"]


def _torchrun(tmp: Path, name: str, overrides: list[str], env_extra: dict) -> list[str]:
    from nemo_checkpointless.comm.world import free_port

    run_dir = tmp / name
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **env_extra)
    env.setdefault("NCL_DATA_CACHE", str(Path.home() / ".cache" / "nemo_checkpointless" /
                                         "test-data"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           str(REPO / "recipes" / "pretrain.py"), *overrides, f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    return [r["loss_hex"] for r in rows], proc.stdout + proc.stderr


@pytest.mark.timeout(300)
def test_pretrain_under_torchrun_with_tier1_matches_stock(tmp_path):
    from nemo_checkpointless.comm.world import free_port

    overrides = ["strategy.tensor_model_parallel_size=2", "strategy.pipeline_model_parallel_size=2",
                 "trainer.max_steps=3"]
    stock, _ = _torchrun(tmp_path, "stock", overrides, {})
    shards = ",".join(f"127.0.0.1:{free_port()}" for _ in range(2))
    ours, log = _torchrun(tmp_path, "tier1", ["checkpointless=tier1", *overrides],
                          {"NCL_STORE_ENDPOINTS": shards, "NCL_STORE_SELF_HOST": "1",
                           "NCL_JOB_ID": "entry-test", "NCL_JOB_SECRET": "s3cret"})
    assert "tier1: 4 ranks formed generation 0" in log and "over 2 store servers" in log
    assert ours == stock and len(ours) == 3


if __name__ == "__main__":
    print(json.dumps(_zygote(json.loads(sys.argv[1]))))
