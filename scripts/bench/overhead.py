"""Steady-state overhead of each tier: step time with the tier on vs off, interleaved runs.

    .venv/bin/python scripts/bench/overhead.py [--recipe bench_gpt] [--repeats 3] [--steps 20]
    .venv/bin/python scripts/bench/overhead.py --recipe tiny_gpt_2opt --repeats 2   # quick

Same model and layout for every variant (default ``recipe=bench_gpt``: 4 ranks, DP=4,
2 distributed-optimizer instances). ``off``, ``tier1`` and ``tier2`` run under torchrun;
``tier3`` and ``tier4`` only run under ``ncl-launch`` (no spares: a spare would be another
GPU on a real cluster, not a process sharing these cores). ``off@launch`` (tier off under
ncl-launch) separates the launcher's cost from a tier's; it is tried once and dropped with
the reason if the entry point refuses it.

Interleaving: ``for r in repeats: for variant in variants`` with the order rotated by one
each repeat, so slow drifts of a shared machine's load hit every variant alike.

Two step times per run, both over the steady window (steps after ``--warmup``):

* ``cadence_s`` (primary): wall time between rank 0's metrics rows, observed by polling
  ``metrics.jsonl`` (flushed once per committed step), averaged over the window. It
  includes everything a step costs: the parameter all-gather and after-step hooks (tier 3's
  checkpoint snapshot) that ``step_time_s`` does not, and periodic costs a median hides.
* ``step_s``: median of the rows' ``step_time_s`` (data -> commit).

Overhead of a variant = median over repeats of (variant / off - 1) in the same repeat;
min and max over repeats are reported as the spread. Writes ``docs/img/overhead.png``
(``--plot``). Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[2]
PRETRAIN = REPO / "recipes" / "pretrain.py"
TARGET = 0.02

# variant -> (launcher, checkpointless tier)
VARIANTS: dict[str, tuple[str, str]] = {
    "off": ("torchrun", "off"),
    "tier1": ("torchrun", "tier1"),
    "tier2": ("torchrun", "tier2"),
    "tier3": ("ncl-launch", "tier3"),
    "tier4": ("ncl-launch", "tier4"),
    "off@launch": ("ncl-launch", "off"),
}


class RowClock:
    """Wall time at which each line of rank 0's metrics.jsonl appeared (2 ms polling)."""

    def __init__(self, path: Path, period: float = 0.002) -> None:
        self.path, self.period = path, period
        self.times: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "RowClock":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        seen = 0
        while not self._stop.is_set():
            try:
                with open(self.path, "rb") as f:
                    lines = f.read().count(b"\n")
            except FileNotFoundError:
                lines = 0
            now = time.perf_counter()
            self.times.extend([now] * (lines - seen))
            seen = max(seen, lines)
            time.sleep(self.period)


def command(variant: str, recipe: str, steps: int, run_dir: Path,
            extra: list[str]) -> list[str]:
    from nemo_checkpointless.comm.world import free_port

    launcher, tier = VARIANTS[variant]
    overrides = [f"recipe={recipe}", f"checkpointless={tier}", f"trainer.max_steps={steps}",
                 *extra, f"hydra.run.dir={run_dir}"]
    if launcher == "torchrun":
        head = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4",
                "--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    else:
        head = [sys.executable, "-m", "nemo_checkpointless.launch.agent", "--nproc-per-node",
                "4", "--spares", "0", "--master-port", str(free_port())]
    return [*head, str(PRETRAIN), *overrides]


