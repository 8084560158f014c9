"""A CUDA health probe for one device, run in a child process, with a typed verdict.

    verdict = probe(local_rank=3, timeout_s=30.0)      # the agent, before reusing a GPU
    python -m nemo_checkpointless.gpu.health --device 3  # the same, by hand (JSON out)

Why a child process: a CUDA error that poisons a context (illegal address, a device-side
assert, Xid-class hardware faults) is sticky: every later CUDA call in that process fails,
so the failed rank exits (:data:`EXIT_GPU_SUSPECT`) and the question "is the GPU good?"
can only be answered by a fresh context. The child allocates, computes a product whose
exact result is known (small integers in fp32: no rounding, TF32 off), fills and re-reads
a memory pattern, synchronizes, and compares with the host. Where NVML answers (pynvml, or
``nvidia-smi``) it also reads the volatile uncorrectable ECC count and row-remapping
state, which NVIDIA's documentation says need a GPU reset. A probe that does not finish
in ``timeout_s`` is killed and counts as failed (a hung context is the commonest bad GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

# a rank's exit code: its GPU may be bad, probe before reusing it (the agent protocol's)
from ..launch.protocol import EXIT_DEVICE_ERROR as EXIT_GPU_SUSPECT  # noqa: E402
KINDS = ("ok", "no_device", "cuda_error", "mismatch", "nvml", "timeout", "crashed")

# the CUDA runtime's sticky errors (the context is unusable afterwards), as torch words them
_STICKY = ("illegal memory access", "illegal instruction", "misaligned address",
           "unspecified launch failure", "uncorrectable ecc", "device-side assert",
           "hardware stack error", "invalid program counter", "launch timed out",
           "fallen off the bus", "cudaerrorillegaladdress", "cudaerrorlaunchfailure",
           "cudaerrorassert", "cudaerroreccuncorrectable")


@dataclass(frozen=True)
class HealthVerdict:
    """What the probe found on one device. ``healthy`` is the decision; ``kind`` one of
    :data:`KINDS`; ``reason`` says what failed in words; ``nvml`` what NVML reported."""

    local_rank: int
    healthy: bool
    kind: str
    reason: str
    seconds: float
    device_name: str = ""
    nvml: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "HealthVerdict":
        return cls(**json.loads(text))


def poisons_context(err: BaseException) -> bool:
    """Whether ``err`` is a sticky CUDA error: the process cannot recover in place (every
    later CUDA call fails) and should exit with :data:`EXIT_GPU_SUSPECT`."""
    text = f"{type(err).__name__}: {err}".lower()
    return any(s in text for s in _STICKY)


# ---------------------------------------------------------------------- the child side
def _nvml_report(index: int) -> dict[str, Any]:
    """ECC and row-remapping state of CUDA device ``index`` (matched by PCI bus id),
    from pynvml if importable, else nvidia-smi; {} when neither answers."""
    try:
        import torch

        props = torch.cuda.get_device_properties(index)
        bus = "{:08X}:{:02X}:{:02X}.0".format(getattr(props, "pci_domain_id", 0),
                                              getattr(props, "pci_bus_id", 0),
                                              getattr(props, "pci_device_id", 0))
    except Exception:  # noqa: BLE001 - NVML is optional
        bus = ""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            h = (pynvml.nvmlDeviceGetHandleByPciBusId(bus) if bus
                 else pynvml.nvmlDeviceGetHandleByIndex(index))
            out: dict[str, Any] = {"source": "pynvml"}
            try:
                out["ecc_uncorrected_volatile"] = int(pynvml.nvmlDeviceGetTotalEccErrors(
                    h, pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_VOLATILE_ECC))
            except pynvml.NVMLError:
                pass
            try:
                rows = pynvml.nvmlDeviceGetRemappedRows(h)  # corr, unc, pending, failure
                out["remap_pending"], out["remap_failure"] = bool(rows[2]), bool(rows[3])
            except (pynvml.NVMLError, AttributeError):
                pass
            return out
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - fall back to nvidia-smi
        pass
    smi = shutil.which("nvidia-smi")
    if not smi:
        return {}
    fields = "pci.bus_id,ecc.errors.uncorrected.volatile.total,remapped_rows.pending," \
             "remapped_rows.failure"
    try:
        text = subprocess.run([smi, f"--query-gpu={fields}", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.split(",")]
        if len(cells) != 4 or (bus and not cells[0].upper().endswith(bus[-12:])):
            continue
        out = {"source": "nvidia-smi"}
        if cells[1].isdigit():
            out["ecc_uncorrected_volatile"] = int(cells[1])
        out["remap_pending"] = cells[2].lower() in ("yes", "1")
        out["remap_failure"] = cells[3].lower() in ("yes", "1")
        return out
    return {}


def check_device(index: int, size: int = 256, pattern_mb: int = 64) -> HealthVerdict:
    """The probe's body, in this process (the CLI runs it; :func:`probe` runs the CLI)."""
    t0 = time.monotonic()

    def verdict(kind: str, reason: str, name: str = "", nvml: Optional[dict] = None):
        return HealthVerdict(index, kind == "ok", kind, reason, time.monotonic() - t0, name,
                             nvml or {})

    import torch

    if not torch.cuda.is_available() or index >= torch.cuda.device_count():
        return verdict("no_device", f"no CUDA device {index} (CUDA available: "
                       f"{torch.cuda.is_available()}, devices: {torch.cuda.device_count()})")
    name = ""
    try:
        torch.cuda.set_device(index)
        name = torch.cuda.get_device_name(index)
        torch.backends.cuda.matmul.allow_tf32 = False
        dev = torch.device("cuda", index)
        host = torch.device("cpu")
        a = (torch.arange(size * size, device=host) % 7 - 3).float().view(size, size)
        b = (torch.arange(size * size, device=host) % 5 - 2).float().view(size, size).t()
        want = a @ b  # |sum| < 2**24: exact in fp32 on both sides
        got = (a.to(dev) @ b.to(dev)).to(host)
        words = pattern_mb * (1 << 20) // 8
        pattern = torch.arange(words, dtype=torch.int64, device=dev) * 2654435761
        expected = (torch.arange(words, dtype=torch.int64, device=host) * 2654435761).sum()
        total = pattern.sum().to(host)
        torch.cuda.synchronize(dev)
    except Exception as err:  # noqa: BLE001 - the verdict names it
        return verdict("cuda_error", f"{type(err).__name__}: {str(err).splitlines()[0]}",
                       name)
    if not torch.equal(got, want) or int(total) != int(expected):
        return verdict("mismatch", "a result computed on the GPU differs from the host's "
                       "(matmul or memory pattern): silent data corruption", name)
    nvml = _nvml_report(index)
    if nvml.get("ecc_uncorrected_volatile", 0) > 0 or nvml.get("remap_failure") \
            or nvml.get("remap_pending"):
        return verdict("nvml", f"NVML reports the GPU needs a reset or replacement: {nvml}",
                       name, nvml)
    return verdict("ok", "allocate, compute, synchronize, compare: all good", name, nvml)


