"""Every number the scale model uses: a name, a default, a unit and where it comes from.

``measured here`` means measured in this repository on the 2-core CPU machine (gloo), with
the command or document that holds the number; ``assumed`` means a stated assumption for
an H100 cluster (8 GPUs and 8 x 400 Gb/s NICs per node, a shared parallel file system),
with the public source that motivates it where there is one. Every value can be replaced
on the command line: ``--assume link_gbps=200,ckpt_interval_min=60``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from ..comm.world import GROUP_REBUILD_DEFAULT


@dataclass(frozen=True)
class Assumption:
    name: str
    default: Any
    unit: str
    source: str


ASSUMPTIONS: tuple[Assumption, ...] = (
    # ---------------------------------------------------------------- the job
    Assumption("recipe", "llama3_70b_2opt", "", "conf/recipe: Llama-3 70B, NeMo 2's layout "
               "TP4 PP4 VP5 CP2, seq 8192, GBS 512, 2 optimizer instances"),
    Assumption("gpus_per_node", 8, "GPUs", "assumed: p5 / DGX H100 node"),
    Assumption("gpu_memory_gb", 80.0, "GB", "assumed: H100 SXM; decides whether a second "
               "optimizer instance fits (params 2 B + fp32 grads 4 B + Adam per rank)"),
    Assumption("peak_tflops", 989.0, "TFLOP/s", "assumed: H100 dense bf16 peak"),
    Assumption("mfu", 0.40, "", "assumed: model FLOPs utilisation of a tuned 70B run; "
               "only sets the step time (lost work)"),
    Assumption("failure", "exit", "exit|hang", "exit: the rank's process dies (what the "
               "published runs inject); hang: it stops making progress"),
    # ---------------------------------------------------------------- network and store
    Assumption("link_gbps", 400.0, "Gb/s", "assumed: one 400 Gb/s IB/EFA NIC per GPU"),
    Assumption("transfer_efficiency", 0.5, "", "measured here: peer transfer / raw gloo send "
               "= 0.37 inside the job, 0.54 between two idle processes (README, "
               "scripts/bench/transfer.py); NCCL over IB usually does better"),
    Assumption("store_rtt_ms", 0.26, "ms", "measured here: one add() round trip to our "
               "StoreServer over loopback on the loaded 2-core machine"),
    Assumption("store_op_ms", 0.1, "ms", "assumed: server-side time of one store operation "
               "(below the measured round trip, which includes the Python client)"),
    Assumption("bootstrap_hop_us", 20.0, "us", "assumed: one step of NCCL's ring bootstrap "
               "allgather over TCP (N-1 steps per allgather; NVIDIA/nccl#1791)"),
    Assumption("comm_init_s", 0.2, "s", "assumed: ncclCommInitRank of one communicator "
               "besides its bootstrap (topology, buffers; connections are lazy)"),
    Assumption("comm_split_init_s", 0.05, "s", "assumed: the member's side of one "
               "ncclCommSplit besides the parent allgather (topology reused)"),
    Assumption("abort_s", 0.03, "s", "measured here: abort phase, median of 3 recoveries "
               "(docs/architecture.md)"),
    Assumption("abort_per_group_s", 0.01, "s", "assumed: ncclCommAbort of one communicator"),
    # ---------------------------------------------------------------- checkpointless
    Assumption("detect_exit_s", 0.07, "s", "measured here: kill -> generation bumped, agent "
               "waitpid polling every 10 ms (README, recovery_time.py)"),
    Assumption("hang_timeout_s", 60.0, "s", "ncl-launch's steady hang timeout floor on GPU "
               "hosts (timeouts.hang_s; 5x the slowest recent step when that is longer): a "
               "rank without progress for this long is aborted, then killed"),
    Assumption("group_rebuild", GROUP_REBUILD_DEFAULT, "members|split", "the code's "
               f"default is {GROUP_REBUILD_DEFAULT} (comm/world.py GROUP_REBUILD_DEFAULT). "
               "members: each megatron group's NCCL communicator initialised by its "
               "members only (world device unbound, docs/gpu.md); split: device bound, "
               "every group a world-wide ncclCommSplit (init_world(group_rebuild='split'))"),
    Assumption("skeleton_gbps", 80.0, "Gb/s", "assumed: a warm spare allocates and "
               "initialises its model and optimizer skeleton at 10 GB/s on the GPU"),
    Assumption("first_step_extra_s", 2.0, "s", "assumed: lazy NCCL connections of the rebuilt "
               "groups and allocator warm-up in the first step (here: 0.14 s on CPU)"),
    Assumption("warm_spare", 1, "0|1", "a warm spare (imports done) replaces the rank; 0: "
               "a fresh process (adds import_s)"),
    # ---------------------------------------------------------------- checkpoint-restart
    Assumption("job_teardown_s", 30.0, "s", "assumed: the scheduler sees the failure and "
               "kills every rank (torchrun / Slurm; ranks blocked in NCCL until killed)"),
    Assumption("requeue_s", 60.0, "s", "assumed: Slurm requeue or pod reschedule onto a "
               "spare node, container start"),
    Assumption("import_s", 20.0, "s", "assumed: interpreter, torch, megatron, NeMo imports "
               "and CUDA context per process on a GPU node (here, CPU, unloaded: ~4 s)"),
    Assumption("import_files", 20000, "files", "assumed: files a NeMo process stats/opens "
               "while importing from the shared file system"),
    Assumption("fs_metadata_ops", 200000.0, "ops/s", "assumed: metadata operations per "
               "second the shared file system serves to all clients together"),
    Assumption("stock_store_ops_per_rank", 24, "ops", "assumed: TCPStore operations per "
               "rank at start-up (world barrier, one unique id per NCCL group), all on "
               "rank 0's single server"),
    Assumption("storage_node_gbps", 16.0, "Gb/s", "assumed: 2 GB/s checkpoint read per node "
               "(client limit of a shared file system)"),
    Assumption("storage_total_gbps", 800.0, "Gb/s", "assumed: 100 GB/s aggregate read of the "
               "shared file system"),
    Assumption("dataloader_s", 30.0, "s", "assumed: dataset index load and skip to "
               "consumed_samples at start (here, tiny_gpt at step 10,000: 2.3 s, "
               "docs/benchmarks.md)"),
    Assumption("ckpt_interval_min", 30.0, "min", "assumed: a checkpoint every 30 minutes; "
               "a failure loses half an interval on average"),
)

BY_NAME: dict[str, Assumption] = {a.name: a for a in ASSUMPTIONS}


class AssumptionError(ValueError):
    """A bad ``--assume`` entry; the message names the valid ones."""


def _convert(a: Assumption, text: str) -> Any:
    if isinstance(a.default, str):
        allowed = a.unit.split("|") if "|" in a.unit else None
        if allowed and text not in allowed:
            raise AssumptionError(f"{a.name}={text!r}: choose one of {', '.join(allowed)}")
        return text
    try:
        value = type(a.default)(float(text)) if isinstance(a.default, int) else float(text)
    except ValueError:
        raise AssumptionError(f"{a.name}={text!r}: expected a number ({a.unit})") from None
    if value < 0:
        raise AssumptionError(f"{a.name}={text!r}: must not be negative")
    return value


def resolve(overrides: Mapping[str, str] | Iterable[str] = ()) -> dict[str, Any]:
    """Defaults with ``overrides`` applied: ``{"link_gbps": "200"}`` or ``["link_gbps=200"]``.

    Raises :class:`AssumptionError` naming the valid names for an unknown one.
    """
    if not isinstance(overrides, Mapping):
        pairs = {}
        for item in overrides:
            for part in filter(None, (p.strip() for p in item.split(","))):
                if "=" not in part:
                    raise AssumptionError(f"--assume {part!r}: write name=value")
                key, _, value = part.partition("=")
                pairs[key.strip()] = value.strip()
        overrides = pairs
    values = {a.name: a.default for a in ASSUMPTIONS}
    for key, text in overrides.items():
        if key not in BY_NAME:
            import difflib

            close = difflib.get_close_matches(key, BY_NAME, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise AssumptionError(f"unknown assumption {key!r}.{hint} Valid names: "
                                  f"{', '.join(BY_NAME)}")
        values[key] = _convert(BY_NAME[key], str(text))
    return values
