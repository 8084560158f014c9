"""``python -m nemo_checkpointless.simulate [--sizes 16,256,2304] [--assume k=v,...] [--json]``

Predicts the recovery time of one lost rank of Llama-3 70B at each size, checkpointless and
checkpoint-restart, next to the published figures, with the physical floor and the
dominant term of each. ``--list`` prints every assumption with its default and source.
Exit code 2 for a bad assumption or size (the message names the valid ones).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from typing import Any

from .assumptions import ASSUMPTIONS, AssumptionError, resolve
from .model import DRIVERS, PUBLISHED, SIZES, Prediction, fmt_seconds, predict_all


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def render(preds: list[Prediction], a: dict[str, Any], changed: dict[str, Any]) -> str:
    out = [f"Recovery of one lost rank, {a['recipe']}: predicted (this model) vs published",
           ""]
    other = preds[0].other_mode if preds else ""
    head = (f"{'GPUs':>5}  {'ours':>8}  {'ours*':>8}  {'restart':>8}  "
            f"{'published ours/restart':>23}  "
            f"{'floor':>7}  {'dominant (ours)':<18} {'dominant (restart)':<18}")
    out += [head, "-" * len(head)]
    for p in preds:
        pub = PUBLISHED.get(p.gpus)
        pub_text = f"{pub[2]} / {pub[3]}" if pub else "-"
        alt = fmt_seconds(sum(p.ours_other.values()))
        out.append(f"{p.gpus:>5}  {fmt_seconds(p.ours_s):>8}  {alt:>8}  "
                   f"{fmt_seconds(p.restart_s):>8}  "
                   f"{pub_text:>23}  {p.floor_s:>6.2f}s  {Prediction.dominant(p.ours):<18} "
                   f"{Prediction.dominant(p.restart):<18}")
    out.append("")
    out.append("ours = fault to first step after it, one rank replaced in process; restart = "
               "fault to first step of the relaunched job (downtime; lost work below).")
    out.append(f"ours* = the same with group_rebuild={other} (groups rebuilt "
               f"{'by their members only' if other == 'members' else 'as world-wide splits'}).")
    out.append("floor = (optimizer shard + bf16 params of one rank) / one GPU link at line "
               "rate.")
    for p in preds:
        j, lay = p.job, p.job.layout
        out += ["", f"{p.gpus} GPUs = {j.nodes} nodes: TP{lay.tp} PP{lay.pp}"
                f"{f' VP{lay.vp}' if lay.vp else ''} CP{lay.cp} DP{lay.dp}, {lay.instances} "
                f"optimizer instance(s); per rank {_gb(j.optimizer_bytes_per_rank)} optimizer "
                f"shard + {_gb(j.param_bytes_per_rank)} bf16 params; {j.groups_total} NCCL "
                "groups"]
        if j.layout_note:
            out.append(f"  layout: {j.layout_note}")
        for label, phases in (("ours", p.ours), ("restart", p.restart)):
            total = sum(phases.values())
            parts = ", ".join(f"{k} {fmt_seconds(v)}" for k, v in phases.items())
            out.append(f"  {label:8s}{fmt_seconds(total):>8}  = {parts}")
        out.append(f"  lost work: ours {fmt_seconds(p.lost_work_ours_s)} (half the in-flight "
                   f"step of {fmt_seconds(p.step_s)}"
                   + ("" if j.protected else " + half a checkpoint interval")
                   + f"), restart {fmt_seconds(p.lost_work_restart_s)} (half a checkpoint "
                   "interval + half a step)")
        out.append("  " + _gap_line(p))
    out += ["", "Assumptions (--assume name=value; --list for sources):"]
    out.append("  " + ", ".join(f"{x.name}={a[x.name]}{'*' if x.name in changed else ''}"
                                for x in ASSUMPTIONS))
    if changed:
        out.append("  * changed on the command line")
    return "\n".join(out)


def _gap_line(p: Prediction) -> str:
    pub = PUBLISHED.get(p.gpus)
    if not pub:
        return "no published figure at this size"
    words = []
    for label, predicted, phases, (lo, hi) in (("ours", p.ours_s, p.ours, pub[0]),
                                               ("restart", p.restart_s, p.restart, pub[1])):
        top = sorted(phases, key=phases.__getitem__, reverse=True)[:2]
        drivers = sorted({d for t in top for d in DRIVERS.get(t, ())})
        where = ("within" if lo <= predicted <= hi else "below" if predicted < lo else "above")
        words.append(f"{label} {where} published ({fmt_seconds(predicted)} vs "
                     f"{pub[2] if label == 'ours' else pub[3]}): driven by {' + '.join(top)} "
                     f"[{', '.join(drivers)}]")
    return "gap: " + "; ".join(words)


def list_assumptions() -> str:
    lines = []
    for x in ASSUMPTIONS:
        lines.append(f"{x.name} = {x.default} {x.unit}".rstrip())
        lines.append(f"    {x.source}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m nemo_checkpointless.simulate",
                                     description=__doc__.splitlines()[2])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)),
                        help="comma-separated GPU counts (default: the published sizes)")
    parser.add_argument("--assume", action="append", default=[], metavar="NAME=VALUE",
                        help="override an assumption (repeatable, or comma-separated)")
    parser.add_argument("--json", action="store_true", help="one JSON object")
    parser.add_argument("--list", action="store_true", help="every assumption and its source")
    args = parser.parse_args(argv)
    if args.list:
        print(list_assumptions())
        return 0
    try:
        a = resolve(args.assume)
        sizes = tuple(int(x) for x in args.sizes.split(",") if x.strip())
        if not sizes or min(sizes) < 1:
            raise AssumptionError(f"--sizes {args.sizes!r}: positive GPU counts, e.g. 16,256")
    except (AssumptionError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    changed = {k: v for k, v in a.items() if v != resolve()[k]}
    warnings.filterwarnings("ignore")
    from ..config import ConfigError

    try:
        preds = predict_all(sizes, a)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"recipe": a["recipe"], "assumptions": a,
                          "predictions": [p.to_dict() for p in preds]}))
    else:
        print(render(preds, a, changed))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
