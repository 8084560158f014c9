"""Render pytorchjob.yaml or jobset.yaml into the manifests a cluster applies; print plain YAML.

    python scripts/k8s/render.py jobset --name llama70b --image REGISTRY/ncl:TAG \\
        --nodes 16 --gpus-per-node 8 --cpus 96 --memory 1000Gi --recipe llama3_70b_2opt \\
        --pvc llama70b-runs --secret-name llama70b-secret --queue team-a \\
        --fabric efa --fabric-devices 32 --site-env scripts/site/efa.env --standby-nodes 2 \\
        checkpointless=tier4 trainer.max_steps=1000 | kubectl apply -f -

Arguments after the options are Hydra overrides; each becomes one argument of the ranks'
command line (no shell quoting involved). A template is valid YAML whose placeholders are
quoted strings: ``"{{NAME}}"`` inside a string is replaced by text, a scalar that is exactly
``"{{PORT}}"`` by a typed value, a list item ``"{{OVERRIDES}}"`` or ``"{{SITE_ENV}}"`` by a
list. Then this script adds to every pod what depends on options (pod.py): requests equal
to limits, the fabric, topology and hostNetwork; the Kueue queue label; standby agents.

Rendering is deterministic: the job secret is read from an existing Secret
(``--secret-name``, default ``<name>-ncl-secret``); ``--generate-secret`` adds a Secret
with a fresh random value to the output instead (apply that output once, not on every
change). The run directory lives on a PersistentVolumeClaim (``--pvc``; ``--create-pvc
SIZE`` adds one).
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
sys.path.insert(0, str(HERE))
import pod  # noqa: E402  (beside this file)

REPO = HERE.parents[1]
TEMPLATES = {"pytorchjob": HERE / "pytorchjob.yaml", "jobset": HERE / "jobset.yaml"}
ENTRIES = {  # ENTRY: (script in the image's working directory, run directory override key)
    "lean": ("recipes/pretrain.py", "hydra.run.dir"),
    "nemo": ("recipes/nemo_pretrain.py", "run_dir"),
    "bridge": ("recipes/bridge_pretrain.py", "hydra.run.dir"),
}
INT_PLACEHOLDERS = {"PORT", "MAX_RESTARTS", "NWORKERS", "NNODES_INT", "GRACE_S"}
PLACEHOLDER = re.compile(r"\{\{([A-Z_]+)\}\}")
DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
ENV_LINE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$")


def peers(kind: str, name: str, nodes: int, port: int) -> str:
    """Store endpoints in node-rank order: the stable DNS names of the pods."""
    if kind == "pytorchjob":  # the operator's per-pod headless Services
        hosts = [f"{name}-master-0"] + [f"{name}-worker-{i}" for i in range(nodes - 1)]
    else:  # JobSet pod hostname . subdomain (our headless Service)
        hosts = [f"{name}-node-{r}-0.{name}-peers" for r in range(nodes)]
    return ",".join(f"{h}:{port}" for h in hosts)


def standby_peers(kind: str, name: str, standbys: int, port: int) -> str:
    """Where each standby pod serves a store shard once it takes a node over (agent.sh's
    --standby-host/--standby-port): every agent is told (--standby-peers), so a node pod
    restarted with NCL_PEERS as first rendered finds shards a standby moved."""
    if kind == "pytorchjob":  # the Indexed Job's pods under our headless Service
        hosts = [f"{name}-standby-{k}.{name}-standby" for k in range(standbys)]
    else:  # the standby replicated job's pods under <name>-peers
        hosts = [f"{name}-standby-{k}-0.{name}-peers" for k in range(standbys)]
    return ",".join(f"{h}:{port}" for h in hosts)


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines, literal, as scripts/slurm/pretrain.sbatch reads them ("" unsets)."""
    out: dict[str, str] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = ENV_LINE.match(line)
        if not m:
            raise SystemExit(f"{path}:{n}: {line!r} is not KEY=VALUE (values are literal: no "
                             "quotes, no $expansion)")
        out[m.group(1)] = m.group(2)
    return out


def site_env(args: argparse.Namespace) -> list[dict[str, str]]:
    env = read_env_file(REPO / "scripts" / "site" / "default.env")
    for path in args.site_env:
        env.update(read_env_file(Path(path)))
    return [{"name": k, "value": v} for k, v in env.items() if v != ""]


