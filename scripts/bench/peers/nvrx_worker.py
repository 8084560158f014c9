"""One rank of the nvidia-resiliency-ext 0.4.1 run: the bench model under inprocess.Wrapper.

    RANK=r WORLD_SIZE=5 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python nvrx_worker.py \
        --steps N --kill-step S --gloo-timeout-s T [--tuned]

Run by ``scripts/bench/peers.py`` inside ``.venv-bench-nvrx``: five processes, four active
data-parallel ranks and one warm spare (``MaxActiveWorldSize(4)`` after ``ShiftRanks``).
Active rank 1 SIGKILLs itself in the optimizer phase of step S. The wrapper restarts
the wrapped function in-process on the healthy ranks and activates the spare.

What survives a restart is what the user keeps outside the wrapped function: here each
rank keeps its model, its Adam and its step counter. The spare has none of it: on restart
``DistributedDataParallel`` broadcasts rank 0's parameters (as it does at every
construction) and every rank resumes from rank 0's step counter; nothing in the library
restores the spare's Adam moments, so the spare starts them from zero.

No ``from __future__ import annotations`` here: the Wrapper finds the ``CallWrapper``
parameter by its annotation with ``issubclass`` and fails on a string annotation.
"""


import argparse
import datetime
import logging
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from nvidia_resiliency_ext import inprocess  # noqa: E402

sec = datetime.timedelta
# Documented defaults are the Wrapper's own (monitor intervals 1 s, soft 60 s, hard 90 s,
# heartbeat timeout 30 s, barrier 120 s, last_call_wait 1 s). Tuned: intervals of 50 ms and
# the shortest timeouts a step of this model (several seconds here) leaves room for.
TUNED = dict(monitor_thread_interval=sec(seconds=0.05), monitor_process_interval=sec(seconds=0.05),
             heartbeat_interval=sec(seconds=0.05), progress_watchdog_interval=sec(seconds=0.05),
             last_call_wait=sec(seconds=0.05), soft_timeout=sec(seconds=30),
             hard_timeout=sec(seconds=40), heartbeat_timeout=sec(seconds=5),
             barrier_timeout=sec(seconds=60), completion_timeout=sec(seconds=60),
             termination_grace_time=sec(seconds=1))
# The gloo timeout (``--gloo-timeout-s``, chosen by the supervisor: runs.NVRX_GLOO_TIMEOUT_S)
# is torch's, not the library's, but it decides nvrx's recovery time on CPU:
# AbortTorchDistributed only shuts down NCCL backends and then destroys the groups, which
# does not wake a rank blocked in a gloo collective whose ring neighbour is still alive;
# that rank leaves the collective only when gloo times out.


class Job:
    """What a rank keeps across restarts of the wrapped function (lives outside it)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.model = common.build_model()
        self.adam = torch.optim.Adam(self.model.parameters(), lr=common.LR)
        self.step = 0
        self.initial_rank = int(os.environ["RANK"])
        self.timeline = common.Timeline(f"rank{self.initial_rank}")
        world = int(os.environ["WORLD_SIZE"])
        # The training process group's store: a second TCPStore, hosted by initial rank 0
        # (the wrapper's own store is on MASTER_PORT), one prefix per restart iteration.
        self.store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]) + 1,
                                   world, is_master=self.initial_rank == 0, multi_tenant=True,
                                   wait_for_workers=False)

    def train(self, call_wrapper: inprocess.CallWrapper = None) -> str:
        it = call_wrapper.iteration
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        self.timeline.write("fn_start", iteration=it, rank=rank, has_state=bool(self.adam.state))
        dist.init_process_group("gloo", store=dist.PrefixStore(f"it{it}", self.store), rank=rank,
                                world_size=world,
                                timeout=sec(seconds=self.args.gloo_timeout_s))
        # The step counter of rank 0 (always a healthy rank here) for everyone.
        step = torch.tensor([self.step])
        dist.broadcast(step, 0)
        self.step = int(step)
        ddp = torch.nn.parallel.DistributedDataParallel(self.model)  # broadcasts rank 0's params
        while self.step < self.args.steps:
            self.adam.zero_grad()
            loss = common.loss_fn(ddp, self.step, rank)
            loss.backward()
            if self.step == self.args.kill_step and self.initial_rank == 1:
                common.kill_self(self.timeline, self.step)
            self.adam.step()
            self.timeline.write("step", step=self.step, rank=rank, iteration=it,
                                loss=loss.item())
            self.step += 1
            call_wrapper.ping()
        digest = common.state_sha256(self.model, self.adam)
        self.timeline.write("final", step=self.step, rank=rank, sha256=digest)
        dist.destroy_process_group()
        return digest


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--kill-step", type=int, default=-1)
    parser.add_argument("--tuned", action="store_true")
    parser.add_argument("--gloo-timeout-s", type=float, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    job = Job(args)
    job.timeline.write("ready")
    wrapper = inprocess.Wrapper(
        rank_assignment=inprocess.Compose(
            inprocess.rank_assignment.MaxActiveWorldSize(int(os.environ["WORLD_SIZE"]) - 1),
            inprocess.rank_assignment.ShiftRanks()),
        health_check=None, **(TUNED if args.tuned else {}))
    wrapper(job.train)()


if __name__ == "__main__":
    main()
