"""The scale model: recovery time of one lost rank, checkpointless vs checkpoint-restart.

Each recovery is a sum of phases on the critical path; each phase is a formula in the job's
size and layout (from the layout planner) and the named assumptions of
:mod:`.assumptions`. Nothing here runs a process: a prediction for 2,304 GPUs takes
milliseconds.

Checkpointless (this package, ``checkpointless=tier4``; ``fallback=disk`` where a shard has
no replica):  detect -> abort -> [replacement start] -> rendezvous -> group rebuild ->
replacement skeleton -> state transfer -> parameter re-gather -> first step.

Checkpoint-restart (stock): detect + teardown -> requeue -> process start + imports ->
NCCL init -> checkpoint load -> data loader -> first step. Work lost since the last
checkpoint is reported next to it, not inside it (the published figures are downtime).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from ..plan.layout import Layout
from ..plan.memory import estimate

# published recovery times for Llama-3 70B (issue #7): size -> (checkpointless, restart),
# seconds as (low, high)
PUBLISHED: dict[int, tuple[tuple[float, float], tuple[float, float], str, str]] = {
    16: ((50, 50), (310, 310), "50 s", "5m10s"),
    256: ((47, 47), (292, 292), "47 s", "4m52s"),
    2304: ((0, 120), (900, 1800), "< 2 min", "15-30 min"),
}
SIZES = tuple(PUBLISHED)

# the assumptions each phase's formula reads (what drives a gap)
DRIVERS: dict[str, tuple[str, ...]] = {
    "detect": ("failure", "detect_exit_s", "hang_timeout_s"),
    "abort": ("abort_s", "abort_per_group_s"),
    "replacement_start": ("warm_spare", "import_s"),
    "rendezvous": ("store_rtt_ms", "store_op_ms", "bootstrap_hop_us", "comm_init_s"),
    "group_rebuild": ("group_rebuild", "bootstrap_hop_us", "comm_split_init_s",
                      "comm_init_s"),
    "skeleton": ("skeleton_gbps",),
    "state_transfer": ("link_gbps", "transfer_efficiency"),
    "checkpoint_load": ("storage_node_gbps", "storage_total_gbps"),
    "param_regather": ("link_gbps", "transfer_efficiency"),
    "first_step": ("first_step_extra_s",),
    "detect_teardown": ("failure", "detect_exit_s", "hang_timeout_s", "job_teardown_s"),
    "requeue": ("requeue_s",),
    "process_start": ("import_s", "import_files", "fs_metadata_ops"),
    "nccl_init": ("stock_store_ops_per_rank", "store_op_ms", "bootstrap_hop_us",
                  "comm_init_s"),
    "dataloader": ("dataloader_s",),
}


@dataclass(frozen=True)
class Job:
    """What one size of the job looks like: layout and the bytes that matter."""

    gpus: int
    layout: Layout
    params_per_rank: int          # largest pipeline stage, per rank
    optimizer_bytes_per_rank: int  # this rank's optimizer shard (fp32 main + Adam)
    total_params: int
    layout_note: str
    optimizer_bytes_per_param: int = 12
    group_sizes: dict[str, int] = field(default_factory=dict)  # NCCL group kind -> size

    @property
    def protected(self) -> bool:
        """Every optimizer shard has a peer replica (k >= 2, or the plain optimizer)."""
        lay = self.layout
        return (not lay.distributed_optimizer and lay.dp_cp > 1) or lay.instances >= 2

    @property
    def nodes(self) -> int:
        return self.layout.num_nodes

    @property
    def param_bytes_per_rank(self) -> int:
        return 2 * self.params_per_rank  # bf16

    @property
    def groups_total(self) -> int:
        """NCCL groups megatron creates (every ``create_group`` call, all kinds)."""
        return sum(self.gpus // size for size in self.group_sizes.values())


def nccl_group_sizes(lay: Layout) -> dict[str, int]:
    """Group kinds (and their sizes) that megatron-core 0.16's ``initialize_model_parallel``
    creates with NCCL for a dense model (EP=1), counted from its ``create_group`` loops."""
    tp, pp, cp, dp, k = lay.tp, lay.pp, lay.cp, lay.dp, lay.instances
    sizes = {"dp_cp": dp * cp, "dp": dp, "cp": cp, "tp_pp": tp * pp, "tp": tp, "pp": pp,
             "embedding": pp, "position_embedding": pp, "tp_dp_cp": tp * dp * cp,
             "tp_dp": tp * dp, "tp_cp": tp * cp, "ep": 1, "expert_tp": tp, "tp_ep": tp,
             "tp_ep_pp": tp * pp, "expert_dp": dp * cp}
    if k > 1:
        sizes.update(intra_instance=dp * cp // k, inter_instance=k,
                     expert_intra_instance=dp * cp // k, expert_inter_instance=k,
                     intra_optimizer_instance=tp * pp * dp * cp // k)
    return sizes


def _fits(params: int, opt_bytes: int, a: dict[str, Any]) -> bool:
    return params * 6 + opt_bytes <= a["gpu_memory_gb"] * 1e9  # bf16 params, fp32 grads


def build_job(cfg: Any, gpus: int, a: dict[str, Any]) -> Job:
    """The recipe's layout at ``gpus`` GPUs, shrunk where it cannot run, with the reason."""
    s = cfg.strategy
    tp, pp, cp, vp = (s.tensor_model_parallel_size, s.pipeline_model_parallel_size,
                      s.context_parallel_size, s.virtual_pipeline_model_parallel_size)
    k = s.num_distributed_optimizer_instances
    notes = []
    if gpus % (tp * pp * cp) or gpus // (tp * pp * cp) * cp < 2:
        if cp > 1:
            notes.append(f"CP {cp}->1 (TP*PP*CP={tp * pp * cp} leaves no data parallelism)")
        cp = 1
    if gpus % (tp * pp):
        raise ValueError(f"{gpus} GPUs is not a multiple of TP*PP={tp * pp}")
    seq = cfg.data.seq_length

    dp_cp = gpus // (tp * pp)
    if k > 1 and (dp_cp % k or dp_cp < k):
        notes.append(f"k {k}->1: DP*CP={dp_cp}, one model replica; no optimizer shard has a "
                     f"peer replica (all {gpus} ranks), so a lost rank comes back from the "
                     "disk checkpoint (checkpointless.fallback=disk)")
        k = 1
    lay = Layout(world_size=gpus, ranks_per_node=int(a["gpus_per_node"]), tp=tp, pp=pp,
                 cp=cp, vp=vp, instances=k, distributed_optimizer=s.use_distributed_optimizer)
    lay.check(cfg.model.num_layers)
    mem = estimate(cfg.model, lay, seq)
    stage = max(range(lay.pp), key=mem.state_bytes)
    params = mem.stage_params[stage]
    if not _fits(params, mem.state_bytes(stage), a):
        gb = (params * 6 + mem.state_bytes(stage)) / 1e9
        notes.append(f"model state {gb:.0f} GB per rank (bf16 params, fp32 grads, Adam) "
                     f"exceeds {a['gpu_memory_gb']:.0f} GB before activations")
        if k > 1:
            notes.append("and a second optimizer instance does not fit")
    from ..plan.memory import total_parameters

    return Job(gpus=gpus, layout=lay, params_per_rank=params,
               optimizer_bytes_per_rank=mem.state_bytes(stage),
               total_params=total_parameters(cfg.model, seq),
               layout_note="; ".join(notes), optimizer_bytes_per_param=mem.bytes_per_param,
               group_sizes=nccl_group_sizes(lay))


