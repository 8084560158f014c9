"""What render.py adds to the pods: resources, fabric, placement, queue and standby agents.

Every pod gets requests equal to limits for CPU, memory and GPUs (and fabric devices), so
Kubernetes gives it the Guaranteed QoS class (evicted last, exclusive CPUs under the static
CPU manager). The memory limit counts the memory-backed ``/dev/shm``: its pages are charged
to the pod's memory cgroup, so ``--memory`` (the processes) plus ``--shm-size`` is the limit.
"""

from __future__ import annotations

import argparse
import copy
import re
from typing import Any

QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
TAS_ANNOTATION = "kueue.x-k8s.io/podset-required-topology"
NETWORKS_ANNOTATION = "k8s.v1.cni.cncf.io/networks"
EFA_RESOURCE = "vpc.amazonaws.com/efa"
QUANTITY = re.compile(r"^(\d+)(Ki|Mi|Gi|Ti)$")
UNIT_KIB = {"Ki": 1, "Mi": 1024, "Gi": 1024 ** 2, "Ti": 1024 ** 3}


def labels(name: str, component: str | None = None) -> dict[str, str]:
    out = {"app.kubernetes.io/name": "nemo-checkpointless", "app.kubernetes.io/instance": name}
    if component:
        out["app.kubernetes.io/component"] = component
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("resources (requests = limits: Guaranteed QoS)")
    g.add_argument("--cpus", default="64", help="CPU cores per pod (node allocatable or less)")
    g.add_argument("--memory", default="480Gi",
                   help="memory of the pod's processes; the limit adds --shm-size")
    g.add_argument("--shm-size", default="64Gi", help="size of the memory-backed /dev/shm")
    g = p.add_argument_group("fabric")
    g.add_argument("--fabric", choices=["none", "efa", "rdma"], default="none",
                   help="efa: AWS EFA devices (vpc.amazonaws.com/efa); rdma: an RDMA/SR-IOV "
                        "device plugin's resource; both add the IPC_LOCK capability")
    g.add_argument("--fabric-devices", type=int, default=None,
                   help="fabric devices per pod (efa: 32 on p5.48xlarge, 4 on p4d.24xlarge; "
                        "rdma: default 1)")
    g.add_argument("--rdma-resource", default="rdma/rdma_shared_device_a",
                   help="resource name of the RDMA device plugin (--fabric rdma)")
    g.add_argument("--network-attachments", default=None,
                   help="Multus NetworkAttachmentDefinitions for the pods (SR-IOV), comma-"
                        "separated: the k8s.v1.cni.cncf.io/networks annotation")
    g.add_argument("--host-network", action="store_true",
                   help="pods use the node's network namespace (dnsPolicy "
                        "ClusterFirstWithHostNet); the store port must be free on the nodes")
    g = p.add_argument_group("placement and scheduling")
    g.add_argument("--queue", default=None, help="Kueue LocalQueue (gang admission)")
    g.add_argument("--priority-class", default=None, help="PriorityClass of the pods")
    g.add_argument("--zone", default=None, help="topology.kubernetes.io/zone of every pod")
    g.add_argument("--node-selector", action="append", default=[], metavar="KEY=VALUE",
                   help="node label every pod requires (repeatable; e.g. a placement group "
                        "or instance type label)")
    g.add_argument("--pack-by", default=None, metavar="TOPOLOGY_KEY",
                   help="all pods of the job in one domain of this node label (required "
                        "pod affinity; e.g. a rack or placement group label)")
    g.add_argument("--tas-level", default=None, metavar="TOPOLOGY_KEY",
                   help="Kueue topology-aware scheduling: the whole pod set in one domain "
                        "of this level (podset-required-topology annotation; needs --queue)")


