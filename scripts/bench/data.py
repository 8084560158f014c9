"""Tier-2 data cache vs the stock loader: time to first batch of a replacement rank, and memory.

    .venv/bin/python scripts/bench/data.py [--step 10000] [--repeats 3] [--cache-root /dev/shm]
    .venv/bin/python scripts/bench/data.py --step 200 --repeats 1 --memory-steps 5  # quick

1. Time from process start to first batch ready, for a replacement rank at ``--step``
   (and at step 10, to show it does not depend on the step), each in a fresh process:
   * ``cache``: the replacement reattaches to the cache its dead predecessor left
     (files for steps S-2..S+2) -- as the loader (tp_rank 0) and as a reader;
   * ``skip``: the stock loader is rebuilt and skips forward batch by batch to step S.
   Also reported: ``startup_floor_s``, a process that only imports what both need
   (interpreter, torch, megatron, this package), and the data-path times without it.
2. Memory of the loaders of one node with TP=4 (one data coordinate, 4 processes):
   one loader per rank (stock) vs one loader + 3 readers of the cache. Each process
   measures its PSS (/proc/self/smaps_rollup) right after the imports and after loading
   ``--memory-steps`` steps, all four at the same moments; a loader's memory is the
   difference. The cache also counts the bytes of its files in shared memory.

Geometry: tiny_gpt's data config (seq 128, global batch 8, micro batch 2), DP=1, so a
coordinate reads the whole global batch; ``--data data.seq_length=2048 ...`` changes it
(``num_samples`` must cover ``(step + 1000) * global_batch_size``). The last line printed
is a JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
JOB = "bench"


def _cfg(cache_root: str, step: int):
    from nemo_checkpointless.config import compose

    extra = json.loads(os.environ.get("NCL_BENCH_DATA_OVERRIDES", "[]"))  # from --data
    return compose(["checkpointless=tier2", f"checkpointless.data_cache.path={cache_root}",
                    f"trainer.max_steps={step + 1000}", *extra])


def _coords(tp_rank: int, tp_size: int):
    from nemo_checkpointless.megatron.parallel import Coordinates

    return Coordinates(rank=tp_rank, world_size=tp_size, tp_rank=tp_rank, tp_size=tp_size,
                       pp_rank=0, pp_size=1, dp_rank=0, dp_size=1, cp_rank=0, cp_size=1)


def _pss() -> int:
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no Pss in /proc/self/smaps_rollup")


# -- children ---------------------------------------------------------------------------------


def _common_imports() -> None:
    """What every training rank imports anyway, whichever data path it uses."""
    import megatron.core  # noqa: F401
    import torch  # noqa: F401

    import nemo_checkpointless.data  # noqa: F401
    import nemo_checkpointless.train.data  # noqa: F401


def child_first_batch(how: str, step: int, cache_root: str) -> None:
    """Import, build the data source, get the first batch; print wall-clock stamps."""
    _common_imports()
    from nemo_checkpointless.train.data import StepData, make_step_data

    cfg = _cfg(cache_root, step)
    t_imports = time.time()
    gbs = cfg.data.global_batch_size
    samples_read = None
    if how == "import":
        t_ready = time.time()
    elif how == "skip":
        data = StepData(cfg.data, cfg.trainer.seed, _coords(0, 1))
        for s in range(step):  # the stock way: fetch and discard every earlier batch
            data.micro_batches(s * gbs)
        data.micro_batches(step * gbs)
        t_ready = time.time()
        samples_read = (step + 1) * gbs
    else:
        tp_rank = 0 if how == "cache-loader" else 1
        data = make_step_data(cfg, _coords(tp_rank, 4), job_id=JOB)
        data.micro_batches(step * gbs)
        t_ready = time.time()
        samples_read = data.stats.samples_read
        assert data.role == ("loader" if tp_rank == 0 else "reader"), data.role
    print(json.dumps({"t_imports": t_imports, "t_ready": t_ready, "samples_read": samples_read}))
    os._exit(0)  # do not wait for the prefetch thread


def _barrier(sync: Path, name: str, tp_rank: int, tp_size: int) -> None:
    (sync / f"{name}-{tp_rank}").touch()
    deadline = time.monotonic() + 300
    while not all((sync / f"{name}-{r}").exists() for r in range(tp_size)):
        if time.monotonic() > deadline:
            raise SystemExit(f"barrier {name} timed out")
        time.sleep(0.005)


def child_memory(how: str, tp_rank: int, tp_size: int, start: int, steps: int,
                 cache_root: str, sync: str) -> None:
    _common_imports()
    from nemo_checkpointless.train.data import StepData, make_step_data

    sync_dir = Path(sync)
    cfg = _cfg(cache_root, start)
    gbs = cfg.data.global_batch_size
    _barrier(sync_dir, "imported", tp_rank, tp_size)
    base = _pss()
    _barrier(sync_dir, "measured-base", tp_rank, tp_size)
    if how == "per-rank":
        data = StepData(cfg.data, cfg.trainer.seed, _coords(tp_rank, tp_size))
    else:
        data = make_step_data(cfg, _coords(tp_rank, tp_size), job_id=JOB)
    for s in range(start, start + steps):
        data.micro_batches(s * gbs)
    _barrier(sync_dir, "loaded", tp_rank, tp_size)
    if how == "cache" and tp_rank == 0:  # let prefetch and pruning settle before measuring
        time.sleep(0.5)
    _barrier(sync_dir, "settled", tp_rank, tp_size)
    used = _pss() - base
    stats = getattr(data, "stats", None)
    print(json.dumps({"pss_delta": used, "role": getattr(data, "role", "per-rank"),
                      "samples_read": stats.samples_read if stats else (steps * gbs),
                      "waits_timed_out": stats.waits_timed_out if stats else 0}))
    _barrier(sync_dir, "done", tp_rank, tp_size)
    os._exit(0)


# -- parent -----------------------------------------------------------------------------------


def _spawn(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", NCL_LOG_LEVEL="WARNING", PYTHONWARNINGS="ignore")
    return subprocess.Popen([sys.executable, __file__, *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def _result(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate(timeout=900)
    if proc.returncode:
        raise RuntimeError(f"benchmark child failed ({proc.returncode}): {out[-2000:]}")
    return json.loads(out.strip().splitlines()[-1])


def first_batch(how: str, step: int, cache_root: str) -> tuple[float, float, dict]:
    """(process start -> first batch, imports done -> first batch, child's report)."""
    t_start = time.time()
    report = _result(_spawn(["--child", "first-batch", how, str(step), cache_root]))
    return report["t_ready"] - t_start, report["t_ready"] - report["t_imports"], report


def seed_cache(cache_root: str, step: int) -> None:
    """Leave what a loader killed at ``step`` leaves: files for steps step-2 .. step+2."""
    from nemo_checkpointless.train.data import make_step_data

    cfg = _cfg(cache_root, step)
    data = make_step_data(cfg, _coords(0, 4), job_id=JOB)
    gbs = cfg.data.global_batch_size
    for s in range(max(0, step - 2), step + 1):
        data.micro_batches(s * gbs)
    deadline = time.monotonic() + 60
    while step + 2 not in data.cache.steps() and time.monotonic() < deadline:
        time.sleep(0.01)
    data.close()  # as if the process died: the loader role is free, the files stay


def measure_memory(how: str, tp_size: int, start: int, steps: int, cache_root: str) -> dict:
    sync = tempfile.mkdtemp(prefix="ncl-bench-sync-")
    try:
        procs = [_spawn(["--child", "memory", how, str(r), str(tp_size), str(start), str(steps),
                         cache_root, sync]) for r in range(tp_size)]
        reports = [_result(p) for p in procs]
    finally:
        shutil.rmtree(sync, ignore_errors=True)
    total = sum(r["pss_delta"] for r in reports)
    shm = 0
    if how == "cache":
        for path in Path(cache_root).rglob("step-*.batch"):
            shm += path.stat().st_size
    return {"total": total + shm, "processes": [r["pss_delta"] for r in reports], "shm": shm,
            "roles": [r["role"] for r in reports],
            "samples_read": [r["samples_read"] for r in reports],
            "waits_timed_out": sum(r["waits_timed_out"] for r in reports)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description="\n\n".join(__doc__.split("\n\n")[:2]),  # title and usage
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--step", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-steps", type=int, default=50)
    parser.add_argument("--cache-root", default="/dev/shm")
    parser.add_argument("--data", nargs="*", default=[], metavar="KEY=VALUE",
                        help="data overrides, e.g. data.seq_length=2048 data.global_batch_size=16")
    args = parser.parse_args()
    os.environ["NCL_BENCH_DATA_OVERRIDES"] = json.dumps(args.data)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    import logging

    logging.basicConfig(level=logging.WARNING)
    root = tempfile.mkdtemp(prefix="ncl-bench-", dir=args.cache_root)
    try:
        from nemo_checkpointless.train.data import StepData

        cfg = _cfg(root, args.step)
        StepData(cfg.data, cfg.trainer.seed, _coords(0, 1))  # build the dataset + indices once
        results: dict[str, float] = {}
        floor = statistics.median(first_batch("import", 0, root)[0] for _ in range(args.repeats))
        print(f"startup floor (interpreter + imports)       {floor:8.3f} s", flush=True)
        detail: dict[str, dict[int, tuple[float, float]]] = {}
        for step in (10, args.step):
            fresh = tempfile.mkdtemp(prefix=f"step{step}-", dir=root)
            seed_cache(fresh, step)
            for how in ("cache-loader", "cache-reader", "skip"):
                runs = [first_batch(how, step, fresh) for _ in range(args.repeats)]
                total = statistics.median(r[0] for r in runs)
                data_only = statistics.median(r[1] for r in runs)
                read = runs[-1][2]["samples_read"]
                detail.setdefault(how, {})[step] = (total, data_only)
                print(f"{how:12s} step {step:6d}: first batch {total:8.3f} s from process start, "
                      f"{data_only:8.4f} s after imports, {read} samples read", flush=True)
        s = args.step
        cache_total = max(detail["cache-loader"][s][0], detail["cache-reader"][s][0])
        cache_data = max(detail["cache-loader"][s][1], detail["cache-reader"][s][1])
        mem_root = tempfile.mkdtemp(prefix="mem-", dir=root)
        per_rank = measure_memory("per-rank", 4, s, args.memory_steps, mem_root)
        cached = measure_memory("cache", 4, s, args.memory_steps, mem_root)
        for name, m in (("one loader per rank", per_rank), ("cache", cached)):
            print(f"TP=4 loaders, {name:20s}: {m['total'] / 2**20:7.2f} MiB "
                  f"(per process {[round(x / 2**20, 2) for x in m['processes']]} MiB, "
                  f"shm files {m['shm'] / 2**20:.2f} MiB, roles {m['roles']}, "
                  f"samples read {m['samples_read']}, reader timeouts {m['waits_timed_out']})",
                  flush=True)
        results = {
            "step": s,
            "data_overrides": args.data,
            "first_batch_s_cache": round(cache_total, 4),
            "first_batch_s_skip": round(detail["skip"][s][0], 4),
            "first_batch_s_cache_data": round(cache_data, 5),
            "first_batch_s_skip_data": round(detail["skip"][s][1], 4),
            "first_batch_s_cache_step10": round(max(detail["cache-loader"][10][0],
                                                    detail["cache-reader"][10][0]), 4),
            "first_batch_s_skip_step10": round(detail["skip"][10][0], 4),
            "startup_floor_s": round(floor, 4),
            "speedup_from_process_start": round(detail["skip"][s][0] / cache_total, 2),
            "speedup_data_path": round(detail["skip"][s][1] / cache_data, 1),
            "loader_memory_bytes_cache": cached["total"],
            "loader_memory_bytes_per_rank": per_rank["total"],
        }
        print(json.dumps(results))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    if sys.argv[1:2] == ["--child"]:
        kind, rest = sys.argv[2], sys.argv[3:]
        if kind == "first-batch":
            child_first_batch(rest[0], int(rest[1]), rest[2])
        else:
            child_memory(rest[0], int(rest[1]), int(rest[2]), int(rest[3]), int(rest[4]),
                         rest[5], rest[6])
    else:
        main()
