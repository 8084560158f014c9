"""One torchft replica group of one rank: the bench model, DDP and Adam behind torchft.

    python torchft_worker.py --replica R --steps N --kill-step S [--tuned] [--min-replicas M]
    python torchft_worker.py --standby --steps N ...     # a warm replacement (see below)

Run by ``scripts/bench/peers.py`` inside ``.venv-bench-torchft``, four at once, with
``TORCHFT_LIGHTHOUSE`` pointing at a running ``torchft_lighthouse``. Replica 1 SIGKILLs
itself in the optimizer phase of step S unless ``PEERS_RESTARTED=1`` (then it is the
replacement the supervisor started: it joins the next quorum and heals from a peer over
torchft's HTTP checkpoint transport, model and optimizer state both).

``--standby``: a warm replacement, started with the job as our warm spare is: it imports
torch and torchft and builds the model and Adam, writes ``standby_ready``, then blocks on
stdin until the supervisor writes the replica number it takes over (once that replica's
process died); then it creates its Manager (joining the next quorum) and heals like a
cold replacement. Its timeline is ``standby.jsonl``.

Settings: default = the Manager's and ProcessGroupGloo's documented defaults (timeout,
quorum_timeout, connect_timeout 60 s; gloo 60 s); tuned = everything at the smallest
value that still fits a step of this model on this machine (see ``TUNED``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from datetime import timedelta

import torch
from torch.distributed import TCPStore

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from torchft import DistributedDataParallel, Manager, ProcessGroupGloo  # noqa: E402
from torchft.optim import OptimizerWrapper  # noqa: E402

# Tuned timeouts. A killed peer's sockets close, so no collective waits for a timeout to
# see it; what sets the recovery time is the lighthouse (heartbeat timeout, join wait,
# tick: runs.LIGHTHOUSE) and the 50 ms heartbeat. The collective/commit timeout stays
# above a loaded step (several seconds here), and quorum_timeout at its 60 s: the docs ask
# for it to exceed the step time, and 20 s made a straggler's quorum call fail the worker.
TUNED = {"timeout": timedelta(seconds=30), "quorum_timeout": timedelta(seconds=60),
         "connect_timeout": timedelta(seconds=10), "heartbeat_interval": timedelta(milliseconds=50),
         "gloo_timeout": timedelta(seconds=30)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--replica", type=int, default=None)
    parser.add_argument("--standby", action="store_true",
                        help="a warm replacement: build, then read the replica from stdin")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--kill-step", type=int, default=-1)
    parser.add_argument("--min-replicas", type=int, default=1)
    parser.add_argument("--tuned", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    if (args.replica is None) == (not args.standby):
        parser.error("give --replica R, or --standby (the replica then comes on stdin)")
    restarted = args.standby or os.environ.get("PEERS_RESTARTED") == "1"
    timeline = common.Timeline("standby" if args.standby else
                               f"replica{args.replica}" + ("_restarted" if restarted else ""))
    timeline.write("start", restarted=restarted, standby=args.standby)

    model = common.build_model()
    adam = torch.optim.Adam(model.parameters(), lr=common.LR)

    def state_dict() -> dict:
        return {"model": model.state_dict(), "optim": adam.state_dict()}

    def load_state_dict(sd: dict) -> None:
        model.load_state_dict(sd["model"])
        adam.load_state_dict(sd["optim"])

    # Each replica group (one rank here) has its own TCPStore, as torchrun would give it.
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    kw = {}
    pg = ProcessGroupGloo()
    if args.tuned:
        kw = {k: v for k, v in TUNED.items() if k != "gloo_timeout"}
        pg = ProcessGroupGloo(timeout=TUNED["gloo_timeout"])
    if args.standby:
        timeline.write("standby_ready")
        line = sys.stdin.readline()
        if not line.strip():
            return  # the job ended without needing a replacement
        args.replica = int(line)
        timeline.write("released", replica=args.replica)
    manager = Manager(pg=pg, load_state_dict=load_state_dict, state_dict=state_dict,
                      min_replica_size=args.min_replicas, replica_id=f"replica_{args.replica}",
                      rank=0, world_size=1, store_addr="127.0.0.1", store_port=store.port, **kw)
    ddp = DistributedDataParallel(manager, model)
    optimizer = OptimizerWrapper(manager, adam)
    timeline.write("ready")
    if not restarted:
        common.start_barrier(4)  # the first quorum then has every replica group in it

    while manager.current_step() < args.steps:
        step = manager.current_step()
        optimizer.zero_grad()  # starts the quorum (and a heal, when this replica needs one)
        loss = common.loss_fn(ddp, step, args.replica)
        loss.backward()  # the DDP hook all-reduces through the manager
        if step == args.kill_step and args.replica == 1 and not restarted:
            common.kill_self(timeline, step)
        healing = manager._healing
        optimizer.step()  # steps Adam only if every replica group agrees to commit
        committed = manager.current_step() == step + 1
        timeline.write("step" if committed else "step_discarded", step=step,
                       participants=manager.num_participants(), healed=healing,
                       loss=loss.item())
    timeline.write("final", step=manager.current_step(),
                   sha256=common.state_sha256(model, adam))
    manager.shutdown(wait=False)


if __name__ == "__main__":
    main()