# ---------------------------------------------------------------------- the agent side
def probe(local_rank: int, timeout_s: float = 30.0) -> HealthVerdict:
    """Probe CUDA device ``local_rank`` in a fresh child process; never raises.

    The child inherits the environment (``CUDA_VISIBLE_DEVICES`` included), so
    ``local_rank`` is the index a rank with that LOCAL_RANK uses (``cuda:LOCAL_RANK``).
    """
    t0 = time.monotonic()
    cmd = [sys.executable, "-m", "nemo_checkpointless.gpu.health", "--device", str(local_rank)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                              env=dict(os.environ, PYTHONUNBUFFERED="1"))
    except subprocess.TimeoutExpired:
        return HealthVerdict(local_rank, False, "timeout", f"the probe did not finish in "
                             f"{timeout_s:.0f}s (a hung CUDA context)", time.monotonic() - t0)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            try:
                return HealthVerdict.from_json(line)
            except (ValueError, TypeError):
                break
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return HealthVerdict(local_rank, False, "crashed", f"the probe exited with code "
                         f"{proc.returncode} without a verdict: {' | '.join(tail)}",
                         time.monotonic() - t0)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nemo_checkpointless.gpu.health",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--device", type=int, required=True, help="CUDA device index")
    parser.add_argument("--pattern-mb", type=int, default=64,
                        help="MiB written and re-read on the device (default 64)")
    args = parser.parse_args(argv)
    result = check_device(args.device, pattern_mb=args.pattern_mb)
    print(result.to_json(), flush=True)
    return 0 if result.healthy else 1


if __name__ == "__main__":
    sys.exit(main())
