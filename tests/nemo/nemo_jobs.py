"""Real NeMo jobs as real processes: torchrun, ncl-launch (one agent or several), and what
they leave behind (metrics.jsonl, summary.json, events.jsonl, TensorBoard, checkpoints)."""

from __future__ import annotations

import glob
import os
import secrets
import sys
from pathlib import Path
from typing import Any, Optional

from job_processes import AgentGroup, FinishedJob, free_port, run_in_session

REPO = Path(__file__).resolve().parents[2]
ENTRY = REPO / "recipes" / "nemo_pretrain.py"
STEPS = 8


def nemo_env(**extra: str) -> dict[str, str]:
    from nemo_checkpointless.nemo.launch_env import AGENT_ENV

    env = dict(os.environ, OMP_NUM_THREADS="1", NCL_FORCE_CPU="1", PYTHONUNBUFFERED="1",
               NCL_HANG_TIMEOUT_S="30",  # NeMo's set-up is slow on 2 shared cores
               **AGENT_ENV)
    env.update(extra)
    return env


class Job(FinishedJob):
    """A finished NeMo job: exit code, output, and rank 0's files (NeMo's too)."""

    @property
    def log_dir(self) -> Path:
        return self.run_dir / "log"

    def tensorboard(self) -> dict[tuple[int, str], list[float]]:
        """(step, tag) -> every value written, in file order (TensorBoard's event files)."""
        from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

        rows: dict[tuple[int, str], list[float]] = {}
        pattern = str(self.log_dir / "tb_logs" / "*" / "**" / "events.out.tfevents.*")
        for path in sorted(glob.glob(pattern, recursive=True)):
            for event in EventFileLoader(path).Load():
                for value in event.summary.value:
                    number = value.simple_value if value.HasField("simple_value") \
                        else value.tensor.float_val[0]
                    rows.setdefault((int(event.step), value.tag), []).append(number)
        return rows

    def checkpoints(self) -> list[Path]:
        return sorted(Path(p) for p in glob.glob(str(self.log_dir / "*" / "checkpoints" / "*"))
                      if not p.endswith("-last"))


def base_args(run_dir: Path, *overrides: str) -> list[str]:
    return ["recipe=tiny_llama", f"trainer.max_steps={STEPS}", f"run_dir={run_dir}",
            f"log.log_dir={run_dir}/log", *overrides]


def torchrun(nproc: int, run_dir: Path, *overrides: str, timeout: float = 900) -> Job:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(ENTRY),
           *base_args(run_dir, f"trainer.devices={nproc}", *overrides)]
    return _run(cmd, run_dir, timeout)


def ncl_launch(nproc: int, run_dir: Path, *overrides: str, spares: int = 1,
               timeout: float = 900, script: Optional[list[str]] = None) -> Job:
    cmd = [sys.executable, "-m", "nemo_checkpointless.launch.agent", "--nproc-per-node",
           str(nproc), "--spares", str(spares), "--master-port", str(free_port()),
           *(script or [str(ENTRY), *base_args(run_dir, f"trainer.devices={nproc}",
                                               *overrides)])]
    return _run(cmd, run_dir, timeout)


def _run(cmd: list[str], run_dir: Path, timeout: float, env: Optional[dict] = None) -> Job:
    log = run_dir.parent / f"{run_dir.name}.log"
    code, text = run_in_session(cmd, log, cwd=REPO, env=env or nemo_env(), timeout=timeout)
    return Job(code, text, run_dir)


class Agents(AgentGroup):
    """Several ncl-launch agents on this machine, each one node of the job."""

    result, step_timeout, wait_timeout = Job, 900, 900

    def __init__(self, nnodes: int, nproc: int, run_dir: Path, *overrides: str) -> None:
        super().__init__(run_dir, nemo_env(NCL_JOB_ID="nemo-" + secrets.token_hex(3),
                                           NCL_JOB_SECRET=secrets.token_hex(16)), cwd=REPO,
                         nnodes=nnodes, nproc=nproc, entry=ENTRY,
                         args=base_args(run_dir, f"trainer.devices={nproc}",
                                        f"trainer.num_nodes={nnodes}", *overrides))


def plan(*faults: tuple[int, int, str, str]) -> str:
    items = ",".join(f"{{rank:{r},step:{s},phase:{p},kind:{k}}}" for r, s, p, k in faults)
    return f"fault.plan=[{items}]"


def assert_same_run(got: Job, want: Job, first_step: int = 1) -> None:
    """Bit for bit: every metrics row from ``first_step`` on, and the state hash."""
    rows, ref = got.metrics, [r for r in want.metrics if r["step"] >= first_step]
    assert [r["step"] for r in rows] == list(range(first_step, STEPS + 1)), \
        "one row per committed step"
    for key in ("loss_hex", "batch_hash", "consumed_samples", "lr", "grad_norm"):
        assert [r[key] for r in rows] == [r[key] for r in ref], key
    assert got.summary["state_sha256"] == want.summary["state_sha256"]


def deterministic(rows: dict[tuple[int, str], list[float]]) -> dict[tuple[int, str], Any]:
    """TensorBoard rows without wall-clock values."""
    return {k: v for k, v in rows.items() if "time" not in k[1]}
