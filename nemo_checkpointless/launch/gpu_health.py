"""GPU health probe: is a device still fit for work after a rank on it hit a CUDA error?

A CUDA error that poisons a context (an illegal address, an Xid-class hardware fault)
cannot be recovered in the process: the rank exits (``EXIT_DEVICE_ERROR``, or it says so
with ``DeviceError``). Before the agent hands that local rank, and so that GPU, to a warm
spare it runs :func:`probe`: a separate process on that device allocates memory, runs a
matrix product whose result is known exactly, synchronizes and compares, and reads the
device's health from NVML (``pynvml``) or ``nvidia-smi`` when either is present
(uncorrected ECC errors, pending retired pages). A probe that fails or does not finish
within ``Timeouts.gpu_probe_s`` means the node must be replaced: the agent stops and exits
with ``EXIT_NODE_UNHEALTHY``.

``--gpu-probe CMD`` (``NCL_GPU_PROBE``) replaces the program: a shell command, ``{device}``
replaced by the CUDA device index; exit status 0 means healthy. Without CUDA on the host
and no such command, nothing is probed.

    python -m nemo_checkpointless.launch.gpu_health --device 0
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
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
    return [sys.executable, "-m", "nemo_checkpointless.launch.gpu_health", "--device",
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


# ---------------------------------------------------------------------------- the program
def _compute(device: int) -> str:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("CUDA is not available in the probe process")
    if device >= torch.cuda.device_count():
        raise SystemExit(f"device {device} does not exist ({torch.cuda.device_count()} visible)")
    dev = torch.device("cuda", device)
    torch.cuda.set_device(dev)
    n = 1024
    # small integers: every product and sum is exact in float32, so the result is known
    a = (torch.arange(n * n, dtype=torch.float32) % 7 - 3).reshape(n, n)
    b = (torch.arange(n * n, dtype=torch.float32) % 5 - 2).reshape(n, n).t().contiguous()
    want = a @ b
    big = torch.empty(256 << 20, dtype=torch.uint8, device=dev)  # 256 MiB
    big.fill_(0xA5)
    got = (a.to(dev) @ b.to(dev)).cpu()
    torch.cuda.synchronize(dev)
    if not torch.equal(got, want):
        raise SystemExit(f"device {device}: a matrix product differs from the known result")
    if int(big[::4096].to(torch.int32).sum().item()) != 0xA5 * ((256 << 20) // 4096):
        raise SystemExit(f"device {device}: memory read back differs from what was written")
    props = torch.cuda.get_device_properties(dev)
    return f"{props.name}, bus {getattr(props, 'pci_bus_id', '?')}"


def _management(device: int) -> str:
    """NVML (pynvml) or nvidia-smi health of the device; raises SystemExit when unhealthy."""
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        pynvml = None
    if pynvml is not None:
        pynvml.nvmlInit()
        try:
            handle = _nvml_handle(pynvml, device)
            try:
                ecc = pynvml.nvmlDeviceGetTotalEccErrors(
                    handle, pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_VOLATILE_ECC)
            except pynvml.NVMLError:
                ecc = 0  # ECC off or not supported
            if ecc:
                raise SystemExit(f"device {device}: {ecc} uncorrected ECC errors (NVML)")
            return "NVML: no uncorrected ECC errors"
        finally:
            pynvml.nvmlShutdown()
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "no NVML or nvidia-smi: compute check only"
    query = "pci.bus_id,ecc.errors.uncorrected.volatile.total,retired_pages.pending"
    out = subprocess.run([smi, f"--query-gpu={query}", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise SystemExit(f"nvidia-smi failed ({out.returncode}): {out.stdout}{out.stderr}")
    bus = _bus_id(device)
    for line in out.stdout.strip().splitlines():
        fields = [f.strip() for f in line.split(",")]
        if bus and not fields[0].lower().endswith(bus.lower()):
            continue
        if fields[1].isdigit() and int(fields[1]) > 0:
            raise SystemExit(f"device {device}: {fields[1]} uncorrected ECC errors (nvidia-smi)")
        if fields[2].lower() == "yes":
            raise SystemExit(f"device {device}: retired pages pending (reset the GPU)")
    return "nvidia-smi: no uncorrected ECC errors, no pending retired pages"


def _bus_id(device: int) -> Optional[str]:
    import torch

    props = torch.cuda.get_device_properties(device)
    if not hasattr(props, "pci_bus_id"):
        return None
    return f"{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"


def _nvml_handle(pynvml, device: int):  # noqa: ANN001
    bus = _bus_id(device)
    if bus is not None:
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            pci = pynvml.nvmlDeviceGetPciInfo(handle).busId
            pci = pci.decode() if isinstance(pci, bytes) else pci
            if pci.lower().endswith(bus):
                return handle
    return pynvml.nvmlDeviceGetHandleByIndex(device)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Probe one CUDA device's health (exit 0: healthy).")
    p.add_argument("--device", type=int, required=True, help="CUDA device index")
    args = p.parse_args(argv)
    compute = _compute(args.device)
    management = _management(args.device)
    print(f"device {args.device} healthy: {compute}; {management}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
