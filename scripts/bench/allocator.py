"""Host allocator A/B under CPU rehearsal: the same job on glibc's malloc, jemalloc, tcmalloc.

    .venv/bin/python scripts/bench/allocator.py [--recipe tiny_gpt_2opt] [--steps 120]
    .venv/bin/python scripts/bench/allocator.py --steps 8 --variants system,tcmalloc  # quick

Each variant runs the same torchrun job (4 ranks, ``checkpointless=off``) with ``NCL_ALLOCATOR``
set, one after the other; every 2 s the ranks' resident memory (``ps``) and the machine's
user/system CPU share (``/proc/stat``) are sampled, and the allocator library mapped into
the ranks is read from their ``/proc/<pid>/maps``. Reported per variant: resident memory per
rank at the first sample and the largest, the system CPU share, the median time between
rank 0's commits over the first, middle and last third of the steps, the run's time from
first to last commit, and its ``state_sha256`` (which must be the same for every variant).
The last line is a JSON object; ``ratio`` is tcmalloc's run time over glibc's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from nemo_checkpointless import allocator  # noqa: E402
from nemo_checkpointless.comm.world import free_port  # noqa: E402

VARIANTS = ("system", "jemalloc", "tcmalloc")


def _cpu_times() -> tuple[int, int, int]:
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, system, idle = fields[0] + fields[1], fields[2], fields[3] + fields[4]
    return user, system, idle


def _rss_mb(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    out.append(int(line.split()[1]) // 1024)
        except OSError:
            pass
    return sorted(out)


def _mapped_allocators(pids: list[int]) -> set[str]:
    """The tcmalloc/jemalloc library mapped into each rank (read from /proc/<pid>/maps, as
    ``allocator.loaded`` reads its own), "glibc malloc" for a rank without one; empty when
    no rank's maps could be read. Early in a run the ranks can disagree for a moment: each
    re-executes itself with the preload (``allocator.reexec_if_needed``), not all at once."""
    found = set()
    for pid in pids:
        try:
            maps = Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            continue
        libs = {line.rsplit(" ", 1)[-1] for line in maps.splitlines()
                if os.path.basename(line.rsplit(" ", 1)[-1]).startswith(
                    ("libtcmalloc", "libjemalloc"))}
        found.add(min(libs) if libs else "glibc malloc")
    return found


def _rank_pids(launcher: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(launcher)], capture_output=True, text=True)
    return [int(p) for p in found.stdout.split()]


def run_variant(name: str, recipe: str, steps: int, root: Path) -> dict:
    run_dir = root / name
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", NCL_ALLOCATOR=name)
    for key in ("LD_PRELOAD", allocator.ENV_APPLIED):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           str(REPO / "recipes" / "pretrain.py"), f"recipe={recipe}", "checkpointless=off",
           f"trainer.max_steps={steps}", f"hydra.run.dir={run_dir}"]
    log = open(root / f"{name}.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    samples, prev, libraries = [], _cpu_times(), set()
    while proc.poll() is None:
        time.sleep(2.0)
        cur = _cpu_times()
        du, ds, di = (c - p for c, p in zip(cur, prev))
        prev = cur
        pids = _rank_pids(proc.pid)
        rss = _rss_mb(pids)
        if len(rss) == 4:
            samples.append({"rss_mb": rss, "sys": ds / max(1, du + ds + di)})
            # the newest sample wins: a rank maps its allocator once it re-executed itself
            libraries = _mapped_allocators(pids) or libraries
    log.close()
    if proc.returncode != 0:
        raise SystemExit(f"{name}: torchrun exited {proc.returncode}; see {root / name}.log")
    if len(libraries) > 1:  # every rank must run the same one, or the A/B is void
        raise SystemExit(f"{name}: at the last sample the ranks ran different allocators: "
                         f"{sorted(libraries)}")
    library = libraries.pop() if libraries else None
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    times = [r["time"] for r in rows]
    gaps = [b - a for a, b in zip(times, times[1:])]
    third = len(gaps) // 3
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "library": library,
        "rss_mb_first": samples[0]["rss_mb"] if samples else None,
        "rss_mb_max": max((s["rss_mb"] for s in samples), key=max) if samples else None,
        "sys_cpu_median": (round(statistics.median(s["sys"] for s in samples), 3)
                           if samples else None),
        "gap_s_by_third": [round(statistics.median(gaps[i * third:(i + 1) * third]), 4)
                           for i in range(3)],
        "run_s": round(times[-1] - times[0], 2),
        "state_sha256": summary["state_sha256"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description="\n\n".join(__doc__.split("\n\n")[:2]),  # title and usage
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="tiny_gpt_2opt")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    for name in variants:
        if name != "system" and allocator.find(name) is None:
            raise SystemExit(f"{name} is not installed here: apt-get install "
                             f"{'libtcmalloc-minimal4' if name == 'tcmalloc' else 'libjemalloc2'}"
                             f", or leave it out with --variants")
    root = Path(tempfile.mkdtemp(prefix="ncl-bench-allocator-"))
    results = {}
    for name in variants:
        results[name] = res = run_variant(name, args.recipe, args.steps, root)
        print(f"{name:9s} run {res['run_s']:6.1f} s  gaps {res['gap_s_by_third']}  rss "
              f"{res['rss_mb_first']} -> {res['rss_mb_max']} MB  sys {res['sys_cpu_median']:.0%}"
              f"  {res['library']}", flush=True)
    hashes = {r["state_sha256"] for r in results.values()}
    out = {"variants": results, "same_state": len(hashes) == 1, "recipe": args.recipe,
           "steps": args.steps, "run_root": str(root),
           "command": "scripts/bench/allocator.py " + " ".join(sys.argv[1:])}
    if "system" in results and "tcmalloc" in results:
        out["ratio"] = round(results["tcmalloc"]["run_s"] / results["system"]["run_s"], 3)
    print(json.dumps(out))
    if len(hashes) != 1:
        raise SystemExit("the allocators gave different final states")


if __name__ == "__main__":
    main()
