"""The scale model (nemo_checkpointless.simulate): pure arithmetic, no process group."""

from __future__ import annotations

import json

import pytest

from nemo_checkpointless.simulate import (PUBLISHED, SIZES, AssumptionError, predict,
                                          predict_all, resolve)
from nemo_checkpointless.simulate.__main__ import main
from nemo_checkpointless.simulate.model import load_recipe


@pytest.fixture(scope="module")
def cfg():
    return load_recipe("llama3_70b_2opt")


def test_floor_is_below_every_prediction(cfg):
    for p in predict_all(SIZES, resolve(), cfg):
        assert 0 < p.floor_s <= p.ours_s
        assert p.floor_s <= p.restart_s
        assert all(v >= 0 for v in {**p.ours, **p.restart}.values())


def test_slower_links_and_storage_never_help(cfg):
    base = resolve()
    for n in SIZES:
        fast = predict(cfg, n, base)
        slow = predict(cfg, n, {**base, "link_gbps": 100.0, "storage_node_gbps": 4.0})
        assert slow.ours_s >= fast.ours_s and slow.restart_s >= fast.restart_s
        assert slow.floor_s > fast.floor_s


def test_bigger_jobs_rebuild_longer_and_hold_smaller_shards(cfg):
    a = resolve()
    small, mid, big = (predict(cfg, n, a) for n in (256, 1024, 2304))
    assert small.ours["group_rebuild"] < mid.ours["group_rebuild"] < big.ours["group_rebuild"]
    assert small.ours["rendezvous"] < big.ours["rendezvous"]
    assert small.job.optimizer_bytes_per_rank > big.job.optimizer_bytes_per_rank
    assert small.restart["process_start"] < big.restart["process_start"]


def test_hang_costs_the_hang_timeout(cfg):
    a = resolve()
    exit_, hang = predict(cfg, 256, a), predict(cfg, 256, {**a, "failure": "hang"})
    assert hang.ours_s - exit_.ours_s == pytest.approx(a["hang_timeout_s"])


def test_single_replica_layout_says_it_has_no_peer_copy(cfg):
    p = predict(cfg, 16, resolve())
    assert p.job.layout.dp == 1 and p.job.layout.instances == 1 and not p.job.protected
    assert "checkpoint_load" in p.ours and "state_transfer" not in p.ours
    assert "no optimizer shard has a peer replica" in p.job.layout_note
    assert predict(cfg, 256, resolve()).job.protected


def test_cli_prints_published_figures_and_json(capsys):
    assert main([]) == 0
    text = capsys.readouterr().out
    for _, _, ours, restart in PUBLISHED.values():
        assert ours in text and restart in text
    assert "floor" in text and "dominant" in text
    assert main(["--json", "--sizes", "256", "--assume", "link_gbps=200"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["assumptions"]["link_gbps"] == 200.0
    (row,) = doc["predictions"]
    assert row["gpus"] == 256 and row["floor_s"] <= row["ours_s"]
    assert row["published_restart"] == "4m52s"


def test_bad_assumption_names_the_valid_ones(capsys):
    assert main(["--assume", "link_gbz=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown assumption 'link_gbz'" in err and "link_gbps" in err
    assert "storage_node_gbps" in err  # the full list, not only the close match
    with pytest.raises(AssumptionError, match="choose one of exit, hang"):
        resolve(["failure=crash"])
    with pytest.raises(AssumptionError, match="expected a number"):
        resolve(["link_gbps=fast"])


def test_list_names_every_source(capsys):
    assert main(["--list"]) == 0
    text = capsys.readouterr().out
    assert "measured here" in text and "assumed" in text
