"""Layout planner: verdicts equal what the end-to-end kill tests measured, counts equal the
published ones, node-loss analysis equals brute force, errors name the fix."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time

import pytest

from nemo_checkpointless.config import compose
from nemo_checkpointless.plan import PlanError, plan_layout, preflight_report, total_parameters
from nemo_checkpointless.plan.__main__ import main as plan_main
from nemo_checkpointless.replication.replica_map import RankInfo, donors_for, unprotected_ranks

# the layouts of tests/e2e/test_recovery.py (tiny_gpt on 4 ranks)
K2 = "strategy.num_distributed_optimizer_instances=2"
E2E = {"dp4": [K2],
       "tp2": ["strategy.tensor_model_parallel_size=2", K2],
       "pp2": ["strategy.pipeline_model_parallel_size=2", K2]}


def plan(overrides: list[str], world: int = 4, per_node: int = 4):
    return plan_layout(compose(overrides), world, per_node)


@pytest.mark.parametrize("layout", ["dp4", "tp2", "pp2"])
def test_single_rank_losses_survive_like_the_e2e_tests(layout):
    # test_every_phase_and_kind_recovers_exactly[dp4|tp2|pp2], test_rank0_killed
    p = plan(E2E[layout])
    assert p.protected
    assert all(p.survives([r]) for r in range(4))


def test_two_ranks_of_different_replica_sets_survive():
    # test_two_ranks_of_different_replica_sets_in_the_same_step: ranks 0, 1 (dp4) -> exact
    # test_second_failure_during_recovery: ranks 1, then 2 during its recovery (tp2) -> exact
    assert plan(E2E["dp4"]).survives([0, 1])
    assert plan(E2E["tp2"]).survives([1, 2])


def test_every_replica_lost_is_refused():
    # test_every_replica_lost_fails_clearly_and_corrupts_nothing: ranks 0 and 2 (dp4)
    # -> "no healthy rank holds a replica"
    p = plan(E2E["dp4"])
    assert p.replicas.holders[p.replicas.key_of[0]] == (0, 2)
    assert not p.survives([0, 2])
    assert p.replicas.lost_shards([0, 2]) == [(0, 0, 0)]


def test_whole_node_loss_survives_on_two_nodes_of_two():
    # test_whole_node_lost_and_replaced: 2 agents x 2 ranks, dp4 with 2 instances, node 1
    # (ranks 2, 3) killed -> exact
    p = plan(E2E["dp4"], world=4, per_node=2)
    assert p.losses.fatal_nodes == () and p.survives([2, 3])
    assert p.losses.fatal_pair_count == 1  # both nodes at once: every copy is gone


def test_one_instance_names_unprotected_ranks_like_the_preflight():
    # test_preflight_names_unprotected_ranks: "ranks [0, 1, 2, 3] hold optimizer shards
    # with no replica" and the setting that fixes it
    cfg = compose(["checkpointless=tier4"])
    text = preflight_report(cfg, 4, 4)
    assert "ranks [0, 1, 2, 3] hold optimizer shards with no replica" in text
    assert "strategy.num_distributed_optimizer_instances=2" in text
    assert plan_layout(cfg, 4, 4).to_dict()["unprotected_ranks"] == [0, 1, 2, 3]


@pytest.mark.parametrize("layout", ["dp4", "tp2", "pp2", "plain"])
def test_planner_agrees_with_the_recovery_donor_logic(layout):
    """RankInfo keys built from the plan give the donors and lonely ranks the plan says."""
    overrides = (["strategy.use_distributed_optimizer=false"] if layout == "plain"
                 else E2E[layout])
    p = plan(overrides)
    infos = [RankInfo(r, True, 0, 0, 0, *p.replicas.key_of[r]) for r in range(4)]
    assert unprotected_ranks(infos) == list(p.losses.unprotected_ranks)
    for r in range(4):
        assert donors_for(infos, r) == [h for h in p.replicas.holders[infos[r].key] if h != r]


@pytest.mark.parametrize("recipe", ["llama3_8b", "llama3_70b", "llama3_405b"])
def test_analytic_parameter_count_matches_published(recipe):
    cfg = compose([f"recipe={recipe}"])
    assert total_parameters(cfg.model, cfg.data.seq_length) == cfg.model.published_num_params


@pytest.mark.parametrize("overrides,world,per_node", [
    (["recipe=llama3_70b_2opt"], 128, 8),
    (["recipe=llama3_8b_2opt"], 16, 8),
    (["recipe=tiny_gpt", "strategy.num_distributed_optimizer_instances=3"], 12, 2),
    (["recipe=tiny_gpt", "strategy.tensor_model_parallel_size=2", K2], 16, 4),
    (["recipe=tiny_gpt", "strategy.use_distributed_optimizer=false"], 8, 2),
    (["recipe=tiny_gpt"], 8, 2),
])
def test_node_loss_summary_equals_brute_force(overrides, world, per_node):
    p = plan(overrides, world, per_node)
    nodes = [list(range(n * per_node, (n + 1) * per_node)) for n in range(world // per_node)]
    fatal = [n for n, ranks in enumerate(nodes) if not p.survives(ranks)]
    assert list(p.losses.fatal_nodes) == fatal
    fatal_pairs = [(a, b) for a, b in itertools.combinations(range(len(nodes)), 2)
                   if not p.survives(nodes[a] + nodes[b])]
    assert p.losses.fatal_pair_count == len(fatal_pairs)
    assert set(p.losses.fatal_pairs) == {(a, b) for a, b in fatal_pairs
                                         if a not in fatal and b not in fatal}


def test_llama3_70b_on_16_nodes():
    one = plan(["recipe=llama3_70b"], 128, 8)
    two = plan(["recipe=llama3_70b_2opt"], 128, 8)
    assert len(one.losses.unprotected_ranks) == 128 and len(one.losses.fatal_nodes) == 16
    assert two.protected and two.losses.fatal_nodes == ()
    # replicas 16 ranks (2 nodes) apart: nodes n, n+2 of each 4-node pipeline stage
    assert all(h[1] - h[0] == 16 for h in two.replicas.holders.values())
    assert two.losses.fatal_pairs == ((0, 2), (1, 3), (4, 6), (5, 7), (8, 10), (9, 11),
                                      (12, 14), (13, 15))
    # k=2 doubles each rank's optimizer shard: the extra equals the one-instance state
    mem = two.memory
    assert mem.ways == 4 and mem.baseline_ways == 8
    assert all(mem.extra_bytes(s) == mem.baseline_bytes(s) for s in range(4))
    assert one.memory_if_two.max_extra_bytes == mem.max_extra_bytes
    text = preflight_report(compose(["recipe=llama3_70b_2opt"]), 128, 8)
    assert "{r, r+16} on nodes {n, n+2}" in text and "112/120 pairs" in text


def test_ten_thousand_ranks_are_fast_and_summarised():
    cfg = compose(["recipe=llama3_405b_2opt"])
    start = time.perf_counter()
    text = preflight_report(cfg, 9216, 8)
    assert time.perf_counter() - start < 10
    assert len(text.splitlines()) < 50
    assert "1152/1152 nodes" in text
    assert len(preflight_report(cfg, 9216, 8, verbose=True).splitlines()) > 4608


@pytest.mark.parametrize("overrides,world,per_node,fix", [
    (["strategy.tensor_model_parallel_size=3"], 8, 4, "does not divide the world size 8"),
    (["strategy.num_distributed_optimizer_instances=3"], 8, 4, "use one of [1, 2, 4, 8]"),
    ([], 6, 4, "not a whole number of nodes of 4 ranks"),
    (["strategy.tensor_model_parallel_size=8"], 8, 8, "must divide model.num_attention_heads"),
    (["strategy.use_distributed_optimizer=false", K2], 4, 4, "needs strategy.use_distributed"),
])
def test_layout_errors_say_what_to_do(overrides, world, per_node, fix):
    with pytest.raises(PlanError) as err:
        plan(overrides, world, per_node)
    assert fix in str(err.value)


def test_cli_errors_and_json(capsys):
    assert plan_main(["recipe=llama3_70b", "trainer.num_nodes=3", "trainer.devices=8"]) == 2
    assert "launch a multiple of 32 ranks (trainer.num_nodes a multiple of 4)" in \
        capsys.readouterr().err
    assert plan_main(["--json", "recipe=llama3_8b_2opt", "trainer.num_nodes=2",
                      "trainer.devices=8"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["single_node_survivable"] == 2 and out["two_node_survivable"] == 0


@pytest.mark.timeout(60)
def test_documented_command():
    out = subprocess.run([sys.executable, "-m", "nemo_checkpointless.plan", "recipe=llama3_70b",
                          "trainer.num_nodes=16", "trainer.devices=8"],
                         capture_output=True, text=True, timeout=55)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ranks 0-127 (128 ranks) hold optimizer shards with no replica" in out.stdout
    assert "set strategy.num_distributed_optimizer_instances=2" in out.stdout
