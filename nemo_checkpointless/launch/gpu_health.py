"""The agent's GPU health check: may a device that a rank left with a CUDA error be reused?

A CUDA error that poisons a context (an illegal address, an Xid-class hardware fault)
cannot be recovered in the process: the rank exits (``EXIT_DEVICE_ERROR``, or it says so
with ``DeviceError``). Before the agent hands that local rank, and so that GPU, to a warm
spare it runs :func:`probe`: by default the program of :mod:`nemo_checkpointless.gpu.health`
in a fresh process on that device (allocate, an exactly known product, a memory pattern,
synchronize, compare; NVML's ECC and row-remap state). A probe that fails or does not
finish within ``Timeouts.gpu_probe_s`` means the node must be replaced: the agent stops and
exits with ``EXIT_NODE_UNHEALTHY``.

``--gpu-probe CMD`` (``NCL_GPU_PROBE``) replaces the program: a shell command, ``{device}``
replaced by the CUDA device index; exit status 0 means healthy. Without CUDA on the host
and no such command, nothing is probed.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Mapping, Optional


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    detail: str
    seconds: float
    skipped: bool = False


def command_for(device: int, override: Optional[str]) -> list[str]:
    if override:
        return ["/bin/sh", "-c", override.replace("{device}", str(int(device)))]
    return [sys.executable, "-m", "nemo_checkpointless.gpu.health", "--device",
            str(int(device))]


def probe(device: int, override: Optional[str], timeout: float, gpu_host: bool,
          env: Optional[Mapping[str, str]] = None) -> ProbeResult:
    """Run the probe for CUDA device ``device`` (skipped on a host without a GPU unless a
    probe command is given)."""
    if not gpu_host and not override:
        return ProbeResult(True, "no GPU on this host: not probed", 0.0, skipped=True)
    cmd = command_for(device, override)
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, env=dict(env if env is not None else os.environ),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=timeout, start_new_session=True)
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode(errors="replace") if isinstance(err.stdout, bytes) else \
            (err.stdout or "")
        return ProbeResult(False, f"probe did not finish within {timeout:g}s "
                           f"({shlex.join(cmd)}){_tail(out)}", time.monotonic() - t0)
    except OSError as err:
        return ProbeResult(False, f"probe could not start ({shlex.join(cmd)}): {err}",
                           time.monotonic() - t0)
    seconds = time.monotonic() - t0
    if proc.returncode != 0:
        return ProbeResult(False, f"probe failed with exit code {proc.returncode} "
                           f"({shlex.join(cmd)}){_tail(proc.stdout)}", seconds)
    return ProbeResult(True, proc.stdout.strip().splitlines()[-1] if proc.stdout.strip()
                       else "healthy", seconds)


def _tail(text: str, lines: int = 5) -> str:
    kept = [line for line in text.strip().splitlines() if line.strip()][-lines:]
    return (": " + " | ".join(kept)) if kept else ""
