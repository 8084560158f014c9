"""Durable checkpoints on 4 gloo ranks: a new job resumes bit for bit, damaged checkpoints
are skipped, stock megatron-core loads them, and a resume at another DP size continues."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import _env, free_port

pytestmark = [pytest.mark.dist, pytest.mark.timeout(600)]

HERE = Path(__file__).parent
WORKER = HERE / "durable_worker.py"
STOCK = HERE / "durable_stock_loader.py"
TP2 = ["strategy.tensor_model_parallel_size=2"]


def _torchrun(nproc: int, script: Path, args: list[str], env: dict | None = None,
              timeout: float = 300) -> tuple[str, list[dict]]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(script), *args]
    full = _env()
    full.update(env or {})
    proc = subprocess.run(cmd, env=full, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    tagged = [json.loads(line.split(" ", 1)[1]) for line in proc.stdout.splitlines()
              if line.startswith(("RESULT ", "STOCK_LOAD "))]
    return out, tagged


def train(run_dir: Path, root: Path, interval: int, resume: str, steps: int, layout: list[str],
          nproc: int = 4, env: dict | None = None) -> tuple[str, dict]:
    out, tagged = _torchrun(nproc, WORKER, [str(run_dir), str(root), str(interval), resume,
                                            f"trainer.max_steps={steps}", *layout], env=env)
    assert len(tagged) == 1, out[-4000:]
    return out, tagged[0]


@pytest.fixture(scope="module")
def tp2_run(tmp_path_factory):
    """Uninterrupted TP2 x DP2 run of 8 steps, checkpoints after steps 2, 4, 6 and 8; rank
    3 writes nothing of step 2's and every rank settles after it (as after a recovery)."""
    base = tmp_path_factory.mktemp("durable-tp2")
    out, result = train(base / "run", base / "ckpt", 2, "never", 8, TP2,
                        env={"DURABLE_REFERENCE": str(base / "reference"),
                             "DURABLE_SETTLE": "2:3"})
    return base, result


def _copy_root(base: Path, dest: Path) -> Path:
    shutil.copytree(base / "ckpt", dest)
    return dest


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def test_saves_are_complete_and_asynchronous(tp2_run):
    base, result = tp2_run
    # step 2's save lacks rank 3's files: settle left it incomplete, and once step 4's
    # completed it was removed with the debris
    assert result["settled"] == [False]
    names = sorted(p.name for p in (base / "ckpt").iterdir())
    assert names == ["iter_0000004", "iter_0000006", "iter_0000008",
                     "latest_checkpointed_iteration.txt"]
    assert (base / "ckpt" / "latest_checkpointed_iteration.txt").read_text() == "8\n"
    saves = result["saves"]
    assert [s["step"] for s in saves] == [2, 4, 6, 8]
    # megatron's planning is collective for the first two saves of a strategy, cached
    # afterwards; settling after step 2 started a new strategy on every rank
    assert [s["planned_with_communication"] for s in saves] == [True, True, True, False]
    last = saves[-1]
    assert last["complete"] and last["error"] is None
    print(f"\nsave of step 8: training thread blocked {last['snapshot_s'] * 1e3:.1f} ms "
          f"(host copy {last['copy_s'] * 1e3:.1f} ms of {last['snapshot_bytes'] / 1e6:.1f} MB); "
          f"background write {last['write_s'] * 1e3:.0f} ms, finalize "
          f"{last['finalize_s'] * 1e3:.0f} ms, checkpoint {last['checkpoint_bytes'] / 1e6:.1f} MB")
    for d in ("iter_0000004", "iter_0000006", "iter_0000008"):
        files = {p.name for p in (base / "ckpt" / d).iterdir()}
        assert {".metadata", "metadata.json", "common.pt", "ncl_manifest.json"} <= files
        assert not any(f.startswith("ncl_parts_") for f in files), files


