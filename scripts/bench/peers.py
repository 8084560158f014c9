"""Recovery of one SIGKILLed rank: ours vs torchft vs nvidia-resiliency-ext, side by side.

    .venv/bin/python scripts/bench/peers.py [--steps 12] [--kill-step 4] [--only ours,torchft,nvrx]

The same job for all three: a 27,795,968-parameter GPT (bench_gpt's shapes; Adam, fp32),
4 data-parallel ranks on gloo, global batch 8, rank 1 SIGKILLed in the optimizer phase
of step ``--kill-step`` (1-based; the peers' workers count from 0 and kill at index
kill_step - 1). Ours runs the real recipe through ncl-launch with one warm spare; the peers
run a plain PyTorch copy of the model (``scripts/bench/peers/common.py``), each library in
its own venv (``.venv-bench-torchft``, ``.venv-bench-nvrx``, created here on first use with
torch==2.13.0 installed first and pinned).

Per library: a fault-free reference run, then the faulted run with the library's
documented default settings and with its timeouts tuned. Figures, from timestamps the
processes write (``time.time()``, one machine): kill -> first completed step after it;
what is restored; whether the final state (parameters + Adam moments, sha256) equals the
reference bit for bit. Writes docs/img/peers.png. Last line: JSON.
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

TORCH = "torch==2.13.0"
LIBS = {"torchft": "torchft==0.2.0", "nvrx": "nvidia-resiliency-ext==0.4.1"}
RESTORES = {
    "torchft": "model + Adam state, healed from a live peer replica over HTTP (Manager state_dict)",
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


def _final_hashes(events: list[dict]) -> set[str]:
    return {e["sha256"] for e in events if e["event"] == "final"}


def measure(events: list[dict], ref_events: list[dict], lib: str) -> dict:
    """Kill -> first step after it, from the timelines; exactness against the reference."""
    kill = next(e for e in events if e["event"] == "kill")
    # Steps after the killed one: the healthy ranks may still commit the killed step itself
    # (their all-reduce had completed), which is no sign of recovery.
    after = [e for e in events if e["event"] == "step" and e["t"] > kill["t"]
             and e["step"] > kill["step"]]
    hashes, ref = _final_hashes(events), _final_hashes(ref_events)
    out = {"first_step_s": round(after[0]["t"] - kill["t"], 3) if after else None,
           "ranks_agree": len(hashes) == 1,
           "exact": len(ref) == 1 and hashes == ref,
           "kill_step_index": kill["step"]}
    if lib == "torchft":
        # The replacement is back once it steps inside a quorum with the survivors (healed or
        # with other participants); one that starts after they finished trains alone from
        # step 0 and proves nothing: then this stays None (raise --steps).
        back = [e for e in after if e["source"].endswith("_restarted")
                and (e["healed"] or e["participants"] > 1)]
        out["replacement_first_step_s"] = round(back[0]["t"] - kill["t"], 3) if back else None
        out["participants_per_step"] = [e["participants"] for e in events
                                        if e["event"] == "step" and e["source"] == "replica0"]
    else:
        starts = [e for e in events if e["event"] == "fn_start" and e["t"] > kill["t"]]
        out["spare_had_state"] = any(e["has_state"] for e in starts if e["source"] == "rank4")
        out["restart_iteration"] = max((e["iteration"] for e in starts), default=0)
    return out


def _done(out: Path) -> bool:
    """A finished run left by an earlier invocation with the same --out (reused)."""
    return out.is_dir() and any(e["event"] == "final" for e in runs.read_timelines(out))


def run_peer(lib: str, root: Path, steps: int, kill_index: int) -> dict:
    venv = ensure_venv(lib)
    go = runs.run_torchft if lib == "torchft" else runs.run_nvrx
    kw = {"min_replicas": runs.WORLD} if lib == "torchft" else {}
    if not _done(root / f"{lib}_ref"):
        go(venv, root / f"{lib}_ref", steps=steps, kill_step=-1, tuned=True, **kw)
    ref = runs.read_timelines(root / f"{lib}_ref")
    result = {"restores": RESTORES[lib]}
    for variant in ("default", "tuned"):
        out = root / f"{lib}_{variant}"
        try:
            if not _done(out):
                go(venv, out, steps=steps, kill_step=kill_index, tuned=variant == "tuned")
            result[variant] = measure(runs.read_timelines(out), ref, lib)
        except Exception as e:  # a library that cannot recover here is a result too
            result[variant] = {"error": f"{type(e).__name__}: {e}"}
        print(f"{lib} {variant}: {json.dumps(result[variant])}", flush=True)
    return result


def plot(figures: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, values, colors = [], [], []
    for name, value, exact in figures:
        labels.append(name)
        values.append(value if value is not None else 0.0)
        colors.append("tab:green" if exact else "tab:red")
    fig, ax = plt.subplots(figsize=(9, 4.2))
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
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--kill-step", type=int, default=4, help="1-based, as our step counter")
    parser.add_argument("--only", default="ours,torchft,nvrx")
    parser.add_argument("--out", help="run directory; finished runs found there are reused")
    parser.add_argument("--png", default=str(REPO / "docs" / "img" / "peers.png"))
    args = parser.parse_args()
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="ncl-bench-peers-"))
    print(f"runs under {root}", flush=True)
    only = args.only.split(",")
    res: dict = {}
    if "ours" in only:
        import _ours
        res["ours"] = _ours.compare(args.steps, args.kill_step, root)
        print(f"ours: {json.dumps(res['ours'])}", flush=True)
    for lib in ("torchft", "nvrx"):
        if lib in only:
            res[lib] = run_peer(lib, root, args.steps, args.kill_step - 1)

    def pick(lib: str, variant: str, key: str = "first_step_s"):
        return res.get(lib, {}).get(variant, {}).get(key)

    summary = {
        "ours_s": res.get("ours", {}).get("s"),
        "torchft_s": pick("torchft", "tuned", "replacement_first_step_s"),
        "nvrx_s": pick("nvrx", "tuned"),
        "ours_exact": res.get("ours", {}).get("exact"),
        "torchft_default_s": pick("torchft", "default", "replacement_first_step_s"),
        "torchft_survivors_default_s": pick("torchft", "default"),
        "torchft_survivors_tuned_s": pick("torchft", "tuned"),
        "torchft_exact": {v: pick("torchft", v, "exact") for v in ("default", "tuned")},
        "nvrx_default_s": pick("nvrx", "default"),
        "nvrx_exact": {v: pick("nvrx", v, "exact") for v in ("default", "tuned")},
        "restores": {"ours": res.get("ours", {}).get("restores"), **RESTORES},
        "parameters": 27_795_968, "ranks": 4, "kill_step": args.kill_step, "steps": args.steps,
        "details": res,
    }
    figures = [("ours (ncl-launch, 1 spare)", summary["ours_s"], summary["ours_exact"])]
    for lib, key, label in (("torchft", "replacement_first_step_s", "torchft {}: replacement back"),
                            ("torchft", "first_step_s", "torchft {}: survivors (3 of 4)"),
                            ("nvrx", "first_step_s", "nvrx {}")):
        for v in ("default", "tuned"):
            figures.append((label.format(v), pick(lib, v, key), pick(lib, v, "exact")))
    plot([f for f in figures if f[0].split()[0] in only], Path(args.png))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
