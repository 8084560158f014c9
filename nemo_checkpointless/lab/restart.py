"""Stock checkpoint-restart: the baseline that checkpointless recovery is measured against.

This is how a job survives a failure today: ``torchrun --max-restarts N`` restarts every
process when one dies; each new process builds everything again, loads the latest
complete checkpoint, rebuilds its data loader by reading and discarding the batches the
checkpoint had consumed, and replays the steps since the checkpoint. Selected with
``checkpointless=off restart.enabled=true`` (``RestartConfig``). It lives in the lab
(``nemo_checkpointless/lab/``), apart from the product's runtime path.

* Checkpoints: every ``restart.checkpoint_interval`` steps each rank writes its part with
  ``torch.distributed.checkpoint`` in the background (``lab/checkpoint.py``: fp32
  main params, Adam moments and step, plus RNG, counters and scheduler); a checkpoint is
  complete when every rank's ``.done`` marker is on disk.
* metrics.jsonl keeps exactly one row per committed step: on resume rank 0 drops the rows
  after the checkpoint step, and the replayed steps write them again (same ``loss_hex``).
* Faults (``kind: kill`` only) fire once per job: a marker file in the run directory
  (``restart_faults/<index>.fired``) claims each, so a restarted process does not fire it
  again.
* ``restart_events.jsonl`` (rank 0, plus the rank that fires a fault) records the time of
  each phase: ``fault``, then per attempt ``process_start``, ``imports_done``,
  ``world_ready``, ``model_built``, ``checkpoint_loaded``, ``data_skipped`` and one
  ``step`` event per completed step. ``scripts/bench/recovery.py`` turns them into phases.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Optional

from ..config import RunConfig
from ..state import OptimizerShard, RankState, RngStreams
from ..steps import Phase

log = logging.getLogger(__name__)

EVENTS_FILE = "restart_events.jsonl"


def process_start_time(pid: str = "self") -> float:
    """Wall-clock time at which this process was started (exec), from /proc; 10 ms grain.

    The start is in clock ticks since boot; its age is measured against CLOCK_BOOTTIME
    (``btime`` in /proc/stat is rounded to whole seconds, too coarse for this).
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
        return time.time() - age
    except (OSError, ValueError, AttributeError):
        return time.time()


class RestartEvents:
    """Appends one JSON line per event (with wall time) to ``restart_events.jsonl``."""

    def __init__(self, run_dir: Path, rank: int, attempt: int) -> None:
        self.path = Path(run_dir) / EVENTS_FILE
        self.rank = rank
        self.attempt = attempt
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, event: str, t: Optional[float] = None, **extra: Any) -> None:
        record = {"event": event, "t": time.time() if t is None else t, "rank": self.rank,
                  "attempt": self.attempt, **extra}
        line = json.dumps(record, sort_keys=True) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())  # one write on O_APPEND: lines never interleave
        finally:
            os.close(fd)