def test_new_job_resumes_bit_for_bit_past_a_corrupt_checkpoint(tp2_run, tmp_path):
    """The newest checkpoint has one flipped byte: the job warns naming it, loads the one
    before, and ends equal to the uninterrupted run (every loss, the state hash)."""
    base, reference = tp2_run
    root = _copy_root(base, tmp_path / "ckpt")
    _flip_byte(root / "iter_0000008" / "__1_0.distcp", 5000)
    (tmp_path / "run").mkdir()  # the same run directory: its metrics.jsonl goes on
    shutil.copy(base / "run" / "metrics.jsonl", tmp_path / "run" / "metrics.jsonl")
    out, result = train(tmp_path / "run", root, 0, "auto", 8, TP2)
    assert "checkpoint " + str(root / "iter_0000008") + " fails verification" in out
    assert "__1_0.distcp: SHA-256" in out
    assert "skipping checkpoint " + str(root / "iter_0000008") in out
    assert result["resumed"]["checkpoint"] == "iter_0000006"
    assert not result["resumed"]["resharded"]
    print(f"\nload of iter_0000006 into a fresh TP2 x DP2 job: "
          f"{result['resumed']['seconds'] * 1e3:.0f} ms")
    assert sorted(result["losses"], key=int) == ["7", "8"]
    for step in ("7", "8"):
        assert result["losses"][step] == reference["losses"][step], step
    assert result["state_sha256"] == reference["state_sha256"]
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))  # one row per committed step
    assert [r["loss_hex"] for r in rows] == [reference["losses"][str(s)] for s in range(1, 9)]


def test_truncated_manifest_and_bad_file_fall_back(tp2_run, tmp_path, caplog):
    from nemo_checkpointless.checkpoint import latest_verified
    from nemo_checkpointless.checkpoint.manifest import MANIFEST

    base, _ = tp2_run
    root = _copy_root(base, tmp_path / "ckpt")
    manifest = root / "iter_0000008" / MANIFEST
    manifest.write_bytes(manifest.read_bytes()[:200])
    with caplog.at_level(logging.WARNING):
        assert latest_verified(root).step == 6
    assert f"{manifest} does not parse" in caplog.text
    assert f"skipping checkpoint {root / 'iter_0000008'}" in caplog.text
    caplog.clear()
    _flip_byte(root / "iter_0000006" / "common.pt", 100)
    with caplog.at_level(logging.WARNING):
        assert latest_verified(root).step == 4
    assert f"{root / 'iter_0000006' / 'common.pt'}: SHA-256" in caplog.text
    (root / "iter_0000004" / "__3_0.distcp").unlink()
    assert latest_verified(root) is None


def test_stock_megatron_core_loads_a_checkpoint(tp2_run):
    """A process with only torch and megatron-core (plus the CPU shim) loads iter_6 with
    dist_checkpointing.load and gets every saved tensor back exactly."""
    base, _ = tp2_run
    out, loads = _torchrun(4, STOCK, [str(base / "ckpt" / "iter_0000006"),
                                      str(base / "reference" / "iter_0000006"), "2"])
    assert sorted(r["rank"] for r in loads) == [0, 1, 2, 3], out[-4000:]
    for r in loads:
        assert r["our_modules"] == [], r
        assert r["tensors"] > 50 and r["mismatched"] == [] and r["missing"] == [], r
        assert r["iteration"] == 6 and r["optimizer_step"] == 6.0, r
        assert r["sharding"] == "dp_reshardable"


def test_resume_at_half_the_data_parallel_size(tmp_path):
    """DP4 saves at step 3; a DP2 job (2 ranks) resumes through megatron's resharding and
    its loss continues within the fault-free DP4 run's step-to-step noise."""
    steps = 8
    _, full = train(tmp_path / "dp4", tmp_path / "ckpt", 3, "never", steps, [])
    root = tmp_path / "ckpt"
    for later in ("iter_0000006",):
        shutil.rmtree(root / later)
    _, half = train(tmp_path / "dp2", root, 0, "auto", steps, [], nproc=2)
    assert half["resumed"] == {**half["resumed"], "step": 3, "resharded": True}
    print("\nstep  DP4 fault-free        DP2 resumed from DP4 step 3")
    ref = {int(k): float.fromhex(v) for k, v in full["losses"].items()}
    got = {int(k): float.fromhex(v) for k, v in half["losses"].items()}
    for s in range(1, steps + 1):
        print(f"{s:4d}  {ref[s]:.9f}  {got[s]:.9f}" if s in got else f"{s:4d}  {ref[s]:.9f}")
    noise = min(abs(ref[s] - ref[s - 1]) for s in range(2, steps + 1))
    assert sorted(got) == list(range(4, steps + 1))
    for s in got:
        assert abs(got[s] - ref[s]) <= noise, (s, got[s], ref[s], noise)