def _gbytes_per_s(gbps: float) -> float:
    return gbps / 8 * 1e9


def step_seconds(cfg: Any, job: Job, a: dict[str, Any]) -> float:
    """One training step: 6 * params * tokens / (GPUs * peak * MFU)."""
    tokens = cfg.data.global_batch_size * cfg.data.seq_length
    return 6 * job.total_params * tokens / (job.gpus * a["peak_tflops"] * 1e12 * a["mfu"])


def _detect(a: dict[str, Any]) -> float:
    return a["detect_exit_s"] + (a["hang_timeout_s"] if a["failure"] == "hang" else 0.0)


def _bootstrap(n: int, a: dict[str, Any]) -> float:
    """One ring allgather of NCCL's TCP bootstrap over ``n`` ranks."""
    return max(n - 1, 0) * a["bootstrap_hop_us"] * 1e-6


def _disk_read(nbytes_per_node: float, total_bytes: float, job: Job, a: dict[str, Any]) -> float:
    per_node = nbytes_per_node / _gbytes_per_s(a["storage_node_gbps"])
    aggregate = total_bytes / _gbytes_per_s(a["storage_total_gbps"])
    return max(per_node, aggregate)


def checkpointless_phases(job: Job, a: dict[str, Any]) -> dict[str, float]:
    """Seconds per phase of one in-process recovery (critical path)."""
    n = job.gpus
    op, rtt = a["store_op_ms"] * 1e-3, a["store_rtt_ms"] * 1e-3
    kinds = len(job.group_sizes)
    link = _gbytes_per_s(a["link_gbps"]) * a["transfer_efficiency"]
    p: dict[str, float] = {"detect": _detect(a)}
    p["abort"] = a["abort_s"] + kinds * a["abort_per_group_s"]
    if not a["warm_spare"]:
        p["replacement_start"] = max(0.0, a["import_s"] - p["abort"])
    # every rank: add() on rdzv/<G>/arrived and a wait on rdzv/<G>/complete (2 round trips);
    # both keys live on one server, which serialises N adds and N wake-ups; then the world
    # communicator: N reads of its unique id (one key) and one bootstrap allgather
    p["rendezvous"] = (2 * rtt + 2 * n * op + n * op + _bootstrap(n, a) + a["comm_init_s"])
    if a["group_rebuild"] == "split":
        # every create_group is an ncclCommSplit of the world: all N ranks join its
        # allgather (non-members with NOCOLOR); a rank is a member of one group per kind
        p["group_rebuild"] = (job.groups_total * _bootstrap(n, a)
                              + kinds * a["comm_split_init_s"])
    else:
        p["group_rebuild"] = sum(_bootstrap(size, a) + a["comm_init_s"]
                                 for size in job.group_sizes.values()) + kinds * 2 * rtt
    model_bytes = job.params_per_rank * 6 + job.optimizer_bytes_per_rank
    p["skeleton"] = model_bytes / _gbytes_per_s(a["skeleton_gbps"])
    if job.protected:
        p["state_transfer"] = job.optimizer_bytes_per_rank / link
        ways = job.layout.instance_size
        p["param_regather"] = job.param_bytes_per_rank * (ways - 1) / ways / link
    else:  # every rank rolls back to its part of the latest disk checkpoint
        per_rank = job.optimizer_bytes_per_rank
        p["checkpoint_load"] = _disk_read(per_rank * a["gpus_per_node"], per_rank * n, job, a)
        p["param_regather"] = 0.0
    p["first_step"] = a["first_step_extra_s"]
    return p


