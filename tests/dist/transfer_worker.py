"""Worker for test_transfer.py (launched by torchrun, 3 gloo ranks): ranks 0 and 1 hold the
same state, rank 2 has none; the state is streamed to rank 2 both ways (tagged messages,
gloo's; one batch per phase, NCCL's), with small messages so that each way cuts many."""

from __future__ import annotations

import json

import torch
import torch.distributed as dist


def state(filled: bool) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(7)

    def t(n: int, dtype=torch.float32) -> torch.Tensor:
        x = torch.randn(n, generator=gen).to(dtype)
        return x if filled else torch.zeros_like(x)

    flat = t(3000)
    mains = [t(517), t(33), t(1029, torch.bfloat16)]         # separate allocations
    avgs = [flat[:1000], flat[1000:2999]]                     # one run, a view of it
    sqs = [t(4001)]
    steps = [t(3), t(1)]
    return [mains, avgs, sqs, steps]


def main() -> None:
    from nemo_checkpointless.replication import transfer

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    transfer.CHUNK_BYTES = transfer.NCCL_CHUNK_BYTES = 1000  # many messages, odd cuts
    plan = {2: [0, 1]}
    want = state(True)
    results = {}
    for batched in (False, True):
        groups = state(rank != 2)
        blob = {"step": 5, "rng": torch.arange(4), "batched": batched}
        received, stats = transfer.exchange(plan, rank, groups, lambda: blob, batched=batched)
        same = all(torch.equal(a, b) for g, h in zip(groups, want) for a, b in zip(g, h))
        results[str(batched)] = {
            "same": same, "sent": stats.bytes_sent, "received": stats.bytes_received,
            "blob": None if received is None else {
                "step": received["step"], "batched": received["batched"],
                "rng": received["rng"].tolist()},
            "from": stats.received_from}
        dist.barrier()
    print("RESULT " + json.dumps({"rank": rank, **results}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
