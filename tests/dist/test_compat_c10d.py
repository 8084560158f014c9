"""torch's registry through compat/c10d.py, in a real (one-rank gloo) world: the bracketed
abort leaves the registry to the training thread, forgetting clears it so that a new world
forms at once, and the old groups stay alive until released."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import _env

pytestmark = [pytest.mark.dist, pytest.mark.timeout(120)]

SCRIPT = """
import datetime, weakref
import torch, torch.distributed as dist
from nemo_checkpointless.compat import c10d

def world():  # an in-memory store: no port to race for
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=30))

world()
sub = dist.new_group([0])
x = torch.ones(1)
dist.all_reduce(x, group=sub)
groups = c10d.live_groups()
assert len(groups) == 2 and sub in groups
assert c10d.bound_device(c10d.default_group()) is None

aborted = c10d.abort_all_groups()           # gloo: no NCCL bracket; every group's abort()
assert set(map(id, aborted)) == set(map(id, groups))
assert dist.is_initialized() and c10d.default_group() in groups
assert c10d.group_ids() == set(map(id, groups))   # registry untouched: roles still readable

parked = c10d.forget_all()
assert not dist.is_initialized() and c10d.live_groups() == []
refs = [weakref.ref(g) for g in parked]
del groups, aborted, sub

world()
y = torch.ones(1)
dist.all_reduce(y)
assert all(r() is not None for r in refs)   # parked, not destroyed under our feet
parked.clear()
assert y.item() == 1.0
dist.destroy_process_group()
print("OK")
"""


def test_abort_forget_and_reform():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=_env(), capture_output=True,
                          text=True, timeout=110)
    assert proc.returncode == 0 and "OK" in proc.stdout, (proc.stdout + proc.stderr)[-4000:]