def values(args: argparse.Namespace) -> dict[str, Any]:
    script, run_key = ENTRIES[args.entry]
    return {
        "NAME": args.name, "NAMESPACE": args.namespace, "IMAGE": args.image,
        "WORKDIR": args.workdir, "LAUNCH": args.launch, "RECIPE": args.recipe,
        "ENTRY_SCRIPT": script, "RUN_DIR_KEY": run_key,
        "RUN_DIR": args.run_dir, "RUNS_MOUNT": args.runs_mount, "PVC": args.pvc,
        "NNODES": str(args.nodes), "NNODES_INT": args.nodes, "NWORKERS": args.nodes - 1,
        "NPROC_PER_NODE": str(args.nproc_per_node or args.gpus_per_node or 1),
        "SPARES": str(args.spares), "PORT": args.port, "PORT_STR": str(args.port),
        "PEERS": peers(args.kind, args.name, args.nodes, args.port),
        "STANDBY_PEERS": standby_peers(args.kind, args.name, args.standby_nodes, args.port),
        "MAX_RESTARTS": args.max_restarts, "SHM_SIZE": args.shm_size,
        "GRACE_S": args.grace_seconds, "SECRET_NAME": args.secret_name,
        "AGENT_SH": agent_script(),
    }


def agent_script() -> str:
    """agent.sh without its header comments (they explain it here, not in every pod)."""
    lines = (HERE / "agent.sh").read_text().splitlines()
    body = lines[next(i for i, l in enumerate(lines) if not l.startswith("#")):]
    return "\n".join(["# scripts/k8s/agent.sh", *body]) + "\n"


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the pod's script) as literal blocks."""


_Dumper.add_representer(str, lambda d, s: d.represent_scalar(
    "tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


def fill(node: Any, vals: dict[str, Any], lists: dict[str, list[Any]]) -> Any:
    if isinstance(node, dict):
        return {k: fill(v, vals, lists) for k, v in node.items()}
    if isinstance(node, list):
        out: list[Any] = []
        for item in node:
            whole = PLACEHOLDER.fullmatch(item) if isinstance(item, str) else None
            if whole and whole.group(1) in lists:
                out.extend(lists[whole.group(1)])
            else:
                out.append(fill(item, vals, lists))
        return out
    if isinstance(node, str):
        whole = PLACEHOLDER.fullmatch(node)
        if whole and whole.group(1) in INT_PLACEHOLDERS:
            return int(vals[whole.group(1)])
        return PLACEHOLDER.sub(lambda m: str(vals[m.group(1)]), node)
    return node


def generated_secret(args: argparse.Namespace) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": args.secret_name, "namespace": args.namespace,
                         "labels": pod.labels(args.name)},
            "type": "Opaque", "stringData": {"NCL_JOB_SECRET": secrets.token_hex(16)}}


def created_pvc(args: argparse.Namespace) -> dict[str, Any]:
    spec: dict[str, Any] = {"accessModes": ["ReadWriteMany"],
                            "resources": {"requests": {"storage": args.create_pvc}}}
    if args.storage_class:
        spec["storageClassName"] = args.storage_class
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": args.pvc, "namespace": args.namespace,
                         "labels": pod.labels(args.name)}, "spec": spec}


