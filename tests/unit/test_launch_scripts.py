"""Kubernetes launch manifests, offline: rendered by scripts/k8s/render.py and checked against
their schemas (the Slurm script: test_slurm_script.py).

The manifests are rendered by scripts/k8s/render.py; built-in kinds are checked with
kubernetes-validate (strict), PyTorchJob and JobSet with the schemas in scripts/k8s/schemas/
(whose embedded pod and job templates resolve to the same strict Kubernetes definitions).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from referencing import Registry, Resource

from nemo_checkpointless.launch.agent import parse_args as agent_parse_args

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "scripts" / "k8s"
K8S_VERSION = "1.31.0"  # the definitions scripts/k8s/schemas/generate.py referenced
SCHEMAS = {"PyTorchJob": "pytorchjob.kubeflow.org_v1.json",
           "JobSet": "jobset.x-k8s.io_v1alpha2.json"}


def _render_module():
    spec = importlib.util.spec_from_file_location("ncl_k8s_render", K8S / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render = _render_module()


def rendered(kind: str, *argv: str) -> list[dict]:
    args = render.parse_args([kind, "--name", "llama70b", "--image", "reg.example/ncl:1",
                              "--recipe", "llama3_70b_2opt", *argv])
    return render.render(kind, args)


def by_kind(docs: list[dict], kind: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def pod_templates(docs: list[dict]) -> list[dict]:
    """Every pod template of the output: PyTorchJob replicas, JobSet replicated jobs, Jobs."""
    out = []
    for doc in docs:
        if doc["kind"] == "PyTorchJob":
            out += [s["template"] for s in doc["spec"]["pytorchReplicaSpecs"].values()]
        elif doc["kind"] == "JobSet":
            out += [r["template"]["spec"]["template"] for r in doc["spec"]["replicatedJobs"]]
        elif doc["kind"] == "Job":
            out.append(doc["spec"]["template"])
    return out


def crd_validator(kind: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((K8S / "schemas" / SCHEMAS[kind]).read_text())
    defs = kubernetes_validate.utils.schema_contents(
        f"kubernetes-json-schema/v{K8S_VERSION}-local-strict/_definitions.json", K8S_VERSION)
    registry = Registry().with_resources([
        (defs["$id"], Resource.from_contents(defs)),
        (schema["$id"], Resource.from_contents(schema)),
    ])
    return jsonschema.Draft202012Validator(schema, registry=registry)


def pod_spec(docs: list[dict]) -> dict:
    if any(d["kind"] == "PyTorchJob" for d in docs):
        return by_kind(docs, "PyTorchJob")["spec"]["pytorchReplicaSpecs"]["Master"][
            "template"]["spec"]
    job = by_kind(docs, "JobSet")["spec"]["replicatedJobs"][0]["template"]["spec"]
    return job["template"]["spec"]


LAYOUTS = [
    ("pytorchjob", ["--nodes", "4"]),
    ("pytorchjob", ["--nodes", "1", "--gpus-per-node", "0", "--cpus", "4", "--memory", "16Gi",
                    "--shm-size", "2Gi", "--generate-secret", "--create-pvc", "100Gi"]),
    ("pytorchjob", ["--nodes", "16", "--standby-nodes", "2", "--fabric", "rdma",
                    "--network-attachments", "sriov-a", "--queue", "team-a", "--zone", "z1",
                    "--pack-by", "example.com/rack", "--priority-class", "high",
                    "--entry", "nemo", "--site-env", str(REPO / "scripts/site/infiniband.env")]),
    ("jobset", ["--nodes", "4"]),
    ("jobset", ["--nodes", "1", "--gpus-per-node", "0", "--cpus", "4", "--memory", "16Gi"]),
    ("jobset", ["--nodes", "3", "--restart-failed-job", "--generate-secret"]),
    ("jobset", ["--nodes", "16", "--standby-nodes", "2", "--fabric", "efa",
                "--fabric-devices", "32", "--queue", "team-a", "--tas-level",
                "example.com/block", "--host-network", "--node-selector",
                "node.kubernetes.io/instance-type=p5.48xlarge", "--entry", "bridge",
                "--site-env", str(REPO / "scripts/site/efa.env")]),
]
OVERRIDES = ["checkpointless=tier4", "trainer.max_steps=1000",
             "fault.plan=[{rank:1,step:2,phase:optimizer,kind:kill}]"]
BUILTIN = {"Secret", "Service", "PersistentVolumeClaim", "Job"}


# ------------------------------------------------------------------ schemas


@pytest.mark.parametrize("kind,argv", LAYOUTS)
def test_builtin_kinds_pass_the_kubernetes_schema(kind, argv):
    docs = rendered(kind, *argv, *OVERRIDES)
    builtin = [d for d in docs if d["kind"] in BUILTIN]
    assert {d["kind"] for d in docs} - BUILTIN == {"PyTorchJob" if kind == "pytorchjob"
                                                    else "JobSet"}
    for doc in builtin:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("kind,argv", LAYOUTS)
def test_custom_resources_pass_their_crd_schema(kind, argv):
    docs = rendered(kind, *argv, *OVERRIDES)
    crd = "PyTorchJob" if kind == "pytorchjob" else "JobSet"
    errors = [f"{'.'.join(map(str, e.path))}: {e.message}"
              for e in crd_validator(crd).iter_errors(by_kind(docs, crd))]
    assert not errors, errors


@pytest.mark.parametrize("mistake", ["restart", "field", "pod"])
def test_crd_schemas_catch_mistakes(mistake):
    """The schemas are not vacuous: a wrong enum, an unknown field, a typo in the pod."""
    docs = rendered("pytorchjob", "--nodes", "2")
    job = by_kind(docs, "PyTorchJob")
    master = job["spec"]["pytorchReplicaSpecs"]["Master"]
    if mistake == "restart":
        master["restartPolicy"] = "OnFailur"
    elif mistake == "field":
        job["spec"]["replicaSpecs"] = {}
    else:
        master["template"]["spec"]["containers"][0]["imagePullPolice"] = "Always"
    assert list(crd_validator("PyTorchJob").iter_errors(job))

    jobset = by_kind(rendered("jobset", "--nodes", "2"), "JobSet")
    jobset["spec"]["failurePolicy"]["rules"][0]["action"] = "RestartPod"
    assert list(crd_validator("JobSet").iter_errors(jobset))


def test_schema_sources_are_recorded():
    readme = (K8S / "schemas" / "README.md").read_text()
    for kind, name in SCHEMAS.items():
        schema = json.loads((K8S / "schemas" / name).read_text())
        source = schema["x-generated-from"]
        assert name in readme
        assert f"{source['package']}=={source['version']}" in readme, (kind, source)
        assert schema["properties"]["kind"] == {"const": kind}


# ------------------------------------------------------------------ what a platform needs


@pytest.mark.parametrize("kind,argv", LAYOUTS)
def test_every_pod_is_guaranteed_qos_with_shm_counted(kind, argv):
    docs = rendered(kind, *argv)
    args = render.parse_args([kind, "--name", "x", "--image", "i", "--recipe", "r", *argv])
    templates = pod_templates(docs)
    assert len(templates) == (1 if kind == "jobset" or args.nodes == 1 else 2) + (
        1 if args.standby_nodes else 0)
    for template in templates:
        (container,) = template["spec"]["containers"]
        res = container["resources"]
        assert res["requests"] == res["limits"]  # Guaranteed: every resource, equal
        assert {"cpu", "memory"} <= set(res["limits"])
        assert ("nvidia.com/gpu" in res["limits"]) == (args.gpus_per_node > 0)
        shm = next(v for v in template["spec"]["volumes"] if v["name"] == "dshm")
        assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": args.shm_size}
        assert res["limits"]["memory"] == render.pod.memory_limit(args.memory, args.shm_size)


def test_memory_limit_adds_shm_to_the_processes():
    assert render.pod.memory_limit("480Gi", "64Gi") == "544Gi"
    assert render.pod.memory_limit("1Ti", "1024Gi") == "2Ti"
    assert render.pod.memory_limit("512Mi", "1Gi") == "1536Mi"


def test_rendering_is_deterministic_and_embeds_no_secret():
    a = rendered("jobset", "--nodes", "3", *OVERRIDES)
    b = rendered("jobset", "--nodes", "3", *OVERRIDES)
    assert a == b and not [d for d in a if d["kind"] == "Secret"]
    for template in pod_templates(a):
        env = {e["name"]: e for e in template["spec"]["containers"][0]["env"]}
        assert env["NCL_JOB_SECRET"]["valueFrom"]["secretKeyRef"] == {
            "name": "llama70b-ncl-secret", "key": "NCL_JOB_SECRET"}
    named = rendered("pytorchjob", "--nodes", "2", "--secret-name", "team-secret")
    env = {e["name"]: e for e in pod_spec(named)["containers"][0]["env"]}
    assert env["NCL_JOB_SECRET"]["valueFrom"]["secretKeyRef"]["name"] == "team-secret"
    made = rendered("pytorchjob", "--nodes", "2", "--generate-secret")
    assert re.fullmatch(r"[0-9a-f]{32}", by_kind(made, "Secret")["stringData"]["NCL_JOB_SECRET"])


@pytest.mark.parametrize("kind", ["pytorchjob", "jobset"])
def test_run_directory_on_a_shared_volume_and_a_final_checkpoint_on_stop(kind):
    docs = rendered(kind, "--nodes", "2", "--pvc", "team-runs", "--grace-seconds", "600")
    spec = pod_spec(docs)
    (container,) = spec["containers"]
    runs = next(v for v in spec["volumes"] if v["name"] == "runs")
    assert runs["persistentVolumeClaim"] == {"claimName": "team-runs"}
    assert {"name": "runs", "mountPath": "/runs"} in container["volumeMounts"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["NCL_RUN_DIR"] == "/runs/llama70b"
    assert env["NCL_RUN_DIR_KEY"] == "hydra.run.dir"
    assert spec["terminationGracePeriodSeconds"] == 600
    pre = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre[:2] == ["sh", "-c"] and "kill -USR1 1" in pre[2]
    assert "command" not in container  # the image's ENTRYPOINT (tini) stays PID 1
    assert container["args"][:2] == ["bash", "-c"]


@pytest.mark.parametrize("argv,message", [
    (["hydra.run.dir=/tmp/x"], "set the run directory with --run-dir"),
    (["--run-dir", "/elsewhere/x"], "must lie under --runs-mount"),
    (["--fabric", "efa"], "--fabric efa needs --fabric-devices"),
    (["--fabric-devices", "4"], "need --fabric efa or rdma"),
    (["--memory", "500G"], "use a binary quantity"),
    (["--tas-level", "rack"], "give --queue too"),
])
def test_bad_options_are_refused_with_what_to_do(argv, message, capsys):
    with pytest.raises(SystemExit):
        rendered("jobset", "--nodes", "2", *argv)
    assert message in capsys.readouterr().err


def test_fabric_network_and_placement_options():
    efa = pod_templates(rendered("jobset", "--nodes", "2", "--fabric", "efa",
                                 "--fabric-devices", "32", "--host-network", "--zone", "z1",
                                 "--pack-by", "example.com/rack", "--node-selector", "a=b"))[0]
    (c,) = efa["spec"]["containers"]
    assert c["resources"]["limits"]["vpc.amazonaws.com/efa"] == 32
    assert c["securityContext"] == {"capabilities": {"add": ["IPC_LOCK"]}}
    spec = efa["spec"]
    assert spec["hostNetwork"] is True and spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert spec["nodeSelector"] == {"a": "b"}
    term = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["nodeSelectorTerms"][0]["matchExpressions"][0]["values"] == ["z1"]
    (pack,) = spec["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert pack["topologyKey"] == "example.com/rack"
    rdma = pod_templates(rendered("pytorchjob", "--nodes", "2", "--fabric", "rdma",
                                  "--network-attachments", "sriov-a,sriov-b"))[0]
    assert rdma["metadata"]["annotations"] == {"k8s.v1.cni.cncf.io/networks": "sriov-a,sriov-b"}
    assert rdma["spec"]["containers"][0]["resources"]["limits"]["rdma/rdma_shared_device_a"] == 1
    plain = pod_templates(rendered("jobset", "--nodes", "2"))[0]
    assert "securityContext" not in plain["spec"]["containers"][0]
    assert "annotations" not in plain["metadata"] and "affinity" not in plain["spec"]


def test_kueue_queue_label_and_topology_annotation():
    docs = rendered("jobset", "--nodes", "2", "--queue", "team-a", "--tas-level", "blk",
                    "--standby-nodes", "1")
    assert by_kind(docs, "JobSet")["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    for template in pod_templates(docs):
        assert template["metadata"]["annotations"] == {
            "kueue.x-k8s.io/podset-required-topology": "blk"}
    docs = rendered("pytorchjob", "--nodes", "2", "--queue", "team-a", "--standby-nodes", "1")
    for kind in ("PyTorchJob", "Job"):
        assert by_kind(docs, kind)["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"


def test_site_environment_reaches_every_pod():
    docs = rendered("jobset", "--nodes", "2", "--site-env",
                    str(REPO / "scripts/site/efa.env"), "--standby-nodes", "1")
    for template in pod_templates(docs):
        env = {e["name"]: e.get("value") for e in template["spec"]["containers"][0]["env"]}
        assert env["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
        assert (env["FI_PROVIDER"], env["FI_EFA_USE_DEVICE_RDMA"]) == ("efa", "1")


def test_standby_agents_in_a_jobset_and_beside_a_pytorchjob():
    jobset = by_kind(rendered("jobset", "--nodes", "3", "--standby-nodes", "2"), "JobSet")
    node, standby = jobset["spec"]["replicatedJobs"]
    assert (node["name"], standby["name"], standby["replicas"]) == ("node", "standby", 2)
    assert jobset["spec"]["successPolicy"] == {"operator": "All",
                                               "targetReplicatedJobs": ["node"]}
    env = {e["name"]: e for e in standby["template"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["NCL_STANDBY"]["value"] == "1" and "NODE_RANK" not in env
    assert env["NCL_SUBDOMAIN"]["value"] == "llama70b-peers"
    # every agent knows where the standbys serve once they take a node over
    standby_peers = ("llama70b-standby-0-0.llama70b-peers:29400,"
                     "llama70b-standby-1-0.llama70b-peers:29400")
    node_env = {e["name"]: e for e in node["template"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["NCL_STANDBY_PEERS"]["value"] == node_env["NCL_STANDBY_PEERS"]["value"] == \
        standby_peers
    docs = rendered("pytorchjob", "--nodes", "3", "--standby-nodes", "2")
    job, service = by_kind(docs, "Job"), by_kind(docs, "Service")
    master_env = {e["name"]: e for e in pod_spec(docs)["containers"][0]["env"]}
    assert master_env["NCL_STANDBY_PEERS"]["value"] == (
        "llama70b-standby-0.llama70b-standby:29400,llama70b-standby-1.llama70b-standby:29400")
    assert (job["spec"]["completions"], job["spec"]["completionMode"]) == (2, "Indexed")
    spec = job["spec"]["template"]["spec"]
    assert spec["subdomain"] == service["metadata"]["name"] == "llama70b-standby"
    assert service["spec"]["selector"]["app.kubernetes.io/component"] == "standby"
    assert job["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == "standby"


@pytest.mark.parametrize("kind", ["pytorchjob", "jobset"])
def test_manifests_wire_peers_shm_and_overrides(kind):
    docs = rendered(kind, "--nodes", "3", "--gpus-per-node", "8", *OVERRIDES)
    spec = pod_spec(docs)
    (container,) = spec["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert container["args"][-3:] == OVERRIDES
    if kind == "pytorchjob":
        specs = by_kind(docs, "PyTorchJob")["spec"]["pytorchReplicaSpecs"]
        assert specs["Master"]["replicas"] == 1 and specs["Worker"]["replicas"] == 2
        assert {s["restartPolicy"] for s in specs.values()} == {"ExitCode"}
        assert env["NCL_PEERS"]["value"] == (
            "llama70b-master-0:29400,llama70b-worker-0:29400,llama70b-worker-1:29400")
    else:
        jobset = by_kind(docs, "JobSet")
        service = by_kind(docs, "Service")
        assert service["spec"]["clusterIP"] == "None"
        assert jobset["spec"]["network"]["subdomain"] == service["metadata"]["name"]
        assert service["spec"]["selector"] == {"jobset.sigs.k8s.io/jobset-name": "llama70b"}
        (rjob,) = jobset["spec"]["replicatedJobs"]
        assert rjob["replicas"] == 3
        assert rjob["template"]["spec"]["backoffLimit"] == 4  # pod replaced, JobSet untouched
        assert jobset["spec"]["failurePolicy"]["maxRestarts"] == 0
        assert env["NCL_PEERS"]["value"] == ",".join(
            f"llama70b-node-{r}-0.llama70b-peers:29400" for r in range(3))


def test_one_node_cpu_manifest_drops_workers_and_gpus():
    docs = rendered("pytorchjob", "--nodes", "1", "--gpus-per-node", "0")
    assert list(by_kind(docs, "PyTorchJob")["spec"]["pytorchReplicaSpecs"]) == ["Master"]
    assert "nvidia.com/gpu" not in pod_spec(docs)["containers"][0]["resources"]["limits"]
    jobset = by_kind(rendered("jobset", "--nodes", "2", "--restart-failed-job"), "JobSet")
    assert {"name": "replaceNode", "action": "RestartJob", "targetReplicatedJobs": ["node"]} in \
        jobset["spec"]["failurePolicy"]["rules"]


# ------------------------------------------------------------------ the pod's command

FAKE_LAUNCH = """#!/usr/bin/env bash
# stand-in for ncl-launch: record the arguments; act as FAKE_MODE says
echo "$*" >>"$FAKE_ARGS"
if [[ $FAKE_MODE == taken && $1 != --standby ]]; then
    echo "ncl-launch: node 2 was taken over by a standby node (standby:h:1) and is running; start this agent with --standby instead" >&2
    exit 1
