"""Tier-2 data cache across real processes: TP ranks of one coordinate, a killed loader, a
killed reader, and a real 4-rank training run whose losses match the run without cache.

The TP ranks are emulated by this file run as a script (``worker`` mode): each process
builds its data through ``make_step_data`` (the real dataset), reads steps, records a
digest per step and waits for its peers after every step, as a TP collective would. A
worker told to die SIGKILLs itself right after reading its step, before the barrier; its
replacement is started at that step (the step is redone, as recovery does).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve()
REPO = HERE.parents[2]
GBS = 8  # tiny_gpt's global batch size


# -- worker -----------------------------------------------------------------------------------


def _worker(args: dict) -> None:
    from dataclasses import asdict

    from nemo_checkpointless.config import compose
    from nemo_checkpointless.megatron.parallel import Coordinates
    from nemo_checkpointless.train.data import local_batch_digest, make_step_data

    t0 = time.perf_counter()
    cfg = compose(["checkpointless=tier2", f"checkpointless.data_cache.path={args['cache']}",
                   f"trainer.max_steps={args['end']}"])
    tp = args["tp_rank"]
    coords = Coordinates(rank=tp, world_size=2, tp_rank=tp, tp_size=2, pp_rank=0, pp_size=1,
                         dp_rank=0, dp_size=1, cp_rank=0, cp_size=1)
    data = make_step_data(cfg, coords, job_id=args["job"])
    sync = Path(args["sync"])
    with open(args["out"], "a") as out:
        def emit(**record) -> None:
            out.write(json.dumps(record) + "\n")
            out.flush()

        emit(event="start", role=data.role, pid=os.getpid())
        for step in range(args["start"], args["end"]):
            before = data.stats.samples_read
            batches = data.micro_batches(step * GBS)
            emit(event="step", step=step, digest=local_batch_digest(batches, dp_rank=0),
                 loaded=data.stats.samples_read > before, role=data.role,
                 elapsed=time.perf_counter() - t0)
            if step == args.get("kill_at"):
                os.kill(os.getpid(), signal.SIGKILL)
            (sync / f"{tp}-{step}").touch()
            deadline = time.monotonic() + 120
            while not all((sync / f"{p}-{step}").exists() for p in args["peers"]):
                if time.monotonic() > deadline:
                    raise SystemExit(f"tp_rank {tp}: peers never reached step {step}")
                time.sleep(0.01)
        emit(event="end", role=data.role, stats=asdict(data.stats))


# -- helpers ----------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("NCL_DATA_CACHE",
                   str(Path.home() / ".cache" / "nemo_checkpointless" / "test-data"))
    env["PYTHONUNBUFFERED"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    return env


class Job:
    """One emulated TP coordinate: a cache dir, a barrier dir, and workers' output files."""

    def __init__(self, tmp_path: Path, end: int, timeout: float = 90.0) -> None:
        self.tmp = tmp_path
        self.end = end
        self.timeout = timeout
        (tmp_path / "sync").mkdir()
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str, tp_rank: int, start: int = 0, kill_at: int | None = None,
              peers: tuple[int, ...] = (0, 1)) -> subprocess.Popen:
        args = {"tp_rank": tp_rank, "job": "testjob", "cache": str(self.tmp / "shm"),
                "sync": str(self.tmp / "sync"), "out": str(self.tmp / f"{name}.jsonl"),
                "start": start, "end": self.end, "kill_at": kill_at, "peers": list(peers)}
        env = _env()
        env["NCL_DATA_CACHE_TIMEOUT_S"] = str(self.timeout)
        log = open(self.tmp / f"{name}.log", "w")
        proc = subprocess.Popen([sys.executable, str(HERE), "worker", json.dumps(args)],
                                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def records(self, name: str) -> list[dict]:
        path = self.tmp / f"{name}.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]

    def steps(self, name: str) -> dict[int, dict]:
        return {r["step"]: r for r in self.records(name) if r["event"] == "step"}

    def end_record(self, name: str) -> dict:
        ends = [r for r in self.records(name) if r["event"] == "end"]
        assert ends, (self.tmp / f"{name}.log").read_text()[-3000:]
        return ends[0]

    def wait(self, proc: subprocess.Popen, name: str, timeout: float = 150) -> int:
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError((self.tmp / f"{name}.log").read_text()[-3000:]) from None

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture
def job(tmp_path):
    jobs: list[Job] = []

    def make(end: int, timeout: float = 90.0) -> Job:
        jobs.append(Job(tmp_path, end, timeout))
        return jobs[-1]

    yield make
    for j in jobs:
        j.close()


@pytest.fixture(scope="module")
def reference() -> dict[int, int]:
    """Digest of every step without the cache (the fault-free, direct-loading run)."""
    from nemo_checkpointless.config import compose
    from nemo_checkpointless.megatron.parallel import Coordinates
    from nemo_checkpointless.train.data import StepData, local_batch_digest, make_step_data

    coords = Coordinates(rank=0, world_size=2, tp_rank=0, tp_size=2, pp_rank=0, pp_size=1,
                         dp_rank=0, dp_size=1, cp_rank=0, cp_size=1)
    cfg = compose([f"data.cache_dir={_env()['NCL_DATA_CACHE']}"])  # the workers' dataset
    data = make_step_data(cfg, coords)
    assert isinstance(data, StepData)
    return {s: local_batch_digest(data.micro_batches(s * GBS), dp_rank=0) for s in range(12)}


def _digests(steps: dict[int, dict]) -> dict[int, int]:
    return {s: r["digest"] for s, r in steps.items()}


# -- tests ------------------------------------------------------------------------------------


@pytest.mark.dist
@pytest.mark.timeout(120)
def test_tp2_ranks_see_identical_batches_and_one_reads(job, reference):
    j = job(end=8)
    loader, reader = j.start("tp0", 0), j.start("tp1", 1)
    assert j.wait(loader, "tp0") == 0 and j.wait(reader, "tp1") == 0
    a, b = j.steps("tp0"), j.steps("tp1")
    assert _digests(a) == _digests(b) == {s: reference[s] for s in range(8)}
    end0, end1 = j.end_record("tp0"), j.end_record("tp1")
    assert (end0["role"], end1["role"]) == ("loader", "reader")
    assert end1["stats"]["samples_read"] == 0 and end1["stats"]["steps_from_cache"] == 8
    assert end0["stats"]["samples_read"] == 8 * GBS  # each step read once, nothing past the end


@pytest.mark.dist
@pytest.mark.timeout(150)
def test_killed_loader_is_replaced_and_reader_continues(job, reference):
    j = job(end=10)
    dying = j.start("tp0", 0, kill_at=4)
    reader = j.start("tp1", 1)
    assert j.wait(dying, "tp0") == -signal.SIGKILL
    replacement = j.start("tp0-new", 0, start=4)
    assert j.wait(replacement, "tp0-new") == 0 and j.wait(reader, "tp1") == 0
    before, after, peer = j.steps("tp0"), j.steps("tp0-new"), j.steps("tp1")
    assert max(before) == 4 and min(after) == 4
    assert _digests(peer) == {s: reference[s] for s in range(10)}
    assert {**_digests(before), **_digests(after)} == _digests(peer)
    # the replacement took the loader role back and reattached: step 4 came from the cache
    end_new, end_peer = j.end_record("tp0-new"), j.end_record("tp1")
    assert end_new["role"] == "loader" and end_peer["role"] == "reader"
    assert after[4]["loaded"] is False
    assert end_new["stats"]["samples_read"] <= (10 - 5) * GBS  # never an earlier step
    assert end_peer["stats"]["samples_read"] == 0 and end_peer["stats"]["takeovers"] == 0


@pytest.mark.dist
@pytest.mark.timeout(150)
def test_killed_reader_resumes_from_the_cache(job, reference):
    j = job(end=9)
    loader = j.start("tp0", 0)
    dying = j.start("tp1", 1, kill_at=5)
    assert j.wait(dying, "tp1") == -signal.SIGKILL
    t0 = time.perf_counter()
    replacement = j.start("tp1-new", 1, start=5)
    assert j.wait(replacement, "tp1-new") == 0 and j.wait(loader, "tp0") == 0
    peer, before, after = j.steps("tp0"), j.steps("tp1"), j.steps("tp1-new")
    assert _digests(peer) == {s: reference[s] for s in range(9)}
    assert {**_digests(before), **_digests(after)} == _digests(peer)
    end_new = j.end_record("tp1-new")
    assert end_new["role"] == "reader" and end_new["stats"]["samples_read"] == 0
    assert end_new["stats"]["steps_from_cache"] == 4
    assert time.perf_counter() - t0 < 60


LOSS_RUN = ["strategy.tensor_model_parallel_size=2", "trainer.max_steps=6"]


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_training_with_cache_matches_training_without(tmp_path):
    from conftest import torchrun

    cache = tmp_path / "shm"
    plain = torchrun(4, LOSS_RUN, tmp_path / "plain").check()
    cached = torchrun(4, [*LOSS_RUN, "checkpointless=tier2",
                          f"checkpointless.data_cache.path={cache}"], tmp_path / "cached").check()
    assert [r["loss_hex"] for r in cached.metrics] == [r["loss_hex"] for r in plain.metrics]
    assert len(cached.metrics) == 6
    stats = {int(m.group(1)): (m.group(2), int(m.group(3))) for m in re.finditer(
        r"\[rank (\d)\] \S+ INFO: data cache dp\d-cp0-pp0: role (\w+), samples_read=(\d+)",
        cached.output)}
    # ranks 0 and 2 are tp_rank 0 of DP coordinates 0 and 1; ranks 1 and 3 only memory-map
    assert stats == {0: ("loader", 24), 1: ("reader", 0), 2: ("loader", 24), 3: ("reader", 0)}
    (job_dir,) = cache.iterdir()
    assert sorted(p.name for p in job_dir.iterdir()) == ["dp0-cp0-pp0", "dp1-cp0-pp0"]


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    sys.path.insert(0, str(REPO))
    _worker(json.loads(sys.argv[2]))
