"""The composition root: which parts of checkpointless training run, under which launcher.

Everything else receives its parts ready-made: this module alone reads the launcher's
environment (torchrun or ``ncl-launch``), the typed config's parts (rootless start-up,
in-process recovery and its source) and the resolved timeouts, and wires a front-end's
step driver to the recovery core. Front-ends call :func:`run_lean` (the lean loop),
:func:`run_under_agent` (a step driver the recovery loop runs: Megatron-Bridge), or
:func:`open_recovery` (NeMo 2, whose framework runs the loop: Lightning's fit).

Exit codes: 0 done; 2 bad configuration; 3 (``launch.protocol.EXIT_UNRECOVERABLE``) a
verdict every rank reaches alike (no replica of a lost shard, a non-finite loss): the agent
stops the job instead of replacing the rank.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

from .config import ConfigError, RunConfig, to_run_config, validate
from .logs import setup_logging

log = logging.getLogger(__name__)

def load_and_validate(node: Any, world_size: int) -> RunConfig:
    """Typed, validated config; exits with status 2 and the fix on a bad config."""
    from . import cpu

    try:
        cfg = to_run_config(node)
        validate(cfg, world_size, cpu_mode=not cpu.cuda_available())
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    return cfg


def run_pretrain(node: Any, run_dir: str | Path) -> dict[str, Any]:
    """``recipes/pretrain.py``: one rank of a lean-loop job, under any launcher."""
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    setup_logging("spare" if os.environ.get("NCL_SPARE") == "1" else rank)
    require_supported_megatron()
    cfg = load_and_validate(node, world_size)
    return run_lean(cfg, Path(run_dir))


def require_supported_megatron() -> None:
    """Start-up check of the installed megatron-core (``compat/megatron_versions.py``):
    exits with status 2 naming the supported releases when a surface the package calls is
    missing. Replacements and warm spares skip it: the job's first ranks passed it."""
    from .compat.megatron_versions import check_megatron_core

    if "1" in (os.environ.get("NCL_SPARE"), os.environ.get("NCL_REPLACEMENT")):
        return
    try:
        check_megatron_core()
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def run_lean(cfg: RunConfig, run_dir: Path) -> dict[str, Any]:
    """The lean loop, with the parts ``cfg`` selects, under the launcher that started us."""
    from . import cpu
    from .launch.channel import Channel
    from .train.frontend import LeanFrontEnd

    cpu.enable()
    if int(os.environ.get("RANK", "0")) == 0:
        from . import allocator

        log.info(allocator.describe())
    channel = Channel.from_env()
    if channel is not None and cfg.checkpointless.recovery != "none":
        return run_under_agent(cfg, run_dir, channel, LeanFrontEnd(cfg, run_dir))
    if channel is not None:
        return _train_without_recovery_under_agent(cfg, run_dir, channel)
    if cfg.restart.enabled:  # the stock checkpoint-restart baseline (torchrun --max-restarts)
        from .lab.restart import run_with_restart

        return run_with_restart(cfg, run_dir)
    if cfg.fault.plan:  # nothing here would inject them, let alone recover
        print("error: fault.plan needs in-process recovery, which runs under ncl-launch: "
              "launch with `ncl-launch ... recipes/pretrain.py` (or, for the "
              "checkpoint-restart baseline, restart.enabled=true under torchrun "
              "--max-restarts N)", file=sys.stderr)
        sys.exit(2)
    return run_plain(cfg, run_dir, rootless=cfg.checkpointless.rootless_startup)


def _train_without_recovery_under_agent(cfg: RunConfig, run_dir: Path,
                                        channel: Any) -> dict[str, Any]:
    """Started by ncl-launch without in-process recovery: train like stock training (a
    failed rank stops the job), with the world formed from the agents' store."""
    from .launch import protocol
    from .recovery.link import AgentLink

    channel.send(protocol.Hello(recovery=False))
    link = AgentLink(channel, on_new_generation=lambda gen: None).start()  # heartbeats
    if os.environ.get("NCL_SPARE") == "1":
        while not link.closed:  # nobody will hand a rank to a spare: wait to be stopped
            time.sleep(1.0)
        return {}
    from .steps import Stopped

    try:
        summary = run_plain(cfg, run_dir, rootless=True, under_agent=True,
                            stop_requested=lambda: link.stop_requested)
    except Stopped as stop:  # asked to stop, checkpointed: the agent exits 143 too
        channel.send(protocol.Stopped(step=stop.step))
        os._exit(protocol.EXIT_STOPPED)
    channel.send(protocol.Done())
    return summary


def run_plain(cfg: RunConfig, run_dir: Path, rootless: bool, under_agent: bool = False,
              stop_requested: Optional[Callable[[], bool]] = None) -> dict[str, Any]:
    """Train without in-process recovery. ``rootless``: form the world from the rootless
    store (tier 1 and up, or any tier under ncl-launch, whose agents serve the store).
    Durable checkpoints as ``checkpoint.*`` says (on by default under ncl-launch), and a
    new job resumes from the newest verified one (``checkpoint.resume=auto``).
    ``stop_requested()``: the agent asked the job to stop (checkpoint, then raise
    ``steps.Stopped`` on every rank)."""
    from . import device
    from .checkpoint.config import directory, make_checkpointer
    from .checkpoint.driver import CheckpointHook, resume
    from .comm import destroy_world, init_world
    from .comm.world import backend_for
    from .state import RngStreams
    from .train.loop import Trainer

    rank = int(os.environ.get("RANK", "0"))
    device.select(backend_for(cfg.strategy.backend))
    world = None
    if rootless:
        from .comm.init import init as rootless_init

        world = rootless_init(cfg.strategy.backend)  # rootless store, members-only groups
    else:
        init_world(cfg.strategy.backend)
    try:
        trainer = Trainer(cfg, run_dir)
        trainer.setup()
        if world is not None:
            world.report_store_ops("start-up")
        if cfg.checkpoint.resume == "auto":
            resume(trainer, directory(cfg.checkpoint, run_dir), RngStreams(),
                   verify_data=cfg.checkpoint.verify)
        durable = make_checkpointer(cfg.checkpoint, run_dir, under_agent=under_agent)
        saver = CheckpointHook(durable, trainer, RngStreams()) if durable else None
        if saver is not None:
            trainer.hooks.add(saver)
        if stop_requested is not None:
            from .train.stop import StopOnRequest

            trainer.hooks.add(StopOnRequest(stop_requested,
                                            saver.save_now if saver is not None else None))
        summary = trainer.run()
        if durable is not None:
            durable.close()
    finally:
        if world is not None:
            world.shutdown()
        else:
            destroy_world()
    if rank == 0:
        log.info("finished step %d, state_sha256 %s", summary["final_step"],
                 summary["state_sha256"])
    return summary