class MarkerClaim:
    """``claim(index)``: True once per job for fault ``index`` (a file created O_EXCL)."""

    def __init__(self, run_dir: Path) -> None:
        self.root = Path(run_dir) / "restart_faults"
        self.root.mkdir(parents=True, exist_ok=True)

    def __call__(self, index: int) -> bool:
        try:
            os.close(os.open(self.root / f"{index}.fired", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return True
        except FileExistsError:
            return False


class StepEvents:
    """Step hook: an event per completed step (rank 0), with the wall time it ended."""

    def __init__(self, events: RestartEvents, enabled: bool) -> None:
        self.events = events
        self.enabled = enabled

    def on_phase(self, phase: Any, step: int) -> None:
        if self.enabled and phase is Phase.AFTER_STEP:
            self.events.write("step", step=step)


def init_restarted_world(backend: str, attempt: int) -> None:
    """The world group of restart attempt ``attempt``.

    torchrun's agent keeps one store for the whole job (``TORCHELASTIC_USE_AGENT_STORE``)
    and, in torch 2.13, does not prefix it per attempt: a restarted gloo world read the
    dead processes' addresses left from attempt 0 and failed to connect. Each attempt
    therefore forms its world under its own prefix of the agent's store.
    """
    import torch.distributed as dist

    from ..comm.world import backend_for, default_timeout, device_kwargs, init_world

    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        init_world(backend)  # rank 0 hosts a fresh store each attempt
        return
    backend = backend_for(backend)
    timeout = default_timeout(backend)
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          is_master=False, timeout=timeout)
    dist.init_process_group(backend=backend, store=dist.PrefixStore(f"ncl/attempt_{attempt}",
                                                                    store),
                            rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
                            timeout=timeout, **device_kwargs(backend))


def run_with_restart(cfg: RunConfig, run_dir: Path) -> dict[str, Any]:
    """One attempt of a checkpoint-restart job on this rank (started by torchrun)."""
    run_dir = Path(run_dir)
    rank = int(os.environ.get("RANK", "0"))
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    events = RestartEvents(run_dir, rank, attempt)
    lead = rank == 0
    if lead:
        events.write("process_start", t=process_start_time())

    import torch.distributed as dist

    from ..comm import destroy_world
    from .checkpoint import AsyncCheckpointer
    from ..recovery.faults import FaultInjector, parse_plan
    from ..steps import HookList
    from ..train.loop import Trainer

    if lead:
        events.write("imports_done")
    init_restarted_world(cfg.strategy.backend, attempt)
    world_size = dist.get_world_size()
    if lead:
        events.write("world_ready")

    faults = parse_plan(cfg.fault.plan, world_size, cfg.trainer.max_steps)
    injector = FaultInjector(
        faults, rank, claim=MarkerClaim(run_dir),
        on_fire=lambda f: events.write("fault", step=f.step, phase=f.phase, kind=f.kind))
    trainer = Trainer(cfg, run_dir, HookList([injector]))
    try:
        trainer.setup()
        if lead:
            events.write("model_built")
        r = cfg.restart
        root = Path(r.checkpoint_dir or run_dir / "restart_checkpoints")
        state = RankState({"driver": trainer, "rng": RngStreams(),
                           "optimizer": OptimizerShard(trainer.optimizer)})
        checkpointer = AsyncCheckpointer(
            root, rank, world_size, r.checkpoint_interval,
            tensors=lambda: OptimizerShard(trainer.optimizer).tensors(),
            blob=lambda step: state.state_dict(),
            keep=r.checkpoint_keep, fmt="dcp")  # what jobs do today
        resumed = resume(trainer, state, root if r.resume == "auto" else None, world_size,
                         events if lead else None)
        trainer.hooks.add(checkpointer)
        trainer.hooks.add(StepEvents(events, lead))
        summary = trainer.run()
        checkpointer.wait()
        dist.barrier()
    finally:
        destroy_world()
    if lead:
        from ..metrics.writer import write_json

        summary["restart"] = {"attempt": attempt, **resumed}
        write_json(run_dir / "summary.json", summary)
        log.info("finished step %d, state_sha256 %s", summary["final_step"],
                 summary["state_sha256"])
    return summary


def resume(trainer: Any, state: RankState, root: Optional[Path], world_size: int,
           events: Optional[RestartEvents]) -> dict[str, Any]:
    """Load the latest complete checkpoint, skip the data forward, trim metrics.jsonl.

    ``root=None`` (``restart.resume=never``): start at step 0 (rows of earlier attempts
    are dropped all the same).

    Every rank agrees on the checkpoint step (the minimum any rank sees complete). The
    data loader is rebuilt stock-style: the batches of every consumed step are read and
    thrown away, as an iterator-based loader does, so this costs O(checkpoint step).
    """
    import torch
    import torch.distributed as dist

    from .. import device
    from ..megatron import optimizer as mopt
    from .checkpoint import complete_steps, load_part

    steps = complete_steps(root, world_size) if root is not None and root.exists() else []
    latest = device.control_tensor([steps[-1] if steps else 0], torch.int64)
    dist.all_reduce(latest, op=dist.ReduceOp.MIN)
    step = int(latest.item())
    nbytes = 0
    if step > 0:
        assert root is not None
        shard = OptimizerShard(trainer.optimizer)
        tensors = shard.tensors()
        state.load_state_dict(load_part(root, step, dist.get_rank(), tensors))
        nbytes = shard.nbytes()
        shard.publish()
        mopt.gather_params(trainer.model, trainer.optimizer)  # (the RNG was restored above)
    total = device.control_tensor([nbytes], torch.int64)
    dist.all_reduce(total)
    if events is not None:
        events.write("checkpoint_loaded", checkpoint_step=step, bytes=int(total.item()))
    gbs = trainer.cfg.data.global_batch_size
    for s in range(step):  # stock loader rebuild: read and discard every consumed batch
        trainer.data.micro_batches(s * gbs)
    last_logged = 0
    if events is not None:
        path = trainer.run_dir / "metrics.jsonl"
        if path.exists():
            rows = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
            last_logged = max((row["step"] for row in rows), default=0)
        dropped = trainer.metrics.truncate_after(step)
        events.write("data_skipped", skipped_steps=step, last_logged_step=last_logged,
                     dropped_rows=dropped)
        if step or last_logged:
            log.warning("resumed from checkpoint step %d; replaying steps %d..%d", step,
                        step + 1, last_logged)
    return {"checkpoint_step": step, "bytes": int(total.item()), "last_logged_step": last_logged}
