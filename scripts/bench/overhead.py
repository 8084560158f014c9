"""Steady-state overhead of each tier: step time with the tier on vs off, interleaved runs.

    .venv/bin/python scripts/bench/overhead.py [--recipe bench_gpt] [--repeats 3] [--warmup 4]
    .venv/bin/python scripts/bench/overhead.py --recipe tiny_gpt_2opt --repeats 1 --warmup 2 \\
        --checkpoint-interval 4                                                 # quick

Same model for every variant (default ``recipe=bench_gpt``: 4 ranks, DP=4, 2
distributed-optimizer instances). Each variant is compared with its own baseline, the
same layout without checkpointless, in the same repeat:

* ``tier1`` (torchrun) against ``off`` (torchrun);
* ``tier2`` (torchrun) at TP=2 against ``off@tp2`` (torchrun, TP=2): tier 2's data cache
  has a reader only where tensor-parallel peers share a loader, so at TP=1 it is off
  (``train/data.py``) and tier 2 would measure nothing. That the cache was on is checked
  after each run from its files (each run gets its own cache root under ``/dev/shm``);
* ``tier3`` and ``tier4`` (only under ``ncl-launch``; no spares: a spare would be another
  GPU on a real cluster, not a process sharing these cores) against ``off``; their cost
  includes the durable checkpoints ``ncl-launch`` writes by default (every
  ``checkpoint.interval`` = 100 steps; tier 3 rolls back to them);
* ``off@launch`` (tier off under ncl-launch, durable checkpoints on as by default) against
  ``off``: the launcher's and the checkpoints' cost without a tier;
* ``tier4@nointerrupt`` (tier 4 with ``checkpointless.interrupt=off``) against ``tier4``:
  what the compute interrupt's module hooks cost (a negative overhead is their cost).

The run length makes the measured window exactly one checkpoint interval with its save
inside it (``--steps`` default: warmup + interval + 1); ``--checkpoint-interval N`` passes
``checkpoint.interval=N`` to every ncl-launch variant explicitly (and says so) for a
shorter run; a window without a save is refused.

Interleaving: ``for r in repeats: for variant in variants`` with the order rotated by one
each repeat, so slow drifts of a shared machine's load hit every variant alike.

Two step times per run, both over the steady window (rows after ``--warmup``):

* ``cadence_s`` (primary): wall time between rank 0's metrics rows, observed by polling
  ``metrics.jsonl`` (flushed once per committed step), averaged over the window. It
  includes everything a step costs: the parameter all-gather and after-step hooks (the
  durable save's blocking part) that ``step_time_s`` does not, and periodic costs a
  median hides.
* ``step_s``: median of the rows' ``step_time_s`` (data -> commit).

Overhead of a variant = median over repeats of (variant / baseline - 1) in the same
repeat, printed with its spread (min..max over repeats) next to it. For every variant
that writes durable checkpoints, the saves' share of step time is also measured inside
each run (the intervals next to a save against the others of the same run), which the
machine's drift between runs does not touch. Writes ``docs/img/overhead.png``
(``--plot``). Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _overhead_stats as stats  # noqa: E402
from _proc import run_in_session  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PRETRAIN = REPO / "recipes" / "pretrain.py"
TARGET = 0.02

TP2 = ["strategy.tensor_model_parallel_size=2"]


@dataclass(frozen=True)
class Variant:
    launcher: str  # torchrun or ncl-launch
    tier: str  # checkpointless=<tier>
    overrides: tuple[str, ...] = ()
    baseline: Optional[str] = None  # the variant it is compared with (None: a baseline)
    cache_expected: bool = False  # its data cache must be on (checked from its files)


VARIANTS: dict[str, Variant] = {
    "off": Variant("torchrun", "off"),
    "tier1": Variant("torchrun", "tier1", baseline="off"),
    "off@tp2": Variant("torchrun", "off", tuple(TP2)),
    "tier2": Variant("torchrun", "tier2", tuple(TP2), baseline="off@tp2", cache_expected=True),
    "tier3": Variant("ncl-launch", "tier3", baseline="off"),
    "tier4": Variant("ncl-launch", "tier4", baseline="off"),
    "off@launch": Variant("ncl-launch", "off", baseline="off"),
    # the A/B of one suspect: tier 4 without the compute interrupt's module hooks
    "tier4@nointerrupt": Variant("ncl-launch", "tier4", ("checkpointless.interrupt=off",),
                                 baseline="tier4"),
}


AB_ONLY = {"tier4@nointerrupt"}  # run when named in --variants, not by default


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


def command(variant: str, recipe: str, steps: int, run_dir: Path, extra: list[str],
            launch_extra: list[str], cache_root: Path, hang_timeout: float) -> list[str]:
    from nemo_checkpointless.comm.world import free_port

    v = VARIANTS[variant]
    overrides = [f"recipe={recipe}", f"checkpointless={v.tier}", f"trainer.max_steps={steps}",
                 *v.overrides, *extra, f"hydra.run.dir={run_dir}"]
    if v.tier in ("tier2", "tier3", "tier4"):
        overrides.append(f"checkpointless.data_cache.path={cache_root}")
    if v.launcher == "torchrun":
        head = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4",
                "--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    else:
        head = [sys.executable, "-m", "nemo_checkpointless.launch.agent", "--nproc-per-node",
                "4", "--spares", "0", "--master-port", str(free_port()),
                "--hang-timeout", f"{hang_timeout:g}"]
        overrides += launch_extra
    return [*head, str(PRETRAIN), *overrides]


def cache_was_on(cache_root: Path) -> bool:
    """Whether a data loader published step files under this run's own cache root (the
    shared-memory cache's layout: ``ncl-data-<job>/dp<D>-cp<C>-pp<P>/loader.lock``), and
    none was disabled. Removes the root."""
    try:
        coords = [d for d in cache_root.glob("ncl-data-*/dp*") if d.is_dir()]
        on = bool(coords) and all((d / "loader.lock").exists() and not (d / "DISABLED").exists()
                                  for d in coords)
    finally:
        shutil.rmtree(cache_root, ignore_errors=True)
    return on


def run_once(variant: str, recipe: str, steps: int, warmup: int, run_dir: Path,
             extra: list[str], launch_extra: list[str], cache_root: Path,
             timeout: float, hang_timeout: float) -> dict[str, Any]:
    """One run; its steady-state step times, or ``error`` with the log's last lines."""
    cmd = command(variant, recipe, steps, run_dir, extra, launch_extra, cache_root,
                  hang_timeout)
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir.parent / f"{run_dir.name}.log"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    with RowClock(run_dir / "metrics.jsonl") as clock:
        code = run_in_session(cmd, log_path, cwd=REPO, env=env, timeout=timeout)
    wall = time.perf_counter() - t0
    cache_on = cache_was_on(cache_root)
    if code != 0:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-6:]
        return {"error": f"exit {code}: " + " | ".join(tail)[-600:], "log": str(log_path)}
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l]
    steady = [r["step_time_s"] for r in rows if r["step"] > warmup]
    measured = stats.window_cadence(clock.times, warmup)
    if len(clock.times) != len(rows) or len(steady) < 2 or measured is None:
        return {"error": f"{len(rows)} rows, {len(clock.times)} observed", "log": str(log_path)}
    cadence, intervals = measured
    checkpoints = sorted(int(d.name[5:]) for d in (run_dir / "checkpoints").glob("iter_*")
                         if (d / "ncl_manifest.json").exists())
    return {"cadence_s": cadence, "step_s": statistics.median(steady),
            "intervals_s": [round(dt, 4) for dt in intervals],
            "first_step": warmup + 2,  # the row that closes intervals_s[0]
            "wall_s": round(wall, 2), "final_loss_hex": rows[-1]["loss_hex"],
            "data_cache_on": cache_on, "complete_checkpoints": checkpoints}


