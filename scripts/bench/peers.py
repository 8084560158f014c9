"""Recovery of one SIGKILLed rank: ours vs torchft vs nvidia-resiliency-ext, side by side.

    .venv/bin/python scripts/bench/peers.py [--steps 12] [--kill-step 4] [--only ours,torchft,nvrx]
    .venv/bin/python scripts/bench/peers.py --steps 6 --kill-step 3 --variants tuned,warm  # quick

The same job for all three: a 27,795,968-parameter GPT (bench_gpt's shapes; Adam, fp32),
4 data-parallel ranks on gloo, global batch 8, rank 1 SIGKILLed in the optimizer phase
of step ``--kill-step`` (1-based; the peers' workers count from 0 and kill at index
kill_step - 1). Ours runs the real recipe through ncl-launch with one warm spare; the peers
run a plain PyTorch copy of the model (``scripts/bench/peers/common.py``), each library in
its own venv (``.venv-bench-torchft``, ``.venv-bench-nvrx``, created here on first use with
torch==2.13.0 installed first and pinned).

Per library: a fault-free reference run, then faulted runs (``--variants``):

* ``default``: the library's documented default settings;
* ``tuned``: its timeouts tuned to this machine;
* ``warm`` (torchft only): tuned, ``min_replicas`` = the replica count (lighthouse and
  every Manager), so the survivors wait for the replacement instead of training on with
  fewer replicas, and a replacement process started with the job that has built its model
  and waits (``torchft_worker.py --standby``), as our warm spare does: the comparison with
  ours on equal terms. ``default`` and ``tuned`` keep ``min_replicas=1`` and a
  replacement started cold after the kill.

Figures, from timestamps the processes write (``time.time()``, one machine): kill ->
first step completed after it, torchft's survivors and its healed replacement apart
(``_peers_report.measure``); what is restored; whether the final state (parameters + Adam
moments, sha256) equals the reference bit for bit. nvidia-resiliency-ext's time on gloo is
the gloo timeout this script gives its process group (printed with it). Writes
docs/img/peers.png. Last line: JSON.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "peers"))
import runs  # noqa: E402
from _peers_report import measure, nvrx_line, torchft_line  # noqa: E402

TORCH = "torch==2.13.0"
LIBS = {"torchft": "torchft==0.2.0", "nvrx": "nvidia-resiliency-ext==0.4.1"}
RESTORES = {
    "torchft": "model + Adam state, healed from a live peer replica over HTTP (Manager "
               "state_dict)",
    "nvrx": "nothing for the spare: it gets rank 0's parameters only because DDP broadcasts "
            "them at construction; Adam moments start from zero (0.4.1 restores no state)",
}


def ensure_venv(name: str) -> Path:
    """``.venv-bench-<name>`` with torch 2.13.0 (CPU) first, then the library pinned to it."""
    venv = REPO / f".venv-bench-{name}"
    py = venv / "bin" / "python"
    pkg = LIBS[name]
    if py.exists() and subprocess.run([str(py), "-m", "pip", "show", "-q", pkg.split("==")[0]],
                                      capture_output=True).returncode == 0:
        return venv
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run(pip + [TORCH], check=True)
    constraints = venv / "constraints.txt"
    constraints.write_text(TORCH + "\n")
    subprocess.run(pip + ["-c", str(constraints), pkg, "numpy"], check=True)
    return venv


def _done(out: Path) -> bool:
    """A finished run left by an earlier invocation with the same --out (reused)."""
    return out.is_dir() and any(e["event"] == "final" for e in runs.read_timelines(out))


# variant -> how the library's runs are driven (torchft: runs.run_torchft keywords)
TORCHFT_VARIANTS = {
    "default": ("documented defaults, min_replicas=1, cold replacement", dict(tuned=False)),
    "tuned": ("tuned timeouts, min_replicas=1, cold replacement", dict(tuned=True)),
    "warm": (f"tuned, min_replicas={runs.WORLD}, warm replacement",
             dict(tuned=True, min_replicas=runs.WORLD, warm=True)),
}
NVRX_VARIANTS = {"default": ("documented defaults", dict(tuned=False)),
                 "tuned": ("tuned intervals and timeouts", dict(tuned=True))}


def variants_of(lib: str) -> dict[str, tuple[str, dict]]:
    return TORCHFT_VARIANTS if lib == "torchft" else NVRX_VARIANTS


def run_peer(lib: str, root: Path, steps: int, kill_index: int, wanted: list[str]) -> dict:
    venv = ensure_venv(lib)
    go = runs.run_torchft if lib == "torchft" else runs.run_nvrx
    kw = {"min_replicas": runs.WORLD} if lib == "torchft" else {}
    if not _done(root / f"{lib}_ref"):
        go(venv, root / f"{lib}_ref", steps=steps, kill_step=-1, tuned=True, **kw)
    ref = runs.read_timelines(root / f"{lib}_ref")
    result: dict = {"restores": RESTORES[lib]}
    for variant, (label, how) in variants_of(lib).items():
        if variant not in wanted:
            continue
        out = root / f"{lib}_{variant}"
        try:
            if not _done(out):
                go(venv, out, steps=steps, kill_step=kill_index, **how)
            result[variant] = measure(runs.read_timelines(out), ref, lib)
        except Exception as e:  # a library that cannot recover here is a result too
            result[variant] = {"error": f"{type(e).__name__}: {e}"}
        result[variant]["settings"] = label
        if lib == "nvrx":
            result[variant]["gloo_timeout_s"] = runs.NVRX_GLOO_TIMEOUT_S[variant]
            print(nvrx_line(variant, label, result[variant],
                            runs.NVRX_GLOO_TIMEOUT_S[variant]), flush=True)
        else:
            print(torchft_line(variant, label, result[variant]), flush=True)
    return result


def plot(figures: list, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, values, colors = [], [], []
    for name, value, exact in figures:
        labels.append(name)
        values.append(value if value is not None else 0.0)
        colors.append("tab:green" if exact else "tab:red")
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.45 * max(3, len(figures))))
    bars = ax.barh(labels, values, color=colors)
    for bar, (_, value, exact) in zip(bars, figures):
        text = "no figure (see JSON)" if value is None else f"{value:.2f} s, {'exact' if exact else 'not exact'}"
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, " " + text, va="center")
    ax.invert_yaxis()
    ax.set_xlabel("kill -> first completed training step (s)")
    ax.set_title("One rank SIGKILLed, 27.8 M params + Adam, 4 gloo ranks (green: bit-for-bit)")
    ax.set_xlim(0, max(values + [1.0]) * 1.45)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--kill-step", type=int, default=4, help="1-based, as our step counter")
    parser.add_argument("--only", default="ours,torchft,nvrx")
    parser.add_argument("--variants", default="default,tuned,warm",
                        help="the peers' faulted runs: default, tuned, warm (torchft only)")
    parser.add_argument("--out", help="run directory; finished runs found there are reused")
    parser.add_argument("--png", default=str(REPO / "docs" / "img" / "peers.png"))
    args = parser.parse_args()
    only = [x for x in args.only.split(",") if x]
    wanted = [v for v in args.variants.split(",") if v]
    unknown = [v for v in wanted if v not in TORCHFT_VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {', '.join(TORCHFT_VARIANTS)}")
    if any(x not in ("ours", "torchft", "nvrx") for x in only):
        parser.error("--only: a comma-separated subset of ours, torchft, nvrx")
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="ncl-bench-peers-"))
    print(f"runs under {root}", flush=True)
    res: dict = {}
    if "ours" in only:
        import _ours
        res["ours"] = _ours.compare(args.steps, args.kill_step, root)
        print(f"ours (ncl-launch, 1 warm spare that built its model ahead): "
              f"{res['ours']['s']:.2f} s; {'exact' if res['ours']['exact'] else 'NOT exact'}",
              flush=True)
    for lib in ("torchft", "nvrx"):
        if lib in only:
            res[lib] = run_peer(lib, root, args.steps, args.kill_step - 1, wanted)

    def pick(lib: str, variant: str, key: str):
        return res.get(lib, {}).get(variant, {}).get(key)

    torchft = {v: {"settings": TORCHFT_VARIANTS[v][0],
                   "survivors_s": pick("torchft", v, "survivors_first_step_s"),
                   "replacement_s": pick("torchft", v, "replacement_first_step_s"),
                   "exact": pick("torchft", v, "exact")}
               for v in TORCHFT_VARIANTS if v in res.get("torchft", {})}
    nvrx = {v: {"settings": NVRX_VARIANTS[v][0], "s": pick("nvrx", v, "first_step_s"),
                "gloo_timeout_s": runs.NVRX_GLOO_TIMEOUT_S[v], "exact": pick("nvrx", v, "exact")}
            for v in NVRX_VARIANTS if v in res.get("nvrx", {})}
    summary = {
        "ours_s": res.get("ours", {}).get("s"), "ours_exact": res.get("ours", {}).get("exact"),
        # on equal terms with ours: min_replicas = replicas, a warm replacement
        "torchft_warm_survivors_s": torchft.get("warm", {}).get("survivors_s"),
        "torchft_warm_replacement_s": torchft.get("warm", {}).get("replacement_s"),
        "torchft_warm_exact": torchft.get("warm", {}).get("exact"),
        "torchft": torchft, "nvrx": nvrx,
        "nvrx_note": "on gloo, nvidia-resiliency-ext's time is dominated by the gloo timeout "
                     "this script sets (gloo_timeout_s): its abort shuts down NCCL backends "
                     "only, so a rank blocked in a collective with the dead rank waits for it",
        "restores": {"ours": res.get("ours", {}).get("restores"), **RESTORES},
        "parameters": 27_795_968, "ranks": 4, "kill_step": args.kill_step, "steps": args.steps,
        "details": res,
    }
    figures = []
    if "ours" in only:
        figures.append(("ours (ncl-launch, 1 warm spare)", summary["ours_s"],
                        summary["ours_exact"]))
    for v, r in torchft.items():
        figures.append((f"torchft {v}: survivors resume", r["survivors_s"], r["exact"]))
        figures.append((f"torchft {v}: healed replacement", r["replacement_s"], r["exact"]))
    for v, r in nvrx.items():
        figures.append((f"nvrx {v} (gloo timeout {r['gloo_timeout_s']:.0f} s)", r["s"],
                        r["exact"]))
    plot(figures, Path(args.png))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