def render(kind: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    vals = values(args)
    lists = {"OVERRIDES": list(args.overrides), "SITE_ENV": site_env(args)}
    docs = [d for d in yaml.safe_load_all(TEMPLATES[kind].read_text()) if d]
    docs = [fill(json.loads(json.dumps(d)), vals, lists) for d in docs]  # anchors: copies
    for doc in docs:
        if doc["kind"] == "PyTorchJob":
            specs = doc["spec"]["pytorchReplicaSpecs"]
            if specs["Worker"]["replicas"] == 0:  # one node: no Worker replica spec
                del specs["Worker"]
            for spec in specs.values():
                pod.apply(spec["template"], args)
        if doc["kind"] == "JobSet":
            (node,) = doc["spec"]["replicatedJobs"]
            pod.apply(node["template"]["spec"]["template"], args)
            if args.standby_nodes:
                doc["spec"]["replicatedJobs"].append(pod.jobset_standby(node, args))
            if args.restart_failed_job:  # recreate only the failed child Job
                policy = doc["spec"]["failurePolicy"]
                policy["maxRestarts"] = args.max_restarts
                policy["rules"].append({"name": "replaceNode", "action": "RestartJob",
                                        "targetReplicatedJobs": ["node"]})
        if doc["kind"] in ("PyTorchJob", "JobSet"):
            pod.queue(doc, args)
    if kind == "pytorchjob" and args.standby_nodes:
        docs += pod.pytorchjob_standby(docs[0], args)
    if args.generate_secret:
        docs.insert(0, generated_secret(args))
    if args.create_pvc:
        docs.insert(0, created_pvc(args))
    left = PLACEHOLDER.findall(json.dumps(docs))
    if left:
        raise SystemExit(f"unfilled placeholders in {TEMPLATES[kind].name}: {sorted(set(left))}")
    return docs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("kind", choices=sorted(TEMPLATES))
    p.add_argument("--name", required=True, help="job name: a DNS label (a-z, 0-9, -)")
    p.add_argument("--namespace", default="default")
    p.add_argument("--image", required=True, help="the image built from Dockerfile")
    p.add_argument("--workdir", default="/workspace/nemo_checkpointless",
                   help="repository root inside the image (recipes/, conf/)")
    p.add_argument("--launch", default="ncl-launch", help="agent command inside the image")
    p.add_argument("--entry", choices=sorted(ENTRIES), default="lean",
                   help="lean: recipes/pretrain.py, nemo: NeMo 2, bridge: Megatron-Bridge")
    p.add_argument("--recipe", required=True, help="recipe=<name> for the entry")
    p.add_argument("--nodes", type=int, required=True, help="training pods, one per node")
    p.add_argument("--standby-nodes", type=int, default=0,
                   help="pods running a standby agent, each taking a lost node over")
    p.add_argument("--gpus-per-node", type=int, default=8, help="0: CPU rehearsal")
    p.add_argument("--nproc-per-node", type=int, default=None,
                   help="ranks per node (default: --gpus-per-node, or 1 without GPUs)")
    p.add_argument("--spares", type=int, default=1, help="warm spare processes per node")
    pod.add_arguments(p)
    p.add_argument("--port", type=int, default=29400, help="store port of every agent")
    p.add_argument("--max-restarts", type=int, default=4,
                   help="pod replacements before the job fails")
    p.add_argument("--grace-seconds", type=int, default=300,
                   help="terminationGracePeriodSeconds: time for a final checkpoint after "
                        "the preStop hook's SIGUSR1 (a step plus a durable save)")
    p.add_argument("--pvc", default=None,
                   help="PersistentVolumeClaim (ReadWriteMany) for the run directory "
                        "(default <name>-runs)")
    p.add_argument("--runs-mount", default="/runs", help="where the PVC is mounted")
    p.add_argument("--run-dir", default=None,
                   help="absolute run directory on the PVC (default <runs-mount>/<name>)")
    p.add_argument("--create-pvc", default=None, metavar="SIZE",
                   help="also output the PVC, of this size (e.g. 10Ti)")
    p.add_argument("--storage-class", default=None, help="storageClassName of --create-pvc")
    p.add_argument("--secret-name", default=None,
                   help="Secret with key NCL_JOB_SECRET (default <name>-ncl-secret)")
    p.add_argument("--generate-secret", action="store_true",
                   help="also output that Secret with a new random value")
    p.add_argument("--site-env", action="append", default=[], metavar="FILE",
                   help="KEY=VALUE file of NCCL/EFA/InfiniBand settings, over "
                        "scripts/site/default.env (repeatable)")
    p.add_argument("--restart-failed-job", action="store_true",
                   help="jobset: recreate only a child Job that failed for good (needs a "
                        "JobSet release with the RestartJob action)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for the entry")
    args = p.parse_intermixed_args(argv)
    if not DNS_LABEL.match(args.name) or len(args.name) > 40:
        p.error(f"--name {args.name!r}: use at most 40 of a-z, 0-9 and '-', starting with a "
                "letter (it becomes part of pod and Service DNS names)")
    if args.nodes < 1 or args.standby_nodes < 0:
        p.error("--nodes must be at least 1, --standby-nodes at least 0")
    if args.restart_failed_job and args.kind != "jobset":
        p.error("--restart-failed-job is for the jobset template")
    for o in args.overrides:
        if o.split("=", 1)[0] in ("hydra.run.dir", "run_dir"):
            p.error(f"override {o!r}: set the run directory with --run-dir (on the PVC)")
    args.pvc = args.pvc or f"{args.name}-runs"
    args.secret_name = args.secret_name or f"{args.name}-ncl-secret"
    args.run_dir = args.run_dir or f"{args.runs_mount.rstrip('/')}/{args.name}"
    if not args.run_dir.startswith(args.runs_mount.rstrip("/") + "/"):
        p.error(f"--run-dir {args.run_dir} must lie under --runs-mount {args.runs_mount} "
                "(the shared volume), as an absolute path")
    for path in args.site_env:
        if not Path(path).is_file():
            p.error(f"--site-env {path}: no such file")
    pod.check_arguments(p, args)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    docs = render(args.kind, args)
    if not args.generate_secret:
        print(f"# the pods read NCL_JOB_SECRET from Secret {args.secret_name}; create it once:\n"
              f"#   kubectl -n {args.namespace} create secret generic {args.secret_name} "
              "--from-literal=NCL_JOB_SECRET=$(openssl rand -hex 16)", file=sys.stderr)
    yaml.dump_all(docs, sys.stdout, Dumper=_Dumper, sort_keys=False, width=100)


if __name__ == "__main__":
    main()
