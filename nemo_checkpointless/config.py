"""Typed configuration for a run, registered with Hydra as structured configs.

Every YAML group under ``conf/`` is validated against these dataclasses, so a misspelled
key or a value of the wrong type fails while the config is composed, before any process
group exists. Semantic checks that need the world size (TP*PP*CP dividing it, batch sizes
dividing evenly, ...) live in :func:`validate` and raise :class:`ConfigError` with the fix.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Optional

TIERS = ("off", "tier1", "tier2", "tier3", "tier4")
RECOVERY_SOURCES = ("none", "disk", "peers")
FALLBACKS = ("none", "disk")
RESUME_MODES = ("auto", "never")
# Where a fault can fire: the phases of a step (``steps.Phase``, in order); ``recovery``
# (while the job recovers from an earlier failure whose committed step is ``step``); and
# the edges of a job: ``startup`` (a rank's set-up in the job's first generation, after the
# world formed; step 1), ``checkpoint`` (while the durable save after ``step`` is being
# written), ``finish`` (the final state hash and summary; step = trainer.max_steps) and
# ``shutdown`` (after the job finished, while the rank exits; step = trainer.max_steps).
STEP_PHASES = ("data", "forward", "backward", "grad_sync", "optimizer", "param_sync",
               "after_step")
EDGE_PHASES = ("startup", "checkpoint", "finish", "shutdown")
FAULT_PHASES = (*STEP_PHASES, "recovery", *EDGE_PHASES)
FAULT_KINDS = ("kill", "exception", "hang", "segfault")


class ConfigError(ValueError):
    """A configuration that cannot run; the message says which key and what to set."""


@dataclass(kw_only=True)
class ModelConfig:
    """Architecture of a decoder-only transformer (GPT or Llama style)."""

    num_layers: int = 4
    hidden_size: int = 256
    ffn_hidden_size: Optional[int] = None
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None
    kv_channels: Optional[int] = None
    vocab_size: int = 4096
    make_vocab_size_divisible_by: int = 128
    max_position_embeddings: int = 4096
    normalization: str = "RMSNorm"
    norm_epsilon: float = 1e-5
    activation: str = "swiglu"
    position_embedding_type: str = "rope"
    rotary_base: int = 10000
    share_embeddings_and_output_weights: bool = False
    add_bias_linear: bool = False
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    init_method_std: float = 0.02
    params_dtype: str = "float32"
    published_num_params: Optional[int] = None


@dataclass(kw_only=True)
class StrategyConfig:
    """Parallel layout and Megatron DDP/optimizer sharding (NeMo's MegatronStrategy names)."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    context_parallel_size: int = 1
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = True
    num_distributed_optimizer_instances: int = 1
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    grad_reduce_in_fp32: bool = True
    backend: str = "auto"


@dataclass(kw_only=True)
class OptimConfig:
    """Adam with warm-up and cosine decay, as in NeMo's pre-training recipes."""

    lr: float = 3.0e-3
    min_lr: float = 3.0e-4
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1.0e-8
    clip_grad: float = 1.0
    warmup_steps: int = 2
    decay_style: str = "cosine"


@dataclass(kw_only=True)
class DataConfig:
    """Batch geometry and the Megatron indexed dataset to read."""

    global_batch_size: int = 8
    micro_batch_size: int = 2
    seq_length: int = 128
    path: Optional[str] = None
    num_samples: int = 1_000_000
    # None: $NCL_DATA_CACHE, else ~/.cache/nemo_checkpointless/data
    cache_dir: Optional[str] = None


@dataclass(kw_only=True)
class TrainerConfig:
    """Loop length, seeding and per-rank CPU threads."""

    max_steps: int = 20
    seed: int = 1234
    log_interval: int = 1
    num_threads: int = 1
    num_nodes: int = 1
    devices: int = 1


@dataclass(kw_only=True)
class DataCacheConfig:
    """Tier 2: one loader per data-parallel coordinate feeding its TP peers via shared memory."""

    enabled: bool = False
    path: str = "/dev/shm"
    prefetch_steps: int = 2
    lookback_steps: int = 2
    # a TP reader waits this long for its loader's batch; None: $NCL_DATA_CACHE_TIMEOUT_S, else 30 s
    read_timeout_s: Optional[float] = None


@dataclass(kw_only=True)
class CheckpointlessConfig:
    """Which parts of checkpointless training are on. The tiers are presets of these parts
    (``conf/checkpointless/<tier>.yaml``), each tier adding to the one before:

    ====== ================= ========== ========= =========
    tier   rootless_startup  data_cache recovery  fallback
    ====== ================= ========== ========= =========
    off    no                no         none      none
    tier1  yes               no         none      none
    tier2  yes               yes        none      none
    tier3  yes               yes        disk      disk
    tier4  yes               yes        peers     none
    ====== ================= ========== ========= =========

    Every part can be set on its own (``checkpointless.fallback=disk`` on tier 4).
    """

    tier: str = "off"  # the preset the parts came from (logs and summaries)
    # form the world and megatron's groups from a sharded store without a root (under
    # ncl-launch the agents serve it whatever this says)
    rootless_startup: bool = False
    # in-process recovery (under ncl-launch): none (a failure ends the job), disk (every
    # rank rolls back to the latest disk checkpoint), peers (lost state from replicas)
    recovery: str = "none"
    # where shards no live peer holds come from: none (the job stops) or disk (the
    # latest durable checkpoint, ``checkpoint.*``, every rank rolling back to it)
    fallback: str = "none"
    # stop forward/backward at the next module when a failure is announced: auto (on gloo,
    # whose CPU compute an abort does not interrupt; off on NCCL, where the abort fails the
    # next collective and kernels are asynchronous), on, off
    interrupt: str = "auto"
    # a warm spare builds its model and DDP while it waits (DP-only layouts, CPU rehearsal)
    spare_prebuild: bool = True
    data_cache: DataCacheConfig = field(default_factory=DataCacheConfig)

    @classmethod
    def preset(cls, tier: str, **parts: Any) -> "CheckpointlessConfig":
        """The parts of ``tier`` (as ``conf/checkpointless/<tier>.yaml`` sets them), with
        ``parts`` overriding single fields (e.g. ``fallback="disk"``)."""
        if tier not in TIERS:
            raise ConfigError(f"checkpointless tier {tier!r}: use one of {', '.join(TIERS)}")
        level = TIERS.index(tier)
        values: dict[str, Any] = dict(
            tier=tier, rootless_startup=level >= 1,
            recovery={3: "disk", 4: "peers"}.get(level, "none"),
            fallback="disk" if level == 3 else "none",
            data_cache=DataCacheConfig(enabled=level >= 2))
        values.update(parts)
        return cls(**values)


@dataclass(kw_only=True)
class CheckpointConfig:
    """Durable checkpoints in megatron-core's ``dist_checkpointing`` format (torch_dist),
    written under any tier; tier 3 and ``fallback=disk`` roll back to them in process.

    ``interval``: steps between saves; None: 100 under ncl-launch, off under torchrun;
    0: off. ``interval_minutes``: also save when this much time has passed since the last
    save. ``dir``: None: ``<hydra run dir>/checkpoints``. ``resume``: ``auto`` loads the
    newest complete, verified checkpoint when a job starts; ``never`` starts at step 0.
    ``keep``: complete checkpoints kept. ``verify``: check every file's SHA-256 before
    loading (otherwise only the manifest). ``finalize_timeout_s``: how long rank 0 waits
    for every rank's files before leaving a checkpoint incomplete.
    """

    interval: Optional[int] = None
    interval_minutes: Optional[float] = None
    dir: Optional[str] = None
    resume: str = "auto"
    keep: int = 2
    verify: bool = True
    finalize_timeout_s: float = 600.0


def validate_checkpoint(cfg: CheckpointConfig) -> None:
    """Raise ConfigError naming the ``checkpoint.*`` key and the fix."""
    if cfg.interval is not None and cfg.interval < 0:
        raise ConfigError(f"checkpoint.interval={cfg.interval}: a number of steps (0 turns "
                          "durable checkpoints off; leave unset for the default)")
    if cfg.interval_minutes is not None and cfg.interval_minutes <= 0:
        raise ConfigError(f"checkpoint.interval_minutes={cfg.interval_minutes}: a positive "
                          "number of minutes, or null")
    if cfg.resume not in RESUME_MODES:
        raise ConfigError(f"checkpoint.resume={cfg.resume!r}: use one of "
                          f"{', '.join(RESUME_MODES)}")
    if cfg.keep < 1:
        raise ConfigError(f"checkpoint.keep={cfg.keep}: keep at least 1 checkpoint (2 or "
                          "more lets a damaged newest one fall back to the previous)")
    if cfg.finalize_timeout_s <= 0:
        raise ConfigError(f"checkpoint.finalize_timeout_s={cfg.finalize_timeout_s}: positive")


@dataclass(kw_only=True)
class RestartConfig:
    """Stock checkpoint-restart, the baseline (``nemo_checkpointless/lab/restart.py``).

    With ``checkpointless=off`` and ``enabled``, every rank saves its state every
    ``checkpoint_interval`` steps, and a rank (re)started by ``torchrun --max-restarts N``
    resumes from the latest complete checkpoint (``resume: auto``), skips the data loader
    forward by reading the consumed batches and replays the steps since the checkpoint.
    """

    enabled: bool = False
    checkpoint_interval: int = 10
    checkpoint_dir: Optional[str] = None  # None: <run dir>/restart_checkpoints
    checkpoint_keep: int = 2
    resume: str = "auto"  # auto: latest complete checkpoint if any; never: start at step 0


@dataclass(kw_only=True)
class FaultSpec:
    """One planned fault: ``kind`` fires on ``rank`` at ``phase`` of ``step``, once a job.

    Kinds: ``kill`` (SIGKILL), ``exception`` (an uncaught error), ``hang`` (SIGSTOP),
    ``segfault`` (a real SIGSEGV); phases: :data:`FAULT_PHASES`."""

    rank: Optional[int] = None
    step: Optional[int] = None
    phase: Optional[str] = None
    kind: Optional[str] = None


@dataclass(kw_only=True)
class FaultConfig:
    """Faults to inject: ``[{rank: 3, step: 7, phase: optimizer, kind: kill}]``."""

    plan: list[FaultSpec] = field(default_factory=list)


@dataclass(kw_only=True)
class RunConfig:
    """A whole run: what ``recipes/pretrain.py`` receives after Hydra composition."""

    name: str = "tiny_gpt"
    model: ModelConfig = field(default_factory=ModelConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpointless: CheckpointlessConfig = field(default_factory=CheckpointlessConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    restart: RestartConfig = field(default_factory=RestartConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)


CONFIG_GROUPS = ("recipe", "checkpointless")


def register_configs() -> None:
    """Register the structured schema with Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    cs.store(group="checkpointless", name="schema", node=CheckpointlessConfig)


def _known_keys(cls: type, prefix: str = "") -> dict[str, Any]:
    keys: dict[str, Any] = {}
    for f in fields(cls):
        name = f"{prefix}{f.name}"
        default = f.default_factory() if callable(f.default_factory) else None  # type: ignore[misc]
        if default is not None and is_dataclass(default):
            keys[name] = type(default)
            keys.update(_known_keys(type(default), name + "."))
        else:
            keys[name] = f.type
    return keys


def check_overrides(overrides: list[str]) -> None:
    """Reject command-line overrides that name no known key, with the closest match.

    Hydra itself rejects unknown keys, but its message suggests appending the key with
    ``+``, which is never the fix here. This check runs first and names the right key.
    """
    known = _known_keys(RunConfig)
    for item in overrides:
        if "=" not in item:
            continue
        key = item.split("=", 1)[0].lstrip("~+")
        if key.startswith("hydra.") or key in CONFIG_GROUPS or key.startswith("hydra/"):
            continue
        if key in known:
            continue
        close = difflib.get_close_matches(key, list(known), n=3, cutoff=0.6)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        section = key.split(".")[0]
        if section in known and "." in key:
            valid = sorted(k.split(".", 1)[1] for k in known if k.startswith(section + "."))
            hint += f" Valid keys under '{section}': {', '.join(valid)}."
        raise ConfigError(f"unknown override '{key}'.{hint}")


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def check_layout(*, world_size: int, tp: int, pp: int, cp: int = 1, vp: Optional[int] = None,
                 instances: int = 1, distributed_optimizer: bool = True,
                 num_layers: Optional[int] = None, heads: Optional[int] = None,
                 query_groups: Optional[int] = None, ffn: Optional[int] = None,
                 ranks_per_node: Optional[int] = None, error: type = None) -> None:  # type: ignore[assignment]
    """The one parallel-layout check (recipes, the planner, the NeMo and Bridge adapters):
    raise ``error`` (ConfigError) naming the fix if megatron-core would refuse the layout."""
    error = error or ConfigError

    def need(cond: bool, message: str) -> None:
        if not cond:
            raise error(message)

    for key, value in (("strategy.tensor_model_parallel_size", tp),
                       ("strategy.pipeline_model_parallel_size", pp),
                       ("strategy.context_parallel_size", cp),
                       ("strategy.num_distributed_optimizer_instances", instances),
                       ("world size", world_size)):
        need(value >= 1, f"{key}={value}: must be a positive integer.")
    w, r = world_size, ranks_per_node
    where = f"the world size {w}"
    if r is not None:
        need(r >= 1 and w % r == 0,
             f"world size {w} is not a whole number of nodes of {r} ranks; set "
             f"trainer.num_nodes * trainer.devices = world size, or pass a world size that "
             f"is a multiple of {r}.")
        where += f" ({w // r} nodes x {r} ranks)"
    mp = tp * pp * cp
    hint = ""
    if r is not None and w % mp:
        hint = f" (trainer.num_nodes a multiple of {mp // math.gcd(mp, r)})"
    need(w % mp == 0,
         f"strategy.tensor_model_parallel_size * pipeline_model_parallel_size * "
         f"context_parallel_size = {tp}*{pp}*{cp} = {mp} does not divide {where}; choose "
         f"sizes whose product divides {w} (or launch a multiple of {mp} ranks{hint}).")
    need(instances == 1 or distributed_optimizer,
         f"strategy.num_distributed_optimizer_instances={instances} needs "
         "strategy.use_distributed_optimizer=true.")
    dp = w // mp
    dp_cp = dp * cp
    divisors = [d for d in range(1, dp_cp + 1) if dp_cp % d == 0]
    need(dp_cp % instances == 0,
         f"strategy.num_distributed_optimizer_instances={instances} must divide data-parallel "
         f"x context-parallel size {dp}*{cp} = {dp_cp} (world {w} / TP*PP {tp * pp}); set it to "
         f"a divisor of {dp_cp} (use one of {divisors}), or change the world size.")
    need(vp is None or pp > 1, "strategy.virtual_pipeline_model_parallel_size needs "
         "strategy.pipeline_model_parallel_size > 1; set it to null.")
    if num_layers is not None:
        need(num_layers % (pp * (vp or 1)) == 0,
             f"model.num_layers={num_layers} is not divisible by "
             f"strategy.pipeline_model_parallel_size * virtual_pipeline_model_parallel_size "
             f"= {pp}*{vp or 1}.")
    sizes = {"model.num_attention_heads": heads, "model.num_query_groups": query_groups,
             "the FFN size": ffn}
    bad = {k: v for k, v in sizes.items() if v is not None and v % tp}
    need(not bad, f"strategy.tensor_model_parallel_size={tp} must divide "
         + ", ".join(f"{k}={v}" for k, v in sizes.items() if v is not None)
         + "; pick a TP size that divides them.")


def _field(item: Any, key: str) -> Any:
    """A fault plan entry's field, whether the entry is a FaultSpec or a mapping."""
    return item.get(key) if hasattr(item, "get") else getattr(item, key, None)


def validate_fault_plan(plan: Any, world_size: int, max_steps: int) -> None:
    """Raise ConfigError saying what is wrong with a fault plan for this job."""
    for i, item in enumerate(plan or []):
        def get(key: str, _item: Any = item) -> Any:
            return _field(_item, key)

        if not (hasattr(item, "get") or isinstance(item, FaultSpec)):
            raise ConfigError(f"fault.plan[{i}]={item!r}: expected a mapping like "
                              "{rank: 3, step: 7, phase: optimizer, kind: kill}")
        missing = [k for k in ("rank", "step", "phase", "kind") if get(k) is None]
        if missing:
            raise ConfigError(f"fault.plan[{i}] lacks {', '.join(missing)}")
        rank, step, phase, kind = int(get("rank")), int(get("step")), str(get("phase")), \
            str(get("kind"))
        if not 0 <= rank < world_size:
            raise ConfigError(f"fault.plan[{i}]: rank {rank} does not exist "
                              f"(world size {world_size}: ranks 0..{world_size - 1})")
        if not 1 <= step <= max_steps:
            raise ConfigError(f"fault.plan[{i}]: step {step} is outside 1..{max_steps} "
                              "(trainer.max_steps)")
        if phase not in FAULT_PHASES:
            raise ConfigError(f"fault.plan[{i}]: phase {phase!r} does not exist; "
                              f"use one of {', '.join(FAULT_PHASES)}")
        if kind not in FAULT_KINDS:
            raise ConfigError(f"fault.plan[{i}]: kind {kind!r} does not exist; "
                              f"use one of {', '.join(FAULT_KINDS)}")


def validate(cfg: RunConfig, world_size: int, *, cpu_mode: bool = False) -> None:
    """Check that ``cfg`` can run on ``world_size`` ranks; raise ConfigError naming the fix.

    ``cpu_mode`` adds the limits of CPU rehearsal (no Transformer Engine attention).
    """
    s, d, m, t = cfg.strategy, cfg.data, cfg.model, cfg.trainer
    for key, value in (
        ("data.global_batch_size", d.global_batch_size),
        ("data.micro_batch_size", d.micro_batch_size),
        ("data.seq_length", d.seq_length),
        ("trainer.max_steps", t.max_steps),
        ("data.num_samples", d.num_samples),
    ):
        _require(value >= 1, f"{key}={value}: must be a positive integer.")
    check_layout(world_size=world_size, tp=s.tensor_model_parallel_size,
                 pp=s.pipeline_model_parallel_size, cp=s.context_parallel_size,
                 vp=s.virtual_pipeline_model_parallel_size,
                 instances=s.num_distributed_optimizer_instances,
                 distributed_optimizer=s.use_distributed_optimizer,
                 num_layers=m.num_layers, heads=m.num_attention_heads,
                 query_groups=m.num_query_groups or m.num_attention_heads)
    mp = s.tensor_model_parallel_size * s.pipeline_model_parallel_size * s.context_parallel_size
    dp = world_size // mp
    _require(
        d.global_batch_size % (d.micro_batch_size * dp) == 0,
        f"data.global_batch_size={d.global_batch_size} is not divisible by "
        f"data.micro_batch_size * data-parallel size = {d.micro_batch_size}*{dp}; "
        f"set data.global_batch_size to a multiple of {d.micro_batch_size * dp}.",
    )
    _require(
        t.max_steps * d.global_batch_size <= d.num_samples,
        f"trainer.max_steps * data.global_batch_size = {t.max_steps * d.global_batch_size} "
        f"exceeds data.num_samples={d.num_samples}; raise data.num_samples.",
    )
    _require(
        d.seq_length <= m.max_position_embeddings,
        f"data.seq_length={d.seq_length} exceeds model.max_position_embeddings="
        f"{m.max_position_embeddings}.",
    )
    _require(
        d.seq_length % (2 * s.context_parallel_size) == 0 or s.context_parallel_size == 1,
        f"data.seq_length={d.seq_length} must be divisible by 2*context_parallel_size="
        f"{2 * s.context_parallel_size}.",
    )
    _require(
        not cpu_mode or s.context_parallel_size == 1,
        f"strategy.context_parallel_size={s.context_parallel_size} needs Transformer Engine's "
        "attention on GPUs; in CPU rehearsal mode set strategy.context_parallel_size=1.",
    )
    _require(m.params_dtype in ("float32", "bfloat16"), f"model.params_dtype={m.params_dtype!r}: "
             "use 'float32' or 'bfloat16'.")
    _require(m.activation in ("swiglu", "gelu"),
             f"model.activation={m.activation!r}: use 'swiglu' or 'gelu'.")
    _require(m.normalization in ("RMSNorm", "LayerNorm"),
             f"model.normalization={m.normalization!r}: use 'RMSNorm' or 'LayerNorm'.")
    _require(s.backend in ("auto", "gloo", "nccl"),
             f"strategy.backend={s.backend!r}: use 'auto', 'gloo' or 'nccl'.")
    ck = cfg.checkpointless
    _require(ck.tier in TIERS,
             f"checkpointless.tier={ck.tier!r}: use one of {', '.join(TIERS)} "
             "(select with checkpointless=<tier>).")
    _require(ck.interrupt in ("auto", "on", "off"),
             f"checkpointless.interrupt={ck.interrupt!r}: use auto, on or off.")
    _require(ck.recovery in RECOVERY_SOURCES,
             f"checkpointless.recovery={ck.recovery!r}: use one of "
             f"{', '.join(RECOVERY_SOURCES)}.")
    validate_fault_plan(cfg.fault.plan, world_size, t.max_steps)
    _validate_restart(cfg)
    restart_faults = cfg.restart.enabled and all(
        str(_field(f, "kind")) == "kill" and str(_field(f, "phase")) != "recovery"
        for f in cfg.fault.plan)
    _require(not cfg.fault.plan or ck.recovery != "none" or restart_faults,
             "fault.plan injects failures that only checkpointless=tier3 or tier4 recovers "
             "from; select one (and launch with ncl-launch), or, for the checkpoint-restart "
             "baseline, use kind: kill faults (no phase: recovery) with checkpointless=off "
             "restart.enabled=true under torchrun --max-restarts N.")
    _require(ck.fallback in FALLBACKS,
             f"checkpointless.fallback={ck.fallback!r}: use 'none' or 'disk'.")
    validate_checkpoint(cfg.checkpoint)
    c = cfg.checkpoint
    _require(not (ck.recovery == "disk" or ck.fallback == "disk")
             or c.interval != 0 or c.interval_minutes is not None,
             f"checkpointless.recovery={ck.recovery} fallback={ck.fallback} rolls back to the "
             "latest durable checkpoint, but checkpoint.interval=0 turns them off: set "
             "checkpoint.interval (steps) or checkpoint.interval_minutes.")


def _validate_restart(cfg: RunConfig) -> None:
    r = cfg.restart
    if not r.enabled:
        return
    _require(cfg.checkpointless.recovery == "none",
             f"restart.enabled=true is the stock checkpoint-restart baseline; it needs "
             f"checkpointless=off (now checkpointless={cfg.checkpointless.tier}, which "
             "recovers in process: drop restart.enabled).")
    _require(r.checkpoint_interval >= 1,
             f"restart.checkpoint_interval={r.checkpoint_interval}: must be a positive "
             "number of steps.")
    _require(r.checkpoint_keep >= 1,
             f"restart.checkpoint_keep={r.checkpoint_keep}: keep at least 1 checkpoint.")
    _require(r.resume in RESUME_MODES,
             f"restart.resume={r.resume!r}: use one of {', '.join(RESUME_MODES)}.")


def data_cache_dir(data: DataConfig) -> str:
    """Where the indexed dataset and its sample indices are cached."""
    import os

    path = data.cache_dir or os.environ.get("NCL_DATA_CACHE") or "~/.cache/nemo_checkpointless/data"
    return os.path.expanduser(path)


def padded_vocab_size(model: ModelConfig, tensor_parallel: int) -> int:
    """Megatron's vocabulary padding: a multiple of make_vocab_size_divisible_by * TP."""
    multiple = model.make_vocab_size_divisible_by * tensor_parallel
    return int(math.ceil(model.vocab_size / multiple) * multiple)


def to_run_config(node: Any) -> RunConfig:
    """Turn a composed DictConfig (or plain dict) into a typed RunConfig."""
    from omegaconf import OmegaConf

    if not isinstance(node, RunConfig):
        schema = OmegaConf.structured(RunConfig)
        merged = OmegaConf.merge(schema, node)
        node = OmegaConf.to_object(merged)
    assert isinstance(node, RunConfig)
    return node


def conf_dir() -> str:
    """The Hydra config directory (``conf/`` beside the package, or ``$NCL_CONF_DIR``)."""
    import os
    from pathlib import Path

    return os.environ.get("NCL_CONF_DIR") or str(Path(__file__).resolve().parents[1] / "conf")


def compose(overrides: list[str] | None = None) -> RunConfig:
    """Compose ``conf/config.yaml`` with ``overrides`` outside of a Hydra app (tools, tests)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    overrides = list(overrides or [])
    check_overrides(overrides)
    register_configs()
    if not OmegaConf.has_resolver("ncl_hydra_subdir"):
        OmegaConf.register_new_resolver("ncl_hydra_subdir", lambda: None)
    with initialize_config_dir(config_dir=conf_dir(), version_base=None):
        node = hydra_compose(config_name="config", overrides=overrides)
    return to_run_config(node)