def restart_phases(job: Job, a: dict[str, Any]) -> dict[str, float]:
    """Seconds per phase of a stock checkpoint-restart of the whole job."""
    n = job.gpus
    op = a["store_op_ms"] * 1e-3
    p: dict[str, float] = {"detect_teardown": _detect(a) + a["job_teardown_s"]}
    p["requeue"] = a["requeue_s"]
    p["process_start"] = a["import_s"] + n * a["import_files"] / a["fs_metadata_ops"]
    # one TCPStore on rank 0 serves every rank's operations; then the world communicator
    # and, lazily at first use, each of the rank's groups (members only, concurrently)
    p["nccl_init"] = (n * a["stock_store_ops_per_rank"] * op + _bootstrap(n, a)
                      + a["comm_init_s"]
                      + sum(_bootstrap(size, a) + a["comm_init_s"]
                            for size in job.group_sizes.values()))
    full = job.total_params * (2 + job.optimizer_bytes_per_param)  # params + optimizer
    p["checkpoint_load"] = _disk_read(full / job.nodes, full, job, a)
    p["dataloader"] = a["dataloader_s"]
    p["first_step"] = a["first_step_extra_s"]
    return p


def floor_seconds(job: Job, a: dict[str, Any]) -> float:
    """Physical floor: the bytes one rank must hold again (its optimizer shard and bf16
    parameters) over one GPU's link at line rate."""
    return ((job.optimizer_bytes_per_rank + job.param_bytes_per_rank)
            / _gbytes_per_s(a["link_gbps"]))


