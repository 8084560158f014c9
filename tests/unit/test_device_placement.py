"""Every tensor the package creates where it can reach a collective names its device.

NCCL groups take CUDA tensors only ("no backend for device type cpu"), and gloo takes any,
so a control tensor created on the host passes every CPU test and stops a GPU job at step
one (issue 21, point 2). This test reads the source instead of running it: each call of a
tensor constructor (``torch.zeros``, ``torch.tensor``, ...) must pass ``device=``. A tensor
that must live on the host says so: ``device=HOST`` (``device.HOST``) with a comment on
its line or the line above, and ``torch.frombuffer``/``torch.from_numpy`` (host by
nature) carry a ``host`` comment. Modules whose tensors never reach a collective are
listed in :data:`HOST_MODULES` with the reason.

    python tests/unit/test_device_placement.py [path/to/nemo_checkpointless]   # list them
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "nemo_checkpointless"

CONSTRUCTORS = {"tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn",
                "randint", "linspace", "logspace", "eye", "as_tensor", "empty_strided",
                "scalar_tensor"}
HOST_BY_NATURE = {"frombuffer", "from_numpy"}
HOST_NAMES = {"HOST", "cpu"}

# modules whose tensors stay on the host by design, and why
HOST_MODULES = {
    "data/": "batches are built on the host (numpy, shared memory); the loop moves them to "
             "the device (train/loop.py to_device)",
    "lab/checkpoint.py": "the raw per-rank disk parts (the lab baseline's format) are host "
                         "buffers: O_DIRECT writes, mmap reads",
    "megatron/state.py": "the state hash reads host copies (.cpu()) of every tensor",
    "gpu/health.py": "the probe compares a device result with a host reference on purpose",
    "cpu.py": "CPU rehearsal's own patches (docstrings name the calls it rewrites)",
}

# Files the lead is fixing (issue 21 point 2: control-plane tensors on the rank's device
# with device.py). Offences there are listed, not failed; remove a file once it is clean
# (test_todo_list_is_current says when).
LEAD_TODO: set[str] = set()


def _is_host_expr(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant):
        return node.value == "cpu"
    if isinstance(node, ast.Name):
        return node.id in HOST_NAMES
    if isinstance(node, ast.Attribute):
        return node.attr in HOST_NAMES
    if isinstance(node, ast.Call) and node.args:
        return _is_host_expr(node.args[0])  # torch.device("cpu")
    return False


def _commented(lines: list[str], lineno: int) -> bool:
    here = lines[lineno - 1]
    above = lines[lineno - 2].strip() if lineno >= 2 else ""
    return "#" in here or above.startswith("#")


def offences_in(source: str, name: str = "<source>") -> list[str]:
    """``name:line: call`` for every constructor that does not name its device."""
    lines = source.splitlines()
    out = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
            continue
        what = node.func.attr
        device = next((k.value for k in node.keywords if k.arg == "device"), None)
        text = lines[node.lineno - 1].strip()
        if what in HOST_BY_NATURE:
            if "host" not in lines[node.lineno - 1].lower():
                out.append(f"{name}:{node.lineno}: torch.{what} without a '# host: why' "
                           f"comment: {text}")
        elif what in CONSTRUCTORS:
            if device is None:
                out.append(f"{name}:{node.lineno}: torch.{what} names no device: {text}")
            elif _is_host_expr(device) and not _commented(lines, node.lineno):
                out.append(f"{name}:{node.lineno}: torch.{what} on the host without a "
                           f"comment saying why: {text}")
    return sorted(out, key=lambda s: int(s.split(":")[1]))


def scan(package: Path = PACKAGE) -> dict[str, list[str]]:
    """Offences per module (relative path) outside :data:`HOST_MODULES`."""
    found: dict[str, list[str]] = {}
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package).as_posix()
        if any(rel == m or (m.endswith("/") and rel.startswith(m)) for m in HOST_MODULES):
            continue
        hits = offences_in(path.read_text(), rel)
        if hits:
            found[rel] = hits
    return found


def test_every_tensor_outside_the_todo_list_names_its_device():
    found = scan()
    mine = {rel: hits for rel, hits in found.items() if rel not in LEAD_TODO}
    assert not mine, "tensors without a device:\n" + "\n".join(
        h for hits in mine.values() for h in hits)


def test_todo_list_is_current():
    found = scan()
    clean = sorted(rel for rel in LEAD_TODO if rel not in found)
    assert not clean, f"{clean} name every device now: remove them from LEAD_TODO"
    missing = sorted(rel for rel in LEAD_TODO if not (PACKAGE / rel).exists())
    assert not missing, f"{missing} no longer exist: remove them from LEAD_TODO"


def test_the_check_catches_the_mistake_and_accepts_the_fixes():
    bad = ("import torch\n"
           "dist.all_reduce(torch.ones(1, dtype=torch.int32))\n"
           "x = torch.zeros(2, device=HOST)\n"
           "b = torch.frombuffer(raw, dtype=torch.uint8)\n")
    hits = offences_in(bad)
    assert [h.split(":")[1] for h in hits] == ["2", "3", "4"], hits
    good = ("import torch\n"
            "dist.all_reduce(torch.ones(1, dtype=torch.int32, device=device.current()))\n"
            "# host: an RNG snapshot is host memory\n"
            "x = torch.zeros(2, device=HOST)\n"
            "y = torch.zeros(2, device=device.HOST)  # host: the disk buffer\n"
            "b = torch.frombuffer(raw, dtype=torch.uint8)  # host: pickle bytes\n"
            "z = torch.zeros_like(x)\n")
    assert offences_in(good) == []


if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else PACKAGE
    result = scan(root)
    for rel, hits in result.items():
        tag = "  (lead's TODO)" if rel in LEAD_TODO else ""
        print(f"{rel}{tag}")
        for h in hits:
            print(f"    {h}")
    print(f"{sum(map(len, result.values()))} offences in {len(result)} modules")
    sys.exit(1 if result else 0)