def checkpoint_interval(variants: list[str], explicit: Optional[int]) -> Optional[int]:
    """The durable checkpoint interval of the ncl-launch variants: the one passed
    explicitly, else ncl-launch's default; None when no variant runs under ncl-launch."""
    from nemo_checkpointless.checkpoint.config import DEFAULT_INTERVAL_STEPS

    if not any(VARIANTS[v].launcher == "ncl-launch" for v in variants):
        return None
    return explicit if explicit is not None else DEFAULT_INTERVAL_STEPS


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    names = list(result["overhead_spread"])
    ticks = [label(n) for n in names]
    med = [100 * result["overhead_spread"][n]["median"] for n in names]
    lo = [100 * (result["overhead_spread"][n]["median"] - result["overhead_spread"][n]["min"])
          for n in names]
    hi = [100 * (result["overhead_spread"][n]["max"] - result["overhead_spread"][n]["median"])
          for n in names]
    colors = ["tab:green" if m <= 100 * TARGET else "tab:red" for m in med]
    ax1.bar(ticks, med, yerr=[lo, hi], capsize=5, color=colors)
    ax1.tick_params(axis="x", labelsize=8)
    ax1.axhline(100 * TARGET, color="k", ls="--", lw=1, label="target 2%")
    ax1.axhline(0, color="k", lw=0.5)
    for x, n in enumerate(names):
        sp = result["overhead_spread"][n]
        ax1.annotate(f"{100 * sp['median']:+.1f}%\n({100 * sp['min']:+.1f}..{100 * sp['max']:+.1f})",
                     (x, 100 * sp["max"]), ha="center", va="bottom", fontsize=7,
                     xytext=(0, 3), textcoords="offset points")
    ax1.margins(y=0.15)
    ax1.set_ylabel("overhead vs baseline, %\n(median; bars: min..max over repeats)")
    ax1.set_title("steady-state step cadence")
    ax1.legend()
    for variant, per_repeat in result["runs"].items():
        xs = [i for i, r in enumerate(per_repeat) if r and "cadence_s" in r]
        ax2.plot(xs, [per_repeat[i]["cadence_s"] for i in xs], "o-", label=label(variant))
    ax2.set_xlabel("repeat")
    ax2.set_ylabel("seconds per step (steady window)")
    ax2.set_title("per run (interleaved)")
    ax2.legend(fontsize=8)
    every = result["checkpoint_interval"]
    fig.suptitle(f"{result['recipe']}, 4 CPU ranks, {result['steps']} steps, warm-up "
                 f"{result['warmup']} excluded; tier2 at TP=2 against off at TP=2; ncl-launch "
                 f"variants save a durable checkpoint every {every} steps", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def label(variant: str) -> str:
    v = VARIANTS[variant]
    return f"{variant} (TP=2)" if v.overrides == tuple(TP2) and "tp2" not in variant else variant


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="bench_gpt")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None,
                        help="default: warmup + checkpoint interval + 1 (one save interval, "
                             "its save inside, in the measured window)")
    parser.add_argument("--warmup", type=int, default=4,
                        help="first steps left out (imports, allocator, first plans)")
    parser.add_argument("--checkpoint-interval", type=int, default=None,
                        help="pass checkpoint.interval=N to every ncl-launch variant "
                             "(default: ncl-launch's default interval, not passed)")
    parser.add_argument("--variants", default=",".join(v for v in VARIANTS if v not in AB_ONLY),
                        help="comma-separated subset of " + ", ".join(VARIANTS)
                             + " (baselines are added as needed)")
    parser.add_argument("--timeout", type=float, default=1800, help="per run, seconds")
    parser.add_argument("--hang-timeout", type=float, default=8.0,
                        help="ncl-launch --hang-timeout (2 shared cores: a slow rank is not hung)")
    parser.add_argument("--plot", default=str(REPO / "docs" / "img" / "overhead.png"),
                        help="PNG path ('' for none)")
    parser.add_argument("--out", default=None, help="run directories (default: a temp dir)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"variants {unknown} unknown; choose from {', '.join(VARIANTS)}")
    for v in list(variants):
        base = VARIANTS[v].baseline
        if base is not None and base not in variants:
            variants.insert(0, base)
    if any(o.startswith("checkpoint.interval=") for o in args.overrides):
        parser.error("pass the durable checkpoint interval with --checkpoint-interval N (it "
                     "goes to the ncl-launch variants only, and the window is sized by it)")
    interval = checkpoint_interval(variants, args.checkpoint_interval)
    steps = args.steps or (stats.default_steps(args.warmup, interval) if interval else 20)
    saves = stats.saves_in_window(args.warmup, steps, interval)
    if interval and not saves:
        parser.error(f"--steps {steps} with --warmup {args.warmup}: no durable save (every "
                     f"{interval} steps) lands in the measured window, so tier 3's cost "
                     f"would be missed; use --steps {stats.default_steps(args.warmup, interval)} "
                     "or a smaller --checkpoint-interval")
    launch_extra = ([f"checkpoint.interval={args.checkpoint_interval}"]
                    if args.checkpoint_interval is not None else [])
    if interval:
        how = ("passed explicitly: checkpoint.interval=" + str(interval)
               if args.checkpoint_interval is not None else "ncl-launch's default")
        print(f"durable checkpoints of the ncl-launch variants every {interval} steps ({how}); "
              f"{steps} steps, window = rows {args.warmup + 1}..{steps}, saves after steps "
              f"{saves} inside it", flush=True)
    root = Path(args.out or tempfile.mkdtemp(prefix="ncl-bench-overhead-"))
    shm = Path(tempfile.mkdtemp(prefix="ncl-bench-overhead-", dir="/dev/shm"))
    runs: dict[str, list[Optional[dict]]] = {v: [] for v in variants}
    dropped: dict[str, str] = {}
    try:
        for r in range(args.repeats):
            k = r % len(variants)
            for variant in variants[k:] + variants[:k]:
                if variant in dropped:
                    runs[variant].append(None)
                    continue
                name = f"r{r}-{variant.replace('@', '-')}"
                res = run_once(variant, args.recipe, steps, args.warmup, root / name,
                               args.overrides, launch_extra, shm / name, args.timeout,
                               args.hang_timeout)
                if "error" not in res and VARIANTS[variant].cache_expected \
                        and not res["data_cache_on"]:
                    res = {"error": "the data cache was off (no loader files under its root)"}
                if "error" in res:
                    print(f"repeat {r} {variant:10s} FAILED: {res['error']}", flush=True)
                    dropped[variant] = res["error"]
                    runs[variant].append(None)
                    continue
                runs[variant].append(res)
                print(f"repeat {r} {variant:10s} cadence {res['cadence_s']:.4f} s/step, "
                      f"median step_time_s {res['step_s']:.4f} s, run {res['wall_s']:.0f} s"
                      + (", data cache on" if res["data_cache_on"] else "")
                      + (f", complete checkpoints {res['complete_checkpoints']}"
                         if res["complete_checkpoints"] else ""), flush=True)
    finally:
        shutil.rmtree(shm, ignore_errors=True)
    for base in {VARIANTS[v].baseline or v for v in variants if not VARIANTS[v].baseline}:
        if base in dropped:
            sys.exit(f"the baseline {base} failed: {dropped[base]}")
    baselines = {v: VARIANTS[v].baseline for v in variants}
    spread = stats.overheads(runs, baselines, "cadence_s")
    spread_step = stats.overheads(runs, baselines, "step_s")
    print("per variant: median cadence over repeats (min..max); overhead against its baseline "
          "in the same repeat, median (min..max over repeats)")
    for v in variants:
        cad = stats.summary(runs[v], "cadence_s")
        if cad is None:
            print(f"{label(v):14s} not run ({dropped.get(v, 'no result')})")
            continue
        line = f"{label(v):14s} cadence {stats.seconds_spread(cad)}"
        if v in spread:
            s = spread[v]
            flag = "ok" if s["median"] <= TARGET else "ABOVE 2%"
            line += (f"  overhead vs {baselines[v]}: {stats.percent_spread(s)}; step_time_s "
                     f"{stats.percent_spread(spread_step[v])}  {flag}")
        print(line)
    shares: dict[str, list[float]] = {}
    for v in variants:
        if VARIANTS[v].launcher != "ncl-launch":
            continue
        per_run = [stats.checkpoint_share(r["intervals_s"], r["first_step"], interval)
                   for r in runs[v] if r]
        shares[v] = [x for x in per_run if x is not None]
        if shares[v]:
            print(f"{v}: durable saves (every {interval} steps), measured inside each run: "
                  f"{stats.percent_spread(stats.spread(shares[v]))} of step time")
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    result = {
        "overhead": {v: round(s["median"], 4) for v, s in spread.items()},
        "overhead_spread": {v: {k: round(x, 4) if isinstance(x, float) else x
                                for k, x in s.items()} for v, s in spread.items()},
        "overhead_step_time_s": {v: round(s["median"], 4) for v, s in spread_step.items()},
        "overhead_step_time_s_spread": {v: {k: round(x, 4) if isinstance(x, float) else x
                                            for k, x in s.items()}
                                        for v, s in spread_step.items()},
        "baselines": {v: b for v, b in baselines.items() if b},
        "layouts": {v: list(VARIANTS[v].overrides) for v in variants},
        "cadence_s": {v: [round(x["cadence_s"], 4) if x else None for x in rs]
                      for v, rs in runs.items()},
        "step_time_s": {v: [round(x["step_s"], 4) if x else None for x in rs]
                        for v, rs in runs.items()},
        "data_cache_on": {v: [x["data_cache_on"] if x else None for x in rs]
                          for v, rs in runs.items()},
        "checkpoint_interval": interval,
        "checkpoint_interval_explicit": args.checkpoint_interval is not None,
        "saves_in_window": saves,
        "checkpoint_share": {
            v: {"median": round(statistics.median(x), 4) if x else None,
                "min": round(min(x), 4) if x else None, "max": round(max(x), 4) if x else None,
                "per_run": [round(y, 4) for y in x]} for v, x in shares.items()},
        "not_run": {v: dropped[v] for v in dropped},
        "recipe": args.recipe, "steps": steps,
        "warmup": args.warmup, "repeats": args.repeats, "target": TARGET,
        "loadavg_end": load, "run_root": str(root),
        "command": " ".join([".venv/bin/python", "scripts/bench/overhead.py", *sys.argv[1:]]),
    }
    if args.plot:
        plot({**result, "runs": runs}, Path(args.plot))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