def run_once(variant: str, recipe: str, steps: int, warmup: int, run_dir: Path,
             extra: list[str], timeout: float) -> dict[str, Any]:
    """One run; its steady-state step times, or ``error`` with the log's last lines."""
    cmd = command(variant, recipe, steps, run_dir, extra)
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir.parent / f"{run_dir.name}.log"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.setdefault("NCL_HANG_TIMEOUT_S", "8")  # 2 shared cores: a slow rank is not hung
    t0 = time.perf_counter()
    with open(log_path, "w") as log, RowClock(run_dir / "metrics.jsonl") as clock:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                cwd=REPO, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            code = -9
    wall = time.perf_counter() - t0
    if code != 0:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-6:]
        return {"error": f"exit {code}: " + " | ".join(tail)[-600:], "log": str(log_path)}
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l]
    steady = [r["step_time_s"] for r in rows if r["step"] > warmup]
    times = clock.times
    if len(times) != len(rows) or len(steady) < 2:
        return {"error": f"{len(rows)} rows, {len(times)} observed", "log": str(log_path)}
    window = times[warmup:]  # rows of steps warmup+1 .. : intervals between them
    cadence = (window[-1] - window[0]) / (len(window) - 1)
    return {"cadence_s": cadence, "step_s": statistics.median(steady),
            "intervals_s": [round(b - a, 4) for a, b in zip(window, window[1:])],
            "first_step": warmup + 2,  # the row that closes intervals_s[0]
            "wall_s": round(wall, 2), "final_loss_hex": rows[-1]["loss_hex"]}


def checkpoint_interval(overrides: list[str]) -> int:
    """The durable checkpoint interval of these runs under ncl-launch: an override, else
    the default."""
    from nemo_checkpointless.checkpoint.config import DEFAULT_INTERVAL_STEPS

    for o in overrides:
        if o.startswith("checkpoint.interval="):
            return int(o.split("=", 1)[1])
    return DEFAULT_INTERVAL_STEPS


def checkpoint_share(run: dict[str, Any], interval: int) -> Optional[float]:
    """The disk checkpoints' share of a tier 3 run's step time, measured inside the run.

    A checkpoint is taken after step s (s % interval == 0); its cost lands in the step
    intervals closing on rows s and s + 1. Their excess over the mean of every other
    interval of the same run, per checkpoint, divided by ``interval`` mean steps. Being
    side by side in one run, it is immune to the run-to-run drift of a shared machine
    that dominates the spread of the cadence ratio.
    """
    near: list[float] = []
    other: list[float] = []
    for i, dt in enumerate(run["intervals_s"]):
        step = run["first_step"] + i
        (near if step % interval in (0, 1 % interval) else other).append(dt)
    if not near or not other or interval < 3:
        return None
    per_checkpoint = (sum(near) - len(near) * statistics.mean(other)) / (len(near) / 2)
    return per_checkpoint / (interval * statistics.mean(other))


