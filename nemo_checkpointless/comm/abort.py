"""Abort every communicator of this process so no collective stays blocked.

NCCL (a GPU job): every group is aborted inside one ncclGroupStart/End bracket, newest
first, the way torch's ``_abort_process_group`` does (``compat/c10d.py`` says why not that
function itself): NCCL aborts then cannot wait on one another. No socket is touched: the
process's TCP connections are NCCL's bootstrap and proxy sockets, the W&B service, S3 or
HTTP data clients, none of them ours to cut.

Gloo (CPU rehearsal): ``abort()`` does not wake a thread blocked in a collective (measured
on torch 2.13), so the connections themselves are shut down: every connected TCP socket
of the process except those to the job store. A blocked collective then fails at once with
"connection closed", and peers blocked on this rank see the same, so the whole job unwinds
within milliseconds. The file descriptors stay open (``shutdown``, not ``close``) and are
closed by gloo when the old groups are destroyed, so no descriptor is reused under gloo's
feet. Why every socket and not gloo's alone: gloo's pairs connect ephemeral port to
ephemeral port, published only as opaque address blobs inside each group's store keys;
with ``TORCH_GLOO_LAZY_INIT`` they connect later, on gloo's own threads. No property of a
socket seen from ``/proc/self/fd`` says "gloo" reliably, and a gloo socket left open is a
collective that waits for the whole gloo timeout. In rehearsal the process holds no other
long-lived TCP connection than the store's (kept) and gloo's.

Either way the abort runs under a watchdog (:func:`abort_communicators`): an abort that
has not returned after ``timeout_s`` means a wedged driver or NCCL, and the rank exits
with :data:`~nemo_checkpointless.gpu.health.EXIT_GPU_SUSPECT` so that its agent checks the
GPU before a spare takes the local rank.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import socket
import threading
import time
from typing import Iterable, Iterator, Optional

import torch.distributed as dist

from .. import device
from ..compat import c10d
from ..gpu.health import EXIT_GPU_SUSPECT

log = logging.getLogger(__name__)

ABORT_TIMEOUT_S = 60.0  # ncclCommAbort takes milliseconds; minutes mean a wedged GPU


def _store_peers(endpoints: Iterable[tuple[str, int]]) -> set[int]:
    return {int(port) for _, port in endpoints}


def shutdown_tcp_connections(keep_ports: set[int]) -> int:
    """Shut down connected TCP sockets whose peer port is not in ``keep_ports``."""
    count = 0
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            continue
        try:
            if sock.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            if sock.type != socket.SOCK_STREAM:
                continue
            try:
                peer = sock.getpeername()
            except OSError:
                continue  # listening or unconnected
            if peer[1] in keep_ports:
                continue
            try:
                sock.shutdown(socket.SHUT_RDWR)
                count += 1
            except OSError:
                pass
        finally:
            sock.detach()
    return count


def job_backend() -> str:
    """The world's backend, or (no world now) the one the rank's device implies."""
    if dist.is_initialized():
        with contextlib.suppress(Exception):
            return str(dist.get_backend()).lower()
    return "nccl" if device.is_cuda() else "gloo"


def _exit_hung(what: str, seconds: float) -> None:
    log.critical("%s has not returned after %.1fs: exiting (code %d) so that the agent "
                 "replaces this rank and checks its GPU; stacks follow", what, seconds,
                 EXIT_GPU_SUSPECT)
    with contextlib.suppress(Exception):
        faulthandler.dump_traceback(all_threads=True)
    os._exit(EXIT_GPU_SUSPECT)


@contextlib.contextmanager
def deadline(seconds: float, what: str) -> Iterator[None]:
    """Exit the process if the block has not finished within ``seconds`` (a daemon timer;
    an abort that hangs cannot be interrupted from Python)."""
    timer = threading.Timer(seconds, _exit_hung, args=(what, seconds))
    timer.daemon = True
    timer.name = "ncl-abort-watchdog"
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def abort_communicators(store_endpoints: Iterable[tuple[str, int]],
                        backend: Optional[str] = None,
                        timeout_s: float = ABORT_TIMEOUT_S) -> int:
    """Abort all process groups of this process; returns the connections shut down
    (always 0 on NCCL). ``backend``: the job's (default: :func:`job_backend`)."""
    backend = (backend or job_backend()).lower()
    with deadline(timeout_s, f"the {backend} abort"):
        if backend == "nccl":
            t0 = time.perf_counter()
            groups = c10d.abort_all_groups()
            log.info("aborted %d process groups in one NCCL group call in %.3fs",
                     len(groups), time.perf_counter() - t0)
            return 0
        return shutdown_tcp_connections(_store_peers(store_endpoints))


_GRAVEYARD: list = []


def forget_all_groups() -> None:
    """Drop megatron's and torch's groups without shutting the aborted ones down.

    ``destroy_process_group`` calls ``shutdown()`` on every group, which on an aborted gloo
    group can block for seconds while holding the GIL (the heartbeat thread then stalls
    and the agent would take a healthy rank for hung). The aborted groups are instead
    forgotten by torch.distributed and parked here; their sockets are already shut down.
    The recovery manager releases them once the new generation has completed a step
    (:func:`release_forgotten_groups_in_background`); :func:`release_forgotten_groups`
    drops them on the caller's thread.
    """
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    _GRAVEYARD.extend(c10d.forget_all())


def release_forgotten_groups_in_background() -> int:
    """Destroy the parked groups on a daemon thread; returns how many.

    Parked groups are not free: each aborted gloo group keeps its worker and event-loop
    threads (69 threads per recovery in a 4-rank tiny_gpt_2opt job), and on a CPU-bound
    rank they cost compute. Measured: with three recoveries in 450 steps, the survivors'
    steps went from 0.29 s to 0.33 s when the groups stayed parked and stayed at 0.30 s when
    they were released after each recovery. Destroying 21-23 groups takes 0.3-0.7 s (their
    threads are joined). torch's process-group bindings drop the GIL in their destructor, so
    that wait runs here, beside training, instead of stalling the step.
    """
    groups = list(_GRAVEYARD)
    _GRAVEYARD.clear()
    if not groups:
        return 0

    def drop() -> None:
        t0 = time.perf_counter()
        groups.clear()  # the last references: the destructors run on this thread
        log.info("destroyed %d groups parked by the last recovery in %.2fs", count,
                 time.perf_counter() - t0)

    count = len(groups)
    threading.Thread(target=drop, name="ncl-release-groups", daemon=True).start()
    return count


def release_forgotten_groups() -> int:
    """Let the parked groups be destroyed (call when a stall cannot hurt)."""
    count = len(_GRAVEYARD)
    _GRAVEYARD.clear()
    return count