fi
trap 'echo "got USR1" >>"$FAKE_ARGS"; exit 143' USR1
trap 'echo "got TERM" >>"$FAKE_ARGS"; exit 143' TERM
touch "$FAKE_ARGS.trapped"  # its traps are set: a signal from now on is seen
[[ $FAKE_MODE == wait ]] && for ((i = 0; i < 300; i++)); do sleep 0.1 & wait $!; done
exit 0
"""


def pod_command(kind: str, tmp_path: Path, mode: str, standby: bool = False):
    """The pod's container args, with its env (downward API and Secret filled in) and a
    stand-in ncl-launch; returns (Popen, the file of recorded argument lists)."""
    docs = rendered(kind, "--nodes", "3", "--standby-nodes", "1", "--run-dir",
                    "/runs/llama70b", *OVERRIDES)
    templates = pod_templates(docs)
    template = templates[-1] if standby else templates[0]
    (container,) = template["spec"]["containers"]
    fake = tmp_path / "fake-launch"
    fake.write_text(FAKE_LAUNCH)
    fake.chmod(0o755)
    env = {"PATH": os.environ["PATH"], "NCL_JOB_SECRET": "s3cret", "NODE_RANK": "2",
           "RANK": "2", "FAKE_ARGS": str(tmp_path / "args"), "FAKE_MODE": mode}
    for item in container["env"]:
        if "value" in item:
            env[item["name"]] = item["value"]
    if standby:
        env.pop("NODE_RANK")
    env.update(NCL_LAUNCH=str(fake), NCL_RUN_DIR=str(tmp_path / "runs" / "llama70b"))
    proc = subprocess.Popen(container["args"], env=env, cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return proc, tmp_path / "args"


def parsed(line: str, monkeypatch):
    monkeypatch.setenv("NCL_JOB_SECRET", "s3cret")
    return agent_parse_args(line.split())


@pytest.mark.parametrize("kind", ["pytorchjob", "jobset"])
def test_pod_command_is_a_valid_agent_command_line(kind, tmp_path, monkeypatch):
    """The agent's own parser accepts what the pod would run, node and standby alike."""
    proc, args_file = pod_command(kind, tmp_path, "exit")
    assert proc.wait(timeout=30) == 0, proc.stderr.read()
    args = parsed(args_file.read_text().splitlines()[0], monkeypatch)
    assert (args.nnodes, args.node_rank, args.nproc_per_node, args.spares) == (3, 2, 8, 1)
    assert args.script == "recipes/pretrain.py"
    assert [f"{h}:{p}" for h, p in args.standby_lookups] == [
        "llama70b-standby-0-0.llama70b-peers:29400" if kind == "jobset"
        else "llama70b-standby-0.llama70b-standby:29400"]
    assert args.script_args == ["recipe=llama3_70b_2opt",
                                f"hydra.run.dir={tmp_path}/runs/llama70b", *OVERRIDES]
    assert (tmp_path / "runs" / "llama70b").is_dir()
    (tmp_path / "s").mkdir()
    proc, args_file = pod_command(kind, tmp_path / "s", "exit", standby=True)
    assert proc.wait(timeout=30) == 0, proc.stderr.read()
    args = parsed(args_file.read_text().splitlines()[0], monkeypatch)
    assert args.standby and args.node_rank is None
    assert args.peers.count(",") == 2 and args.standby_port == 29400
    sub = "llama70b-peers" if kind == "jobset" else "llama70b-standby"
    assert args.standby_host.endswith(f".{sub}")
    assert len(args.standby_lookups) == 1


def test_pod_script_passes_shellcheck():
    script = K8S / "agent.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert script.read_text().startswith("# shellcheck shell=bash")
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", "-s", "bash", str(script)], check=True)


def test_pod_command_passes_usr1_to_the_agent(tmp_path):
    proc, args_file = pod_command("jobset", tmp_path, "wait")
    deadline = time.monotonic() + 20
    while not Path(f"{args_file}.trapped").exists():  # not args_file: its traps come later
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)  # what tini passes on from the preStop hook
    assert proc.wait(timeout=20) == 143
    assert "got USR1" in args_file.read_text()


def test_a_pod_whose_node_a_standby_took_becomes_a_standby(tmp_path, monkeypatch):
    proc, args_file = pod_command("jobset", tmp_path, "taken")
    assert proc.wait(timeout=30) == 0, proc.stderr.read()
    first, second = args_file.read_text().splitlines()
    assert parsed(first, monkeypatch).node_rank == 2
    assert parsed(second, monkeypatch).standby
    assert "this pod becomes a standby agent" in proc.stderr.read()
