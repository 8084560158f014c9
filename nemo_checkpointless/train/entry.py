"""From a composed config to a finished run: validate, start the world, train, summarise."""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from ..config import ConfigError, RunConfig, to_run_config, validate


def setup_logging(rank: int | str) -> None:
    """One format for every rank: the rank (or ``spare``) is in every line."""
    logging.basicConfig(
        level=os.environ.get("NCL_LOG_LEVEL", "INFO"),
        format=f"[%(asctime)s] [rank {rank}] %(name)s %(levelname)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    for message in (
        "Transformer Engine and Apex are not installed",
        ".*is deprecated. Please use.*",
        ".*Apex is not installed.*",
    ):
        warnings.filterwarnings("ignore", message=message)


def load_and_validate(node: Any, world_size: int) -> RunConfig:
    """Typed, validated config; exits with status 2 and the fix on a bad config."""
    try:
        cfg = to_run_config(node)
        validate(cfg, world_size, cpu_mode=not _cuda())
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    return cfg


def _cuda() -> bool:
    from .. import cpu

    return cpu.cuda_available()


def run_pretrain(node: Any, run_dir: str | Path) -> dict[str, Any]:
    """Run one pre-training job on this rank (launched by torchrun or ncl-launch)."""
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    setup_logging("spare" if os.environ.get("NCL_SPARE") == "1" else rank)
    cfg = load_and_validate(node, world_size)

    from .. import cpu
    from ..launch.channel import Channel

    cpu.enable()
    if rank == 0:
        from .. import allocator

        logging.getLogger(__name__).info(allocator.describe())
    channel = Channel.from_env()
    if channel is not None and cfg.checkpointless.tier in RECOVERY_TIERS:
        return _run_under_agent(cfg, Path(run_dir), channel)
    if channel is not None:
        # started by ncl-launch without in-process recovery: train like stock training
        # (a failed rank stops the job), with the world formed from the agents' store
        from ..recovery.link import AgentLink

        channel.send({"t": "hello", "recovery": False})
        link = AgentLink(channel, on_new_generation=lambda gen: None).start()  # heartbeats
        if os.environ.get("NCL_SPARE") == "1":
            while not link.closed:  # nobody will hand a rank to a spare: wait to be stopped
                time.sleep(1.0)
            return {}
        summary = _run_plain(cfg, Path(run_dir), rootless=True)
        channel.send({"t": "done"})
        return summary
    if cfg.restart.enabled:  # the stock checkpoint-restart baseline (torchrun --max-restarts)
        from .restart import run_with_restart

        return run_with_restart(cfg, Path(run_dir))
    return _run_plain(cfg, Path(run_dir), rootless=cfg.checkpointless.tier == "tier1")


def _run_plain(cfg: RunConfig, run_dir: Path, rootless: bool) -> dict[str, Any]:
    """Train without in-process recovery. ``rootless``: form the world from the rootless
    store (tier 1, or any tier under ncl-launch, whose agents serve the store)."""
    from ..comm import destroy_world, init_world
    from .loop import Trainer

    rank = int(os.environ.get("RANK", "0"))
    tier1 = None
    if rootless:
        from ..comm.init import init as tier1_init

        tier1 = tier1_init(cfg.strategy.backend)  # rootless store, members-only groups
    else:
        init_world(cfg.strategy.backend)
    try:
        trainer = Trainer(cfg, run_dir)
        trainer.setup()
        if tier1 is not None:
            tier1.report_store_ops("start-up")
        summary = trainer.run()
    finally:
        if tier1 is not None:
            tier1.shutdown()
        else:
            destroy_world()
    if rank == 0:
        logging.getLogger(__name__).info(
            "finished step %d, state_sha256 %s", summary["final_step"], summary["state_sha256"]
        )
    return summary


RECOVERY_TIERS = ("tier3", "tier4")
EXIT_UNRECOVERABLE = 3  # the agent stops the whole job instead of replacing the rank


def _run_under_agent(cfg: RunConfig, run_dir: Path, channel: Any,
                     train: Any = None) -> dict[str, Any]:
    """Started by ncl-launch: recover in process (tier 3/4) or fail like stock training.

    ``train(manager)``: how the job trains under the manager (default ``manager.run()``,
    the lean loop; ``nemo/driver.py`` passes one that builds NeMo's objects first).
    """
    from ..comm import destroy_world
    from ..recovery.manager import RecoveryManager

    if cfg.checkpointless.tier not in RECOVERY_TIERS:  # the lean loop never gets here so
        channel.send({"t": "hello", "recovery": False})
        raise NotImplementedError(
            f"checkpointless={cfg.checkpointless.tier}: a driven job (NeMo recipe) under "
            "ncl-launch needs tier3 or tier4; launch it with torchrun for a run without "
            "recovery")
    from ..replication.replica_map import UnrecoverableError

    channel.send({"t": "hello", "recovery": True})
    manager = RecoveryManager(cfg, run_dir, channel, lean_loop=train is None)
    try:
        summary = manager.run() if train is None else train(manager)
        channel.send({"t": "done"})
    except UnrecoverableError as err:
        # every rank reaches the same verdict from the same gathered facts: stop the job
        logging.getLogger(__name__).error("cannot recover: %s", err)
        print(f"error: cannot recover: {err}", file=sys.stderr, flush=True)
        channel.send({"t": "fatal", "reason": str(err)})
        os._exit(EXIT_UNRECOVERABLE)
    finally:
        try:
            destroy_world()
        except Exception:  # groups may already be aborted
            pass
    if manager.rank == 0:
        logging.getLogger(__name__).info(
            "finished step %d, state_sha256 %s", summary["final_step"], summary["state_sha256"])
    return summary
