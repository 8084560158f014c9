"""NeMo-Run integration: NeMo-Run's executors start ``ncl-launch`` where they start torchrun.

    import nemo_run as run
    from nemo_checkpointless.nemo import NclLaunch, apply_checkpointless, ncl_executor

    recipe = apply_checkpointless(llm.llama3_8b.pretrain_recipe(num_nodes=2))
    run.run(recipe, executor=ncl_executor(run.LocalExecutor(ntasks_per_node=8), spares=1))
    run.run(recipe, executor=run.SlurmExecutor(..., nodes=2, ntasks_per_node=1,
                                                 launcher=NclLaunch(nproc_per_node=8)))

NeMo-Run turns a ``run.Partial`` into ``python -m nemo_run.core.runners.fdl_runner -n NAME
CONFIG`` (CONFIG: the recipe, serialized). :class:`NclLaunch` is a launcher that rewrites
that command into one ``ncl-launch`` agent per node whose ranks run the same serialized
recipe through :mod:`nemo_checkpointless.nemo.run` (which opens each rank's recovery
session before building the recipe, then runs it as NeMo-Run's runner would). NeMo-Run's
Slurm executor applies such a launcher as it applies its own ``SlurmTemplate`` launchers
(the agent runs once per node: ``ntasks_per_node=1``); :func:`ncl_executor` makes a local
executor that does too (:class:`NclLocalExecutor`).

Nodes: the agents find each other through ``--rdzv-endpoint`` on the first node (NeMo-Run's
sbatch script exports its address as ``head_node_ip``); a lost rank is replaced by a warm
spare of its node. Replacing a lost *node* needs a new agent for that node rank (a
scheduler step, or ``ncl-launch --standby`` nodes), which ``scripts/slurm/pretrain.sbatch``
supervises; NeMo-Run's single ``srun`` step does not.
"""

from __future__ import annotations

import copy
import dataclasses
import shlex
import sys
from dataclasses import dataclass, field
from typing import Optional

from nemo_run.config import Script
from nemo_run.core.execution.launcher import SlurmTemplate
from nemo_run.core.execution.local import LocalExecutor

from ..compat.nemo_run_executors import register_like
from .launch_env import AGENT_ENV

FDL_RUNNER = "nemo_run.core.runners.fdl_runner"
RUNNER_MODULE = "nemo_checkpointless.nemo.scripts.run_recipe"


@dataclass(kw_only=True)
class NclLaunch(SlurmTemplate):
    """A NeMo-Run launcher: ``ncl-launch`` per node instead of torchrun.

    ``nproc_per_node``: ranks per node (default: the node's GPUs, ``$SLURM_GPUS_ON_NODE``);
    ``nnodes``: nodes (default ``$SLURM_NNODES``, else 1); ``spares``: warm spare processes
    per node; ``port``: the job store's port on the first node (0: 29400 across nodes, a
    free one on a single node); ``python``: the interpreter on the nodes; ``agent_args``:
    more ``ncl-launch`` flags (``--hang-timeout 30``).
    """

    nproc_per_node: Optional[int] = None
    nnodes: Optional[int] = None
    spares: int = 1
    port: int = 0
    python: str = "python"
    agent_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=lambda: dict(AGENT_ENV))
    template_inline: Optional[str] = "{{ command }}"

    def transform(self, cmd: list[str]) -> Optional[Script]:
        return Script(inline=self.script(cmd))

    def script(self, cmd: list[str]) -> str:
        """The shell lines one node runs for NeMo-Run's command ``cmd``."""
        try:
            at = cmd.index("-m")
        except ValueError:
            at = -1
        if at < 0 or cmd[at + 1] != FDL_RUNNER:
            raise ValueError(f"NclLaunch runs NeMo-Run's recipe runner ({FDL_RUNNER}); got "
                             f"{' '.join(cmd)[:200]!r}: pass a run.Partial, not a run.Script")
        runner_args = cmd[at + 2:]
        nnodes = str(self.nnodes) if self.nnodes else "${SLURM_NNODES:-1}"
        nproc = str(self.nproc_per_node) if self.nproc_per_node else \
            "${SLURM_GPUS_ON_NODE:-1}"
        agent = [self.python, "-m", "nemo_checkpointless.launch.agent",
                 "--nnodes", nnodes, "--nproc-per-node", nproc, "--spares", str(self.spares)]
        if self.nnodes == 1:
            from ..comm.world import free_port

            agent += ["--master-port", str(self.port or free_port())]
        else:
            agent += ["--rdzv-endpoint", f"${{head_node_ip:-127.0.0.1}}:{self.port or 29400}"]
        exports = [f"export {k}={shlex.quote(v)}" for k, v in sorted(self.env.items())]
        # the runner's file as installed on the node (ncl-launch runs a script by its path)
        where = (f"runner=$({shlex.quote(self.python)} -c 'import {RUNNER_MODULE} as m; "
                 "print(m.__file__)')")
        line = " ".join(_quote(a) for a in [*agent, *self.agent_args])
        args = " ".join(shlex.quote(a) for a in runner_args)
        return "\n".join([*exports, where, f'exec {line} "$runner" {args}', ""])


def _quote(arg: str) -> str:
    """Quote for the shell, keeping ``${...}`` expansions inside an argument."""
    if "${" in arg:
        return '"' + arg.replace('"', '\\"') + '"'
    return shlex.quote(arg)


@dataclass(kw_only=True)
class NclLocalExecutor(LocalExecutor):
    """NeMo-Run's local executor applying its :class:`NclLaunch` (NeMo-Run applies a
    launcher's ``transform`` only where the executor says it supports it; its Slurm
    executor does for template launchers, its local one does not)."""

    def supports_launcher_transform(self) -> bool:
        return isinstance(self.get_launcher(), NclLaunch)


register_like(NclLocalExecutor, LocalExecutor)


def ncl_executor(executor: LocalExecutor, spares: int = 1,
                 **launch: object) -> NclLocalExecutor:
    """``executor`` (NeMo-Run's local executor) as an :class:`NclLocalExecutor`: its
    ``ntasks_per_node`` ranks per node under ``ncl-launch``, ``spares`` warm spares, this
    interpreter."""
    if not isinstance(executor, LocalExecutor):
        raise TypeError(f"ncl_executor takes a run.LocalExecutor; for {type(executor).__name__} "
                        "set launcher=NclLaunch(...) (Slurm: with ntasks_per_node=1)")
    fields = {f.name: copy.deepcopy(getattr(executor, f.name))
              for f in dataclasses.fields(LocalExecutor) if f.init and f.name != "launcher"}
    fields["ntasks_per_node"] = 1  # one agent per node; it starts the ranks
    launcher = NclLaunch(nproc_per_node=executor.ntasks_per_node, nnodes=executor.nodes,
                         spares=spares, python=sys.executable, **launch)  # type: ignore[arg-type]
    return NclLocalExecutor(launcher=launcher, **fields)