@dataclass(frozen=True)
class Prediction:
    gpus: int
    job: Job
    ours: dict[str, float]
    restart: dict[str, float]
    floor_s: float
    step_s: float
    lost_work_ours_s: float
    lost_work_restart_s: float
    ours_other: dict[str, float] = field(default_factory=dict)  # the other group_rebuild
    other_mode: str = ""

    @property
    def ours_s(self) -> float:
        return sum(self.ours.values())

    @property
    def restart_s(self) -> float:
        return sum(self.restart.values())

    @staticmethod
    def dominant(phases: dict[str, float]) -> str:
        return max(phases, key=phases.__getitem__)

    def to_dict(self) -> dict[str, Any]:
        lay = self.job.layout
        pub = PUBLISHED.get(self.gpus)
        return {
            "gpus": self.gpus, "nodes": self.job.nodes,
            "layout": {"tp": lay.tp, "pp": lay.pp, "vp": lay.vp, "cp": lay.cp, "dp": lay.dp,
                       "instances": lay.instances, "note": self.job.layout_note},
            "protected": self.job.protected,
            "optimizer_bytes_per_rank": self.job.optimizer_bytes_per_rank,
            "param_bytes_per_rank": self.job.param_bytes_per_rank,
            "nccl_groups": self.job.groups_total,
            "ours_s": round(self.ours_s, 3), "restart_s": round(self.restart_s, 3),
            f"ours_s_if_group_rebuild_{self.other_mode}": round(sum(self.ours_other.values()),
                                                                3),
            "floor_s": round(self.floor_s, 4),
            "ours_phases": {k: round(v, 4) for k, v in self.ours.items()},
            "restart_phases": {k: round(v, 4) for k, v in self.restart.items()},
            "dominant_ours": self.dominant(self.ours),
            "dominant_restart": self.dominant(self.restart),
            "step_s": round(self.step_s, 2),
            "lost_work_ours_s": round(self.lost_work_ours_s, 1),
            "lost_work_restart_s": round(self.lost_work_restart_s, 1),
            "published_ours": pub[2] if pub else None,
            "published_restart": pub[3] if pub else None,
        }


def predict(cfg: Any, gpus: int, a: dict[str, Any]) -> Prediction:
    """Both recoveries of one lost rank at ``gpus`` GPUs under assumptions ``a``."""
    job = build_job(cfg, gpus, a)
    step = step_seconds(cfg, job, a)
    interval = a["ckpt_interval_min"] * 60
    ours = checkpointless_phases(job, a)
    lost_ours = step / 2 + (0.0 if job.protected else interval / 2)
    other = "members" if a["group_rebuild"] == "split" else "split"
    return Prediction(gpus=gpus, job=job, ours=ours, restart=restart_phases(job, a),
                      floor_s=floor_seconds(job, a), step_s=step, lost_work_ours_s=lost_ours,
                      lost_work_restart_s=step / 2 + interval / 2,
                      ours_other=checkpointless_phases(job, {**a, "group_rebuild": other}),
                      other_mode=other)


def load_recipe(name: str) -> Any:
    """The typed config of ``conf/recipe/<name>.yaml`` (Hydra compose, no process group)."""
    from ..config import compose

    return compose([f"recipe={name}"])


def predict_all(sizes: Optional[tuple[int, ...]] = None, assumptions: Optional[dict] = None,
                cfg: Any = None) -> list[Prediction]:
    from .assumptions import resolve

    a = assumptions if assumptions is not None else resolve()
    cfg = cfg if cfg is not None else load_recipe(a["recipe"])
    return [predict(cfg, n, a) for n in (sizes or SIZES)]


def fmt_seconds(s: float) -> str:
    if s < 60:
        return f"{s:.1f} s" if s < 10 else f"{s:.0f} s"
    m, sec = divmod(int(round(s)), 60)
    return f"{m}m{sec:02d}s" if m < 60 else f"{m // 60}h{m % 60:02d}m"


def ratio(a_: float, b_: float) -> float:
    return a_ / b_ if b_ else math.inf
