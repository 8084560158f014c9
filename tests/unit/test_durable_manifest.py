"""Durable checkpoints without a process group: manifest, verification, choice, pruning,
schedule and config."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

from nemo_checkpointless.checkpoint import CheckpointConfig, DurableCheckpointer, latest_verified
from nemo_checkpointless.checkpoint import config as ckcfg
from nemo_checkpointless.checkpoint import manifest as mf
from nemo_checkpointless.config import validate_checkpoint
from nemo_checkpointless.checkpoint.snapshot import check_plain, layout_difference
from nemo_checkpointless.checkpoint.writer import HashingFile

LAYOUT = {"world_size": 4, "tp": 2, "pp": 1, "vp": None, "cp": 1, "dp": 2, "ep": 1,
          "use_distributed_optimizer": True, "num_distributed_optimizer_instances": 1}


def fake_checkpoint(root: Path, step: int, complete: bool = True) -> Path:
    """A checkpoint directory with a few files and (if complete) its manifest."""
    d = mf.checkpoint_dir(root, step)
    d.mkdir(parents=True)
    records = []
    for name, size in (("__0_0.distcp", 10_000 + step), ("common.pt", 300), (".metadata", 90)):
        data = os.urandom(size)
        (d / name).write_bytes(data)
        records.append(mf.FileRecord(name, *mf.sha256_file(d / name)))
    if complete:
        mf.write(d, mf.build(step, 8 * step, LAYOUT, records, {"torch": torch.__version__}))
    return d


def test_manifest_roundtrip_is_self_checked_and_atomic(tmp_path):
    d = fake_checkpoint(tmp_path, 12)
    info = mf.info(d)
    assert (info.step, info.consumed_samples, info.layout) == (12, 96, LAYOUT)
    assert mf.verify_files(d, info.manifest) == []
    assert sorted(p.name for p in d.iterdir()) == [".metadata", "__0_0.distcp", "common.pt",
                                                   mf.MANIFEST]  # no temporary left
    body = json.loads((d / mf.MANIFEST).read_text())
    body["consumed_samples"] = 97  # still valid JSON, no longer what was written
    (d / mf.MANIFEST).write_text(json.dumps(body))
    with pytest.raises(mf.ManifestError, match="fails its own checksum"):
        mf.read(d)


@pytest.mark.parametrize("damage", ["truncate", "missing", "foreign"])
def test_damaged_manifest_is_refused_with_the_reason(tmp_path, damage):
    d = fake_checkpoint(tmp_path, 3)
    path = d / mf.MANIFEST
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:57])
        match = "does not parse"
    elif damage == "missing":
        path.unlink()
        match = "missing"
    else:
        path.write_text(json.dumps({"format": "something-else"}))
        match = "not a nemo-checkpointless/durable/1 manifest"
    with pytest.raises(mf.ManifestError, match=match):
        mf.read(d)


def test_verify_files_names_each_problem(tmp_path):
    d = fake_checkpoint(tmp_path, 5)
    manifest = mf.read(d)
    data = bytearray((d / "__0_0.distcp").read_bytes())
    data[7] ^= 1
    (d / "__0_0.distcp").write_bytes(bytes(data))
    (d / "common.pt").write_bytes(b"short")
    (d / ".metadata").unlink()
    problems = mf.verify_files(d, manifest)
    assert len(problems) == 3
    assert f"{d / '.metadata'}: missing" in problems
    assert any(p.startswith(f"{d / '__0_0.distcp'}: SHA-256") for p in problems)
    assert f"{d / 'common.pt'}: 5 bytes, manifest says 300" in problems
    assert mf.verify_files(d, manifest, names=["__0_0.distcp"]) == problems[1:2]


def test_latest_verified_skips_bad_ones_and_warns_by_name(tmp_path, caplog):
    for step in (2, 4, 6):
        fake_checkpoint(tmp_path, step)
    fake_checkpoint(tmp_path, 8, complete=False)  # a save that never finished
    assert latest_verified(tmp_path).step == 6
    (tmp_path / "iter_0000006" / "__0_0.distcp").write_bytes(b"x")
    manifest = tmp_path / "iter_0000004" / mf.MANIFEST
    manifest.write_bytes(manifest.read_bytes()[:-40])
    with caplog.at_level(logging.WARNING):
        found = latest_verified(tmp_path)
    assert found.step == 2 and found.path == tmp_path / "iter_0000002"
    assert f"skipping checkpoint {tmp_path / 'iter_0000006'}" in caplog.text
    assert f"skipping checkpoint {tmp_path / 'iter_0000004'}" in caplog.text
    assert "iter_0000008" not in caplog.text  # no manifest: not a candidate at all
    # without data verification only the manifest counts
    assert latest_verified(tmp_path, verify_data=False).step == 6
    assert latest_verified(tmp_path / "nowhere") is None


def test_prune_keeps_the_newest_complete_and_clears_debris(tmp_path):
    for step in (1, 2, 3, 4):
        fake_checkpoint(tmp_path, step)
    fake_checkpoint(tmp_path, 0, complete=False)
    fake_checkpoint(tmp_path, 5, complete=False)  # newer than the newest complete: in flight
    removed = mf.prune(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == ["iter_0000000", "iter_0000001", "iter_0000002"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000003", "iter_0000004",
                                                         "iter_0000005"]


def test_hashing_file_hashes_what_it_writes(tmp_path):
    path = tmp_path / "f.bin"
    with HashingFile(str(path)) as f:
        torch.save({"w": torch.arange(1000)}, f)
    record = f.record("f.bin")
    assert (record.bytes, record.sha256) == mf.sha256_file(path)
    assert torch.equal(torch.load(path)["w"], torch.arange(1000))


def test_time_schedule_and_step_schedule():
    now = [0.0]
    ck = DurableCheckpointer("/nonexistent", interval_steps=10, interval_minutes=2.0,
                             clock=lambda: now[0])
    assert [s for s in range(1, 31) if ck.due(s)] == [10, 20, 30]
    now[0] = 119.0
    assert not ck.due(3)
    now[0] = 120.0
    assert ck.due(3)
    ck._last_step = 7  # a save happened at step 7: nothing at or before it again
    assert not ck.due(7) and ck.due(10)
    off = DurableCheckpointer("/nonexistent", interval_steps=None)
    assert not any(off.due(s) for s in range(1, 100))
    with pytest.raises(ValueError, match="interval_steps=0"):
        DurableCheckpointer("/x", interval_steps=0)
    with pytest.raises(ValueError, match="keep=0"):
        DurableCheckpointer("/x", interval_steps=1, keep=0)


def test_config_defaults_and_errors(tmp_path):
    cfg = CheckpointConfig()
    assert ckcfg.interval_steps(cfg, under_agent=True) == ckcfg.DEFAULT_INTERVAL_STEPS
    assert ckcfg.interval_steps(cfg, under_agent=False) is None
    assert not ckcfg.enabled(cfg, under_agent=False)
    assert ckcfg.interval_steps(CheckpointConfig(interval=0), under_agent=True) is None
    assert ckcfg.enabled(CheckpointConfig(interval_minutes=30), under_agent=False)
    assert ckcfg.directory(cfg, tmp_path) == tmp_path / "checkpoints"
    assert ckcfg.directory(CheckpointConfig(dir="/data/ck"), tmp_path) == Path("/data/ck")
    assert ckcfg.make_checkpointer(cfg, tmp_path, under_agent=False) is None
    made = ckcfg.make_checkpointer(CheckpointConfig(interval=7, keep=3), tmp_path, True)
    assert (made.interval_steps, made.keep, made.root) == (7, 3, tmp_path / "checkpoints")
    for bad, match in ((dict(resume="always"), "checkpoint.resume='always'"),
                       (dict(interval=-1), "checkpoint.interval=-1"),
                       (dict(keep=0), "checkpoint.keep=0"),
                       (dict(interval_minutes=0), "checkpoint.interval_minutes=0")):
        with pytest.raises(ValueError, match=match):
            validate_checkpoint(CheckpointConfig(**bad))


def test_common_state_must_load_with_weights_only():
    check_plain({"consumed_samples": 8, "record": {"loss": 1.5, "hash": "ab"},
                 "sched": [1, 2.0, None], "t": torch.zeros(2)})
    with pytest.raises(TypeError, match=r"extra_state\['rng'\] is a ndarray"):
        import numpy as np
        check_plain({"rng": np.zeros(3)})


def test_layout_difference_allows_only_data_parallel_changes():
    same, blocking = layout_difference(LAYOUT, dict(LAYOUT))
    assert same and not blocking
    same, blocking = layout_difference(LAYOUT, {**LAYOUT, "dp": 1, "world_size": 2})
    assert not same and not blocking
    same, blocking = layout_difference(LAYOUT, {**LAYOUT, "tp": 1, "dp": 4})
    assert blocking == ["tp: checkpoint 2, this job 1"]
