"""Run a Bridge ConfigContainer on one rank: Bridge alone, or under the recovery loop.

* :func:`run_bridge`: Bridge's own ``pretrain()`` (under torchrun, Slurm's srun, or a
  plain process), with :class:`~.steps.MetricsCallback` writing ``metrics.jsonl`` and
  ``summary.json``. Nothing of the recovery core runs.
* :func:`run_bridge_under_agent`: a rank started by ``ncl-launch`` with in-process recovery
  (``recovery: disk`` or ``peers``, tier 3 or 4), through the composition root's
  :func:`~nemo_checkpointless.runtime.run_under_agent`. Every rank (a first start and a
  warm spare taking over alike) runs Bridge's ``setup()`` in a world of fake process
  groups, so a replacement builds its objects alone while its peers keep theirs; then
  :class:`~.driver.BridgeStepDriver` is handed to the recovery loop, which joins the job's
  world, rebuilds megatron's parallel state with Bridge's arguments, rebinds every cached
  group handle and drives Bridge's loop step by step.

:func:`run_config` is the core's typed view of a Bridge ConfigContainer (layout, batch,
steps, the checkpointless parts, the core's durable checkpoints, the fault plan): what the
recovery loop reads.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from ..config import (ConfigError, DataConfig, FaultConfig, ModelConfig, RunConfig,
                      StrategyConfig, TrainerConfig, validate_fault_plan)
from .apply import check_bridge_layout, check_parts, checkpointless_of

log = logging.getLogger(__name__)


def prepare() -> bool:
    """Process-wide start-up: megatron-core check, Bridge's wheel/CPU patches, rehearsal
    mode without CUDA, Adam's state created with the optimizer (in flat buffers, as the
    recovery core moves it; before any checkpoint load). Returns whether CPU rehearsal
    mode is on."""
    from .. import cpu
    from ..compat import bridge as cbridge
    from ..compat.megatron_step import separate_adam_steps_on_load
    from ..compat.megatron_versions import check_megatron_core
    from ..megatron.shards import make_state_contiguous

    check_megatron_core()
    rehearsal = cpu.enable()
    cbridge.prepare_start_up(cpu_mode=rehearsal)
    cbridge.after_optimizer_setup(make_state_contiguous)
    separate_adam_steps_on_load()
    return rehearsal


def run_bridge(cfg: Any, run_dir: str | Path, forward_step: Optional[Callable[..., Any]] = None,
               callbacks: Sequence[Any] = ()) -> None:
    """Bridge's own ``pretrain()``, recording ``metrics.jsonl`` and ``summary.json``."""
    prepare()
    from megatron.bridge.training.pretrain import pretrain

    from .steps import MetricsCallback, RecordingForwardStep

    forward = RecordingForwardStep(forward_step)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    check_bridge_layout(cfg, world)
    pretrain(cfg, forward, callbacks=[MetricsCallback(Path(run_dir), forward), *callbacks])


def run_config(cfg: Any, world_size: int, run_dir: str | Path) -> RunConfig:
    """The core settings the recovery loop reads, taken from a Bridge ConfigContainer
    (checked: layout, fault plan, the parts, the core's checkpoint directory)."""
    from ..checkpoint.config import directory, enabled
    from ..config import FaultSpec

    ck = checkpointless_of(cfg)
    m, ddp, train = cfg.model, cfg.ddp, cfg.train
    check_bridge_layout(cfg, world_size)
    check_parts(ck.parts, ck.checkpoint)
    validate_fault_plan(ck.fault_plan, world_size, int(train.train_iters))
    plan = [item if isinstance(item, FaultSpec) else FaultSpec(**dict(item))
            for item in ck.fault_plan]
    durable = ck.checkpoint
    save = getattr(cfg.checkpoint, "save", None)
    if save and enabled(durable, under_agent=True) and \
            Path(save).resolve() == directory(durable, run_dir).resolve():
        raise ConfigError(f"checkpoint.save={save} is also the directory of the core's durable "
                          "checkpoints: give Bridge's checkpoints another directory, or set "
                          "checkpointless.checkpoint.dir")
    return RunConfig(
        name="bridge",
        model=ModelConfig(num_layers=m.num_layers, hidden_size=m.hidden_size,
                          ffn_hidden_size=m.ffn_hidden_size,
                          num_attention_heads=m.num_attention_heads,
                          num_query_groups=m.num_query_groups),
        strategy=StrategyConfig(
            tensor_model_parallel_size=int(m.tensor_model_parallel_size),
            pipeline_model_parallel_size=int(m.pipeline_model_parallel_size),
            virtual_pipeline_model_parallel_size=m.virtual_pipeline_model_parallel_size,
            context_parallel_size=int(m.context_parallel_size or 1),
            sequence_parallel=bool(m.sequence_parallel),
            use_distributed_optimizer=bool(ddp.use_distributed_optimizer),
            num_distributed_optimizer_instances=int(ddp.num_distributed_optimizer_instances or 1),
            backend=str(cfg.dist.distributed_backend)),
        data=DataConfig(global_batch_size=int(train.global_batch_size),
                        micro_batch_size=int(train.micro_batch_size),
                        seq_length=int(cfg.dataset.seq_length)),
        trainer=TrainerConfig(max_steps=int(train.train_iters),
                              log_interval=int(cfg.logger.log_interval or 1)),
        checkpointless=ck.parts,
        checkpoint=durable,
        fault=FaultConfig(plan=plan),
    )


def run_bridge_under_agent(cfg: Any, run_dir: str | Path, channel: Any,
                           forward_step: Optional[Callable[..., Any]] = None,
                           callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """One rank started by ncl-launch: Bridge's objects and loop under the recovery loop."""
    from ..comm.world import fake_world
    from ..runtime import run_under_agent
    from .driver import BridgeStepDriver
    from .steps import RecordingForwardStep

    prepare()
    world_size = int(os.environ["WORLD_SIZE"])
    ck = checkpointless_of(cfg)
    if ck.parts.recovery == "none":
        raise ConfigError(f"checkpointless={ck.tier} (recovery: none): under ncl-launch a "
                          "Bridge recipe needs in-process recovery (tier3, tier4); launch it "
                          "with torchrun for a run without recovery")
    root = Path(run_dir)
    core = run_config(cfg, world_size, root)

    def train(loop: Any) -> dict[str, Any]:
        # only now: a warm spare learns its rank when the agent assigns it
        fake_world(loop.rank, loop.world_size)
        driver = BridgeStepDriver(cfg, RecordingForwardStep(forward_step), loop.step_hooks,
                                  root, loop.timeouts, pause=loop.link.pause,
                                  callbacks=list(callbacks) or None,
                                  stop_after=lambda: loop.stop_after).build()
        return loop.run(driver)

    return run_under_agent(core, root, channel, train=train)


def run(cfg: Any, run_dir: str | Path, forward_step: Optional[Callable[..., Any]] = None,
        callbacks: Sequence[Any] = ()) -> Optional[dict[str, Any]]:
    """Train ``cfg`` on this rank under whichever launcher started it: under ncl-launch
    with in-process recovery (tier 3/4), else Bridge's own ``pretrain()``."""
    from ..launch.channel import Channel

    channel = Channel.from_env()
    if channel is not None:
        return run_bridge_under_agent(cfg, run_dir, channel, forward_step, callbacks)
    ck = checkpointless_of(cfg)
    if ck.parts.recovery != "none":
        log.warning("checkpointless=%s without ncl-launch: Bridge trains alone (no in-process "
                    "recovery); launch with ncl-launch to recover", ck.tier)
    run_bridge(cfg, run_dir, forward_step, callbacks)
    return None
