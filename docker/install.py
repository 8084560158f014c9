"""Install nemo-checkpointless into a framework image's Python, keeping its torch and megatron-core.

    python docker/install.py [--megatron-core REQUIREMENT] [--dry-run] [REPO]

Run by the Dockerfile (any Python that has torch works: an NGC NeMo or PyTorch image, or a
venv). What it does, in order:

1. reads the versions of torch and megatron-core the environment has; without torch it
   stops; without megatron-core it installs ``--megatron-core`` with ``--no-deps`` (an NGC
   PyTorch base) or stops;
2. ``pip install --no-deps REPO``: the package and its ``ncl-launch`` script, nothing else;
3. installs only the requirements of pyproject.toml that the environment does not satisfy
   (torch and megatron-core excluded), under a constraints file that pins torch and
   megatron-core at the versions found in 1;
4. fails if torch's or megatron-core's version changed, if ``ncl-launch`` is not on PATH, or
   if ``ncl-launch --help`` does not run.

``--dry-run`` prints what it found and would install, and changes nothing.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ModuleNotFoundError:  # a bare base: pip's own copy
    from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef]
    from pip._vendor.packaging.utils import canonicalize_name  # type: ignore[no-redef]

FRAMEWORK = ("torch", "megatron-core")  # the image's own: never installed or upgraded here


def version_of(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def requirements(repo: Path) -> list[Requirement]:
    project = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project.get("dependencies", [])]


def missing(reqs: list[Requirement]) -> list[Requirement]:
    """Requirements this environment does not satisfy (markers evaluated), framework aside."""
    out = []
    for req in reqs:
        if canonicalize_name(req.name) in FRAMEWORK:
            continue
        if req.marker is not None and not req.marker.evaluate():
            continue
        have = version_of(req.name)
        if have is None or not req.specifier.contains(have, prereleases=True):
            out.append(req)
    return out


def out_of_range(reqs: list[Requirement], found: dict[str, str]) -> list[str]:
    """Framework packages whose version lies outside the package's declared range."""
    notes = []
    for req in reqs:
        name = canonicalize_name(req.name)
        if name in found and not req.specifier.contains(found[name], prereleases=True):
            notes.append(f"{name} {found[name]} is outside pyproject's '{req.specifier}' (kept: "
                         "the package's start-up check names the versions it supports)")
    return notes


def pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--no-cache-dir",
           "--disable-pip-version-check", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("repo", nargs="?", default=".", help="repository root (pyproject.toml)")
    p.add_argument("--megatron-core", default="",
                   help="requirement to install with --no-deps when megatron-core is missing")
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    repo = Path(args.repo).resolve()

    found = {name: version_of(name) for name in FRAMEWORK}
    py = f"Python {sys.version.split()[0]} ({sys.executable})"
    if found["torch"] is None:
        print(f"error: {py} has no torch: build FROM an NGC PyTorch or NeMo image "
              "(BASE_IMAGE), whose CUDA build of torch this package runs on", file=sys.stderr)
        return 1
    if found["megatron-core"] is None:
        if not args.megatron_core:
            print(f"error: {py} has no megatron-core: use an NGC NeMo image, or pass "
                  "--build-arg MEGATRON_CORE=megatron-core==<version> (installed with "
                  "--no-deps)", file=sys.stderr)
            return 1
        if args.dry_run:
            print(f"would install {args.megatron_core} with --no-deps")
        else:
            pip("--no-deps", args.megatron_core)
            found["megatron-core"] = version_of("megatron-core")
    reqs = requirements(repo)
    todo = missing(reqs)
    print(f"{py}: torch {found['torch']}, megatron-core {found['megatron-core']}")
    for note in out_of_range(reqs, {k: v for k, v in found.items() if v}):
        print(f"note: {note}")
    print("missing requirements:", " ".join(str(r) for r in todo) or "none")
    if args.dry_run:
        return 0

    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as pins:
        pins.write("".join(f"{name}=={v}\n" for name, v in found.items() if v))
    try:
        pip("--no-deps", str(repo))
        if todo:
            pip("--constraint", pins.name, *(str(r) for r in todo))
    finally:
        os.unlink(pins.name)

    after = {name: version_of(name) for name in FRAMEWORK}
    if after != found:
        print(f"error: the framework changed: {found} -> {after}", file=sys.stderr)
        return 1
    launch = shutil.which("ncl-launch")
    if launch is None:
        print(f"error: ncl-launch is not on PATH ({os.environ.get('PATH')})", file=sys.stderr)
        return 1
    subprocess.run([launch, "--help"], check=True, stdout=subprocess.DEVNULL)
    print(f"nemo-checkpointless {version_of('nemo-checkpointless')} installed: {launch}; "
          f"torch {after['torch']}, megatron-core {after['megatron-core']} unchanged")
    return 0


if __name__ == "__main__":
    sys.exit(main())