def overheads(runs: dict[str, list[Optional[dict]]], key: str) -> dict[str, dict[str, float]]:
    """Per variant: median, min and max over repeats of (variant / off - 1) in one repeat."""
    out = {}
    for variant, per_repeat in runs.items():
        if variant == "off":
            continue
        ratios = [v[key] / o[key] - 1 for v, o in zip(per_repeat, runs["off"])
                  if v and o and key in v and key in o]
        if ratios:
            out[variant] = {"median": statistics.median(ratios), "min": min(ratios),
                            "max": max(ratios), "n": len(ratios)}
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    names = list(result["overhead_spread"])
    med = [100 * result["overhead_spread"][n]["median"] for n in names]
    lo = [100 * (result["overhead_spread"][n]["median"] - result["overhead_spread"][n]["min"])
          for n in names]
    hi = [100 * (result["overhead_spread"][n]["max"] - result["overhead_spread"][n]["median"])
          for n in names]
    colors = ["tab:green" if m <= 100 * TARGET else "tab:red" for m in med]
    ax1.bar(names, med, yerr=[lo, hi], capsize=5, color=colors)
    ax1.axhline(100 * TARGET, color="k", ls="--", lw=1, label="target 2%")
    ax1.axhline(0, color="k", lw=0.5)
    ax1.set_ylabel("overhead vs off, % (median; bars: min-max over repeats)")
    ax1.set_title("steady-state step cadence")
    ax1.legend()
    for variant, per_repeat in result["runs"].items():
        xs = [i for i, r in enumerate(per_repeat) if r and "cadence_s" in r]
        ax2.plot(xs, [per_repeat[i]["cadence_s"] for i in xs], "o-", label=variant)
    ax2.set_xlabel("repeat")
    ax2.set_ylabel("seconds per step (steady window)")
    ax2.set_title("per run (interleaved)")
    ax2.legend(fontsize=8)
    fig.suptitle(f"{result['recipe']}, 4 CPU ranks, {result['steps']} steps, "
                 f"warm-up {result['warmup']} excluded", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="bench_gpt")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=4,
                        help="first steps left out (imports, allocator, first checkpoint)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated subset of " + ", ".join(VARIANTS))
    parser.add_argument("--timeout", type=float, default=900, help="per run, seconds")
    parser.add_argument("--plot", default=str(REPO / "docs" / "img" / "overhead.png"),
                        help="PNG path ('' for none)")
    parser.add_argument("--out", default=None, help="run directories (default: a temp dir)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or "off" not in variants:
        parser.error(f"variants {unknown} unknown (or 'off' missing); choose from "
                     f"{', '.join(VARIANTS)}")
    root = Path(args.out or tempfile.mkdtemp(prefix="ncl-bench-overhead-"))
    runs: dict[str, list[Optional[dict]]] = {v: [] for v in variants}
    dropped: dict[str, str] = {}
    for r in range(args.repeats):
        k = r % len(variants)
        for variant in variants[k:] + variants[:k]:
            if variant in dropped:
                runs[variant].append(None)
                continue
            res = run_once(variant, args.recipe, args.steps, args.warmup,
                           root / f"r{r}-{variant.replace('@', '-')}", args.overrides,
                           args.timeout)
            if "error" in res:
                print(f"repeat {r} {variant:10s} FAILED: {res['error']}", flush=True)
                dropped[variant] = res["error"]
                runs[variant].append(None)
                continue
            runs[variant].append(res)
            print(f"repeat {r} {variant:10s} cadence {res['cadence_s']:.4f} s/step, "
                  f"median step_time_s {res['step_s']:.4f} s, run {res['wall_s']:.0f} s",
                  flush=True)
    if "off" in dropped:
        sys.exit(f"the baseline failed: {dropped['off']}")
    spread = overheads(runs, "cadence_s")
    spread_step = overheads(runs, "step_s")
    for v, s in spread.items():
        flag = "ok" if s["median"] <= TARGET else "ABOVE 2%"
        print(f"{v:10s} overhead {100 * s['median']:+6.2f}% (min {100 * s['min']:+.2f}%, max "
              f"{100 * s['max']:+.2f}%, n={s['n']}); step_time_s median "
              f"{100 * spread_step[v]['median']:+6.2f}%  {flag}")
    interval = checkpoint_interval(args.overrides)
    shares = [x for x in (checkpoint_share(r, interval) for r in runs.get("tier3", []) if r)
              if x is not None]
    if shares:
        print(f"tier3 disk checkpoints (every {interval} steps), measured inside each run: "
              f"{100 * statistics.median(shares):+.2f}% of step time (per run: "
              f"{', '.join(f'{100 * x:+.2f}%' for x in shares)})")
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    result = {
        "overhead": {v: round(s["median"], 4) for v, s in spread.items()},
        "overhead_spread": {v: {k: round(x, 4) if isinstance(x, float) else x
                                for k, x in s.items()} for v, s in spread.items()},
        "overhead_step_time_s": {v: round(s["median"], 4) for v, s in spread_step.items()},
        "cadence_s": {v: [round(x["cadence_s"], 4) if x else None for x in rs]
                      for v, rs in runs.items()},
        "step_time_s": {v: [round(x["step_s"], 4) if x else None for x in rs]
                        for v, rs in runs.items()},
        "tier3_checkpoint_share": {
            "interval": interval,
            "median": round(statistics.median(shares), 4) if shares else None,
            "per_run": [round(x, 4) for x in shares]},
        "dropped": dropped, "recipe": args.recipe, "steps": args.steps,
        "warmup": args.warmup, "repeats": args.repeats, "target": TARGET,
        "loadavg_end": load, "run_root": str(root),
        "command": " ".join([".venv/bin/python", "scripts/bench/overhead.py", *sys.argv[1:]]),
    }
    if args.plot:
        plot({**result, "runs": runs}, Path(args.plot))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