def run_under_agent(cfg: RunConfig, run_dir: Path, channel: Any, front_end: Any = None,
                    train: Optional[Callable[[Any], dict[str, Any]]] = None) -> dict[str, Any]:
    """One rank started by ncl-launch, recovered in process (the public entry of every
    front-end whose step loop the recovery loop runs).

    ``front_end``: builds the step driver once the world exists (the lean loop's, or a
    Bridge one). ``train(loop)``: how the job trains under the loop instead (a driver built
    ahead, then ``loop.run(driver)``); default ``loop.run()``. A front-end whose framework
    runs the loop itself (NeMo 2: Lightning's fit) uses :func:`open_recovery`,
    :func:`end_recovery` and :func:`leave_on` around its own loop instead.
    """
    from .comm import destroy_world

    loop = open_recovery(cfg, run_dir, channel, front_end)
    try:
        summary = loop.run() if train is None else train(loop)
        end_recovery(loop, channel, summary)
    except BaseException as err:
        leave_on(err, channel)
        raise
    finally:
        try:
            destroy_world()
        except Exception:  # noqa: BLE001 - groups may already be aborted
            pass
    if loop.rank == 0:
        log.info("finished step %d, state_sha256 %s", summary["final_step"],
                 summary["state_sha256"])
    return summary


def open_recovery(cfg: RunConfig, run_dir: Path, channel: Any, front_end: Any = None) -> Any:
    """Start in-process recovery on a rank ncl-launch started: tell the agent, build the
    rank's :class:`~.recovery.generation.RecoveryLoop` (a warm spare waits inside until it
    is handed a rank) and fix the rank's device. Returns the loop."""
    from . import device
    from .comm.world import backend_for
    from .launch import protocol
    from .recovery.generation import RecoveryLoop
    from .timeouts import Timeouts
    from .train.loop import make_progress

    if cfg.checkpointless.recovery == "none":  # the lean loop never gets here so
        channel.send(protocol.Hello(recovery=False))
        raise NotImplementedError(
            f"checkpointless={cfg.checkpointless.tier}: a driven job (NeMo recipe) under "
            "ncl-launch needs tier3 or tier4; launch it with torchrun for a run without "
            "recovery")
    channel.send(protocol.Hello(recovery=True))
    backend = backend_for(cfg.strategy.backend)
    loop = RecoveryLoop(cfg, run_dir, channel, front_end, Timeouts.from_env(),
                        interrupt=_interrupt(cfg.checkpointless.interrupt, backend),
                        progress=lambda lead: make_progress(cfg, lead))
    device.select(backend)
    if os.environ.get("NCL_TRANSFER_CALIBRATE"):
        from .lab.calibrate import raw_send

        loop.after_transfer = raw_send(
            loop.rank, lambda: loop.reconciler.shard.nbytes())  # type: ignore[union-attr]
    return loop


def end_recovery(loop: Any, channel: Any, summary: dict[str, Any]) -> None:
    """Training finished on this rank: tell the agent (teardown may block from here)."""
    from .launch import protocol

    channel.send(protocol.Done())
    loop.injector.fire("shutdown", int(summary["final_step"]))


def leave_on(err: BaseException, channel: Any) -> None:
    """End the process as the agent expects for ``err``, if it is a job-wide outcome: a
    stop every rank agreed on (exit 143), or a verdict every rank reaches alike (no replica
    of a lost shard, a non-finite loss: exit 3, the agent stops the job). Returns for
    anything else (the caller re-raises it)."""
    from .launch import protocol
    from .metrics.progress import NonFiniteLoss
    from .recovery.failures import Fatal
    from .replication.replica_map import UnrecoverableError
    from .steps import Stopped

    if isinstance(err, Stopped):  # asked to stop, checkpointed: the agent exits 143 too
        channel.send(protocol.Stopped(step=err.step))
        os._exit(protocol.EXIT_STOPPED)
    if isinstance(err, (UnrecoverableError, NonFiniteLoss, Fatal)):
        log.error("cannot recover: %s", err)
        print(f"error: cannot recover: {err}", file=sys.stderr, flush=True)
        channel.send(protocol.Fatal(reason=str(err)))
        os._exit(protocol.EXIT_UNRECOVERABLE)


def _interrupt(setting: str, backend: str) -> bool:
    """``checkpointless.interrupt``: ``auto`` is on for gloo (CPU compute runs on the
    training thread, uninterrupted by an abort), off for NCCL (the abort fails the next
    collective, and kernels are asynchronous)."""
    return setting == "on" or (setting == "auto" and backend == "gloo")