def check_arguments(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for opt in ("memory", "shm_size"):
        if not QUANTITY.match(getattr(args, opt)):
            p.error(f"--{opt.replace('_', '-')} {getattr(args, opt)}: use a binary quantity "
                    "such as 512Gi or 65536Mi")
    if not re.fullmatch(r"\d+(\.\d+)?|\d+m", args.cpus):
        p.error(f"--cpus {args.cpus}: a number of cores (96) or millicores (96000m)")
    if args.fabric == "efa" and not args.fabric_devices:
        p.error("--fabric efa needs --fabric-devices N (EFA interfaces per node: 32 on "
                "p5.48xlarge, 4 on p4d.24xlarge)")
    if args.fabric == "rdma":
        args.fabric_devices = args.fabric_devices or 1
    if args.fabric == "none" and (args.fabric_devices or args.network_attachments):
        p.error("--fabric-devices and --network-attachments need --fabric efa or rdma")
    for item in args.node_selector:
        if "=" not in item:
            p.error(f"--node-selector {item!r}: use KEY=VALUE")
    if args.tas_level and not args.queue:
        p.error("--tas-level is Kueue's topology-aware scheduling: give --queue too")


def memory_limit(memory: str, shm: str) -> str:
    total = sum(int(m.group(1)) * UNIT_KIB[m.group(2)]
                for m in (QUANTITY.match(memory), QUANTITY.match(shm)))
    for unit in ("Ti", "Gi", "Mi"):
        if total % UNIT_KIB[unit] == 0:
            return f"{total // UNIT_KIB[unit]}{unit}"
    return f"{total}Ki"


def apply(template: dict[str, Any], args: argparse.Namespace) -> None:
    """Resources, fabric, network and placement on one pod template (metadata + spec)."""
    spec = template["spec"]
    (container,) = spec["containers"]
    res: dict[str, Any] = {"cpu": args.cpus,
                           "memory": memory_limit(args.memory, args.shm_size)}
    if args.gpus_per_node:
        res["nvidia.com/gpu"] = args.gpus_per_node
    annotations = template["metadata"].setdefault("annotations", {})
    if args.fabric == "efa":
        res[EFA_RESOURCE] = args.fabric_devices
    elif args.fabric == "rdma":
        res[args.rdma_resource] = args.fabric_devices
    if args.fabric != "none":  # RDMA registers (locks) memory
        container["securityContext"] = {"capabilities": {"add": ["IPC_LOCK"]}}
    if args.network_attachments:
        annotations[NETWORKS_ANNOTATION] = args.network_attachments
    container["resources"] = {"requests": dict(res), "limits": dict(res)}
    if args.host_network:
        spec["hostNetwork"] = True
        spec["dnsPolicy"] = "ClusterFirstWithHostNet"
    if args.priority_class:
        spec["priorityClassName"] = args.priority_class
    if args.node_selector:
        spec["nodeSelector"] = dict(item.split("=", 1) for item in args.node_selector)
    affinity: dict[str, Any] = {}
    if args.zone:
        affinity["nodeAffinity"] = {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [{
                "key": "topology.kubernetes.io/zone", "operator": "In", "values": [args.zone]}]}]}}
    if args.pack_by:  # the first pod matches itself, so it may go anywhere; the rest follow
        affinity["podAffinity"] = {"requiredDuringSchedulingIgnoredDuringExecution": [{
            "labelSelector": {"matchLabels": {"app.kubernetes.io/instance": args.name}},
            "topologyKey": args.pack_by}]}
    if affinity:
        spec["affinity"] = affinity
    if args.tas_level:
        annotations[TAS_ANNOTATION] = args.tas_level
    if not annotations:
        del template["metadata"]["annotations"]


def queue(doc: dict[str, Any], args: argparse.Namespace) -> None:
    if args.queue:
        doc["metadata"]["labels"][QUEUE_LABEL] = args.queue


def _as_standby(template: dict[str, Any], subdomain: str) -> None:
    template["metadata"]["labels"]["app.kubernetes.io/component"] = "standby"
    (container,) = template["spec"]["containers"]
    env = [e for e in container["env"] if e["name"] not in ("NODE_RANK", "NCL_SUBDOMAIN")]
    container["env"] = [{"name": "NCL_STANDBY", "value": "1"},
                        {"name": "NCL_SUBDOMAIN", "value": subdomain}, *env]


def jobset_standby(node: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """A replicated job of standby agents: same pod as a node, NCL_STANDBY=1; hostnames
    <name>-standby-<k>-0.<name>-peers. A lost standby is replaced by its child Job."""
    standby = copy.deepcopy(node)
    standby["name"] = "standby"
    standby["replicas"] = args.standby_nodes
    _as_standby(standby["template"]["spec"]["template"], f"{args.name}-peers")
    return standby


def pytorchjob_standby(job: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Standby agents beside a PyTorchJob: an Indexed batch Job <name>-standby (pods
    <name>-standby-<k>.<name>-standby) and its headless Service. The PyTorchJob's replica
    types are fixed (Master, Worker); an extra Worker would become a training rank."""
    name, sub = args.name, f"{args.name}-standby"
    template = copy.deepcopy(job["spec"]["pytorchReplicaSpecs"]["Master"]["template"])
    _as_standby(template, sub)
    template["spec"]["subdomain"] = sub
    template["spec"]["restartPolicy"] = "Never"
    (container,) = template["spec"]["containers"]
    container["name"] = "ncl"
    service = {"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": sub, "namespace": args.namespace, "labels": labels(name)},
               "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                        "selector": labels(name, "standby"),
                        "ports": [{"name": "ncl-store", "port": args.port,
                                   "targetPort": args.port, "protocol": "TCP"}]}}
    batch = {"apiVersion": "batch/v1", "kind": "Job",
             "metadata": {"name": sub, "namespace": args.namespace,
                          "labels": labels(name, "standby")},
             "spec": {"completionMode": "Indexed", "completions": args.standby_nodes,
                      "parallelism": args.standby_nodes, "backoffLimit": args.max_restarts,
                      "ttlSecondsAfterFinished": 3600,
                      "podFailurePolicy": {"rules": [
                          {"action": "FailJob", "onExitCodes": {
                              "containerName": "ncl", "operator": "In", "values": [2, 3]}},
                          {"action": "Ignore", "onPodConditions": [
                              {"type": "DisruptionTarget", "status": "True"}]}]},
                      "template": template}}
    queue(batch, args)
    return [service, batch]
