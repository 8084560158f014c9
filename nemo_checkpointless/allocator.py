"""The host memory allocator of training processes under CPU rehearsal.

In CPU rehearsal every activation, gradient and gloo buffer is host memory, and glibc's
malloc handles that churn badly: it keeps freed blocks in its heaps and hands pages back and
forth with the kernel: ranks grew from 0.3 GB to over 2 GB and their steps slowed by
half, while tcmalloc and jemalloc stayed flat (measurements: ``docs/benchmarks.md``,
"Host memory allocator"). The allocator changes where bytes live, never what is computed: the
final state hash is the same with every one.

So rehearsal processes run with tcmalloc (else jemalloc) preloaded when the library is on
the machine. ``NCL_ALLOCATOR`` chooses:

* ``auto`` (default): tcmalloc, else jemalloc, else glibc, in CPU rehearsal only (no NVIDIA
  device node, or ``NCL_FORCE_CPU=1``). On GPU hosts nothing changes.
* ``tcmalloc`` / ``jemalloc``: that library, on any host; an error if it is missing.
* ``system``: glibc's malloc, as the process started.
* a path to a shared library: that file.

A preload has to be in place before the interpreter starts, so it is applied in two places:
``ncl-launch`` puts it in its workers' (and zygote's) environment, and the recipes call
:func:`reexec_if_needed` as their first statement, which re-executes the same command line
once with the library preloaded (under torchrun, Slurm or by hand; the pid is unchanged).

This module imports nothing heavy: it runs before torch is imported.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from dataclasses import dataclass
from typing import Mapping, MutableMapping, Optional

ENV = "NCL_ALLOCATOR"
ENV_APPLIED = "NCL_ALLOCATOR_APPLIED"  # "1": a launcher or a re-execution decided; never loop

# library file names by allocator, most specific first (Debian/Ubuntu, RHEL, conda, source)
_FILES = {
    "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libtcmalloc_minimal.so",
                 "libtcmalloc.so"),
    "jemalloc": ("libjemalloc.so.2", "libjemalloc.so"),
}
_LINK_NAMES = {"tcmalloc": ("tcmalloc_minimal", "tcmalloc"), "jemalloc": ("jemalloc",)}
_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
         "/usr/local/lib", "/lib/x86_64-linux-gnu", "/lib/aarch64-linux-gnu", "/lib64")
_INSTALL_HINT = ("install it (Debian/Ubuntu: apt-get install libtcmalloc-minimal4 or "
                 "libjemalloc2; RHEL: dnf install gperftools-libs or jemalloc; conda: "
                 "conda install gperftools), or set NCL_ALLOCATOR=system to keep glibc's malloc")


class AllocatorError(ValueError):
    """NCL_ALLOCATOR names an allocator that cannot be used here."""


@dataclass(frozen=True)
class Allocator:
    name: str  # "tcmalloc", "jemalloc" or the file's name
    path: str  # what goes into LD_PRELOAD


def _search_dirs() -> list[str]:
    dirs = [os.path.join(sys.prefix, "lib")]
    conda = os.environ.get("CONDA_PREFIX")
    if conda:
        dirs.append(os.path.join(conda, "lib"))
    return dirs + [d for d in _DIRS if d not in dirs]


def find(name: str) -> Optional[Allocator]:
    """Where the shared library of allocator ``name`` is on this machine, if anywhere."""
    for directory in _search_dirs():
        for file in _FILES[name]:
            path = os.path.join(directory, file)
            if os.path.isfile(path):
                return Allocator(name, path)
    for link_name in _LINK_NAMES[name]:  # ld.so's cache: a bare soname, resolved by ld.so
        found = ctypes.util.find_library(link_name)
        if found:
            return Allocator(name, found)
    return None


def rehearsal_host(env: Mapping[str, str] = os.environ) -> bool:
    """True on a host whose processes run in CPU rehearsal: no NVIDIA device (without
    importing torch), or ``NCL_FORCE_CPU=1`` / no visible device."""
    if env.get("NCL_FORCE_CPU", "0") == "1" or env.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return True
    return not os.path.exists("/dev/nvidiactl")


def choose(env: Mapping[str, str] = os.environ) -> Optional[Allocator]:
    """The allocator ``NCL_ALLOCATOR`` asks for on this host (None: glibc's malloc)."""
    value = env.get(ENV, "auto").strip() or "auto"
    if value == "system":
        return None
    if value == "auto":
        if not rehearsal_host(env):
            return None
        return find("tcmalloc") or find("jemalloc")
    if value in _FILES:
        found = find(value)
        if found is None:
            raise AllocatorError(f"{ENV}={value}, but no {value} library was found in "
                                 f"{', '.join(_search_dirs())} or ld.so's cache: {_INSTALL_HINT}")
        return found
    if os.sep in value:
        if not os.path.isfile(value):
            raise AllocatorError(f"{ENV}={value}: no such file; give the path of a shared "
                                 "library such as libtcmalloc_minimal.so.4, or one of auto, "
                                 "tcmalloc, jemalloc, system")
        return Allocator(os.path.basename(value), value)
    raise AllocatorError(f"{ENV}={value!r} is not one of auto, tcmalloc, jemalloc, system, or "
                         "a path to an allocator's shared library")


def loaded() -> Optional[str]:
    """The tcmalloc/jemalloc library (or the one NCL_ALLOCATOR names by path) mapped into
    this process, if any (Linux)."""
    names = ("libtcmalloc", "libjemalloc")
    custom = os.environ.get(ENV, "")
    if os.sep in custom:
        names += (os.path.basename(custom),)
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.rsplit(" ", 1)[-1].strip()
                if os.path.basename(path).startswith(names):
                    return path
    except OSError:
        pass
    return None


def preload(env: MutableMapping[str, str], allocator: Optional[Allocator]) -> None:
    """Put ``allocator`` first in ``env``'s LD_PRELOAD (once)."""
    if allocator is None:
        return
    rest = [p for p in env.get("LD_PRELOAD", "").replace(":", " ").split()
            if p and p != allocator.path]
    env["LD_PRELOAD"] = " ".join([allocator.path, *rest])


def worker_env(env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """What a launcher adds to its workers' environment: the preload, if any, and the
    mark that the choice is made. Raises :class:`AllocatorError` on a bad NCL_ALLOCATOR."""
    allocator = choose(env)
    out = {ENV_APPLIED: "1"}
    if allocator is not None:
        merged = {"LD_PRELOAD": env.get("LD_PRELOAD", "")}
        preload(merged, allocator)
        out.update(merged)
    return out


def describe() -> str:
    """This process's allocator, for the start-up log."""
    path = loaded()
    return f"host allocator: {path}" if path else "host allocator: glibc malloc"


def reexec_if_needed() -> None:
    """Re-execute this process's command line with the chosen allocator preloaded, when it
    is not loaded yet. Call it first thing in a script, before heavy imports. Exits with a
    message on a bad ``NCL_ALLOCATOR``; does nothing when a launcher already decided
    (``NCL_ALLOCATOR_APPLIED=1``: ncl-launch's forked ranks must never re-execute the zygote's
    command line) or on the second pass."""
    try:
        allocator = choose()
    except AllocatorError as err:
        raise SystemExit(f"nemo-checkpointless: {err}") from None
    if allocator is None or loaded() is not None or os.environ.get(ENV_APPLIED) == "1":
        return
    env = dict(os.environ)
    preload(env, allocator)
    env[ENV_APPLIED] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    argv = [sys.executable, *sys.orig_argv[1:]]
    try:
        os.execve(sys.executable, argv, env)
    except OSError:  # keep running on glibc rather than fail the job over speed
        return
