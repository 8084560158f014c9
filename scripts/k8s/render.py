"""Fill the placeholders of pytorchjob.yaml or jobset.yaml and print plain YAML.

    python scripts/k8s/render.py jobset --name llama70b --image REGISTRY/ncl:TAG \\
        --nodes 16 --gpus-per-node 8 --recipe llama3_70b_2opt \\
        checkpointless=tier4 trainer.max_steps=1000 | kubectl apply -f -

Arguments after the options are Hydra overrides; each becomes one argument of the ranks'
command line (no shell quoting involved). A template is valid YAML whose placeholders are
quoted strings: ``"{{NAME}}"`` inside a string is replaced by text, a scalar that is exactly
``"{{PORT}}"`` by a typed value, a list item ``"{{OVERRIDES}}"`` by the overrides. Two
values remove what they fill: a Worker replica count of 0 (one node) and a GPU limit of 0
(CPU rehearsal). The job secret is a fresh random value in a Secret of the output, unless
``--secret-name`` names an existing one (then no Secret is printed).
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
TEMPLATES = {"pytorchjob": HERE / "pytorchjob.yaml", "jobset": HERE / "jobset.yaml"}
INT_PLACEHOLDERS = {"PORT", "MAX_RESTARTS", "NWORKERS", "GPUS_PER_NODE", "NNODES_INT"}
PLACEHOLDER = re.compile(r"\{\{([A-Z_]+)\}\}")
DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def peers(kind: str, name: str, nodes: int, port: int) -> str:
    """Store endpoints in node-rank order: the stable DNS names of the pods."""
    if kind == "pytorchjob":  # the operator's per-pod headless Services
        hosts = [f"{name}-master-0"] + [f"{name}-worker-{i}" for i in range(nodes - 1)]
    else:  # JobSet pod hostname . subdomain (our headless Service)
        hosts = [f"{name}-node-{r}-0.{name}-peers" for r in range(nodes)]
    return ",".join(f"{h}:{port}" for h in hosts)


def values(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "NAME": args.name, "NAMESPACE": args.namespace, "IMAGE": args.image,
        "WORKDIR": args.workdir, "LAUNCH": args.launch, "RECIPE": args.recipe,
        "NNODES": str(args.nodes), "NNODES_INT": args.nodes, "NWORKERS": args.nodes - 1,
        "NPROC_PER_NODE": str(args.nproc_per_node or args.gpus_per_node or 1),
        "GPUS_PER_NODE": args.gpus_per_node, "SPARES": str(args.spares),
        "PORT": args.port, "PEERS": peers(args.kind, args.name, args.nodes, args.port),
        "MAX_RESTARTS": args.max_restarts, "SHM_SIZE": args.shm_size,
        "SECRET_NAME": args.secret_name or f"{args.name}-ncl-secret",
        "JOB_SECRET": secrets.token_hex(16),
    }


def fill(node: Any, vals: dict[str, Any], overrides: list[str]) -> Any:
    if isinstance(node, dict):
        return {k: fill(v, vals, overrides) for k, v in node.items()}
    if isinstance(node, list):
        out: list[Any] = []
        for item in node:
            if item == "{{OVERRIDES}}":
                out.extend(overrides)
            else:
                out.append(fill(item, vals, overrides))
        return out
    if isinstance(node, str):
        whole = PLACEHOLDER.fullmatch(node)
        if whole and whole.group(1) in INT_PLACEHOLDERS:
            return int(vals[whole.group(1)])
        return PLACEHOLDER.sub(lambda m: str(vals[m.group(1)]), node)
    return node


def prune(doc: dict[str, Any]) -> dict[str, Any]:
    """Drop what a 0 filled: the Worker replica spec of a one-node PyTorchJob, GPU limits."""
    specs = doc.get("spec", {}).get("pytorchReplicaSpecs", {})
    if specs.get("Worker", {}).get("replicas") == 0:
        del specs["Worker"]

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            res = node.get("resources")
            if isinstance(res, dict):
                limits = res.get("limits", {})
                if limits.get("nvidia.com/gpu") == 0:
                    del limits["nvidia.com/gpu"]
                if not limits:
                    res.pop("limits", None)
                if not res:
                    del node["resources"]
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(doc)
    return doc


def render(kind: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    vals = values(args)
    docs = [d for d in yaml.safe_load_all(TEMPLATES[kind].read_text()) if d]
    out = []
    for doc in docs:
        if doc.get("kind") == "Secret" and args.secret_name:
            continue  # the user's own Secret
        doc = json.loads(json.dumps(doc))  # YAML anchors become plain copies
        out.append(prune(fill(doc, vals, list(args.overrides))))
    if args.restart_failed_job:  # recreate only the failed child Job (newer JobSet releases)
        for doc in out:
            if doc["kind"] == "JobSet":
                policy = doc["spec"]["failurePolicy"]
                policy["maxRestarts"] = args.max_restarts
                policy["rules"].append({"name": "replaceNode", "action": "RestartJob"})
    left = PLACEHOLDER.findall(json.dumps(out))
    if left:
        raise SystemExit(f"unfilled placeholders in {TEMPLATES[kind].name}: {sorted(set(left))}")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("kind", choices=sorted(TEMPLATES))
    p.add_argument("--name", required=True, help="job name: a DNS label (a-z, 0-9, -)")
    p.add_argument("--namespace", default="default")
    p.add_argument("--image", required=True, help="image with this repository and its venv")
    p.add_argument("--workdir", default="/workspace/nemo_checkpointless",
                   help="repository root inside the image")
    p.add_argument("--launch", default="ncl-launch", help="agent command inside the image")
    p.add_argument("--nodes", type=int, required=True, help="pods, one per node")
    p.add_argument("--gpus-per-node", type=int, default=8, help="0: CPU rehearsal")
    p.add_argument("--nproc-per-node", type=int, default=None,
                   help="ranks per node (default: --gpus-per-node, or 1 without GPUs)")
    p.add_argument("--recipe", required=True, help="conf/recipe name")
    p.add_argument("--spares", type=int, default=1, help="warm spare processes per node")
    p.add_argument("--port", type=int, default=29400, help="store port of every agent")
    p.add_argument("--max-restarts", type=int, default=4,
                   help="pod replacements before the job fails")
    p.add_argument("--shm-size", default="64Gi", help="size limit of the /dev/shm volume")
    p.add_argument("--secret-name", default=None,
                   help="existing Secret with key NCL_JOB_SECRET (default: generate one)")
    p.add_argument("--restart-failed-job", action="store_true",
                   help="jobset: recreate only a child Job that failed for good (needs a "
                        "JobSet release with the RestartJob action)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for recipes/pretrain.py")
    args = p.parse_intermixed_args(argv)
    if not DNS_LABEL.match(args.name) or len(args.name) > 40:
        p.error(f"--name {args.name!r}: use at most 40 of a-z, 0-9 and '-', starting with a "
                "letter (it becomes part of pod and Service DNS names)")
    if args.nodes < 1:
        p.error("--nodes must be at least 1")
    if args.restart_failed_job and args.kind != "jobset":
        p.error("--restart-failed-job is for the jobset template")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    docs = render(args.kind, args)
    yaml.safe_dump_all(docs, sys.stdout, sort_keys=False, width=100)


if __name__ == "__main__":
    main()
