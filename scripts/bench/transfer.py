"""Peer state transfer vs a raw gloo send of the same bytes, two idle processes, interleaved.

    .venv/bin/python scripts/bench/transfer.py [--mbytes 30.3] [--repeats 7] [--donors 1]
    .venv/bin/python scripts/bench/transfer.py --mbytes 3 --repeats 1            # quick

The state is laid out as recovery lays it out (four groups: main params, exp_avg,
exp_avg_sq, steps) and moved with ``replication.transfer.exchange`` (zero-copy messages,
CRC-32 per message, control blob). The baseline is one ``dist.send`` of a buffer of the same
size. Last line: JSON with ``efficiency`` = exchange throughput / raw throughput (medians).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world: int, port: int, nbytes: int, repeats: int, out: "mp.Queue") -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from nemo_checkpointless.replication.transfer import exchange, nbytes as size_of

    n = nbytes // 4 // 3
    groups = [[torch.randn(n)], [torch.randn(n)], [torch.randn(n)], [torch.zeros(64)]]
    total = size_of([t for g in groups for t in g])
    raw = torch.ones(total, dtype=torch.uint8)
    target = world - 1
    plan = {target: list(range(world - 1))}
    ours, base = [], []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        exchange(plan, rank, groups, lambda: {"step": 1})
        ours.append(time.perf_counter() - t0)
        dist.barrier()
        t0 = time.perf_counter()
        if rank == 0:
            dist.send(raw, target)
        elif rank == target:
            dist.recv(raw, 0)
        base.append(time.perf_counter() - t0)
    if rank == target:
        out.put((total, statistics.median(ours), statistics.median(base)))
    dist.destroy_process_group()


def main() -> None:
    from nemo_checkpointless.comm.world import free_port

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mbytes", type=float, default=30.3)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--donors", type=int, default=1)
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    world = args.donors + 1
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, int(args.mbytes * 1e6),
                                               args.repeats, out)) for r in range(world)]
    for p in procs:
        p.start()
    total, ours, base = out.get(timeout=300)
    for p in procs:
        p.join()
    ours_mb, raw_mb = total / 1e6 / ours, total / 1e6 / base
    print(f"{total / 1e6:.1f} MB: exchange {ours * 1e3:.1f} ms ({ours_mb:.0f} MB/s), "
          f"raw send {base * 1e3:.1f} ms ({raw_mb:.0f} MB/s)")
    print(json.dumps({"bytes": total, "donors": args.donors, "exchange_mb_per_s": round(ours_mb),
                      "raw_mb_per_s": round(raw_mb), "efficiency": round(ours_mb / raw_mb, 3)}))


if __name__ == "__main__":
    main()
