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
import subprocess
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


LAYOUTS = [("pytorchjob", ["--nodes", "4"]), ("pytorchjob", ["--nodes", "1", "--gpus-per-node", "0"]),
           ("jobset", ["--nodes", "4"]), ("jobset", ["--nodes", "1", "--gpus-per-node", "0"]),
           ("jobset", ["--nodes", "3", "--restart-failed-job"])]
OVERRIDES = ["checkpointless=tier4", "trainer.max_steps=1000",
             "fault.plan=[{rank:1,step:2,phase:optimizer,kind:kill}]"]


# ------------------------------------------------------------------ Kubernetes


@pytest.mark.parametrize("kind,argv", LAYOUTS)
def test_builtin_kinds_pass_the_kubernetes_schema(kind, argv):
    docs = rendered(kind, *argv, *OVERRIDES)
    builtin = [d for d in docs if d["apiVersion"] == "v1"]
    assert {d["kind"] for d in builtin} == ({"Secret"} if kind == "pytorchjob"
                                            else {"Secret", "Service"})
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


@pytest.mark.parametrize("kind", ["pytorchjob", "jobset"])
def test_manifests_wire_secret_shm_and_peers(kind):
    docs = rendered(kind, "--nodes", "3", "--gpus-per-node", "8", *OVERRIDES)
    secret = by_kind(docs, "Secret")
    assert re.fullmatch(r"[0-9a-f]{32}", secret["stringData"]["NCL_JOB_SECRET"])
    spec = pod_spec(docs)
    (container,) = spec["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["NCL_JOB_SECRET"]["valueFrom"]["secretKeyRef"] == {
        "name": secret["metadata"]["name"], "key": "NCL_JOB_SECRET"}
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm")
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    assert volume["emptyDir"]["medium"] == "Memory"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
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
    assert "resources" not in pod_spec(docs)["containers"][0]
    jobset = by_kind(rendered("jobset", "--nodes", "2", "--restart-failed-job"), "JobSet")
    assert {"name": "replaceNode", "action": "RestartJob"} in jobset["spec"]["failurePolicy"]["rules"]


def test_existing_secret_is_referenced_not_generated():
    docs = rendered("jobset", "--nodes", "2", "--secret-name", "team-secret")
    assert not [d for d in docs if d["kind"] == "Secret"]
    env = {e["name"]: e for e in pod_spec(docs)["containers"][0]["env"]}
    assert env["NCL_JOB_SECRET"]["valueFrom"]["secretKeyRef"]["name"] == "team-secret"


@pytest.mark.parametrize("kind", ["pytorchjob", "jobset"])
def test_container_command_is_a_valid_agent_command_line(kind, tmp_path, monkeypatch):
    """Run the pod's `bash -c` with its env (downward API and Secret filled in) and a stand-in
    for ncl-launch; the agent's own parser must accept what it would have received."""
    docs = rendered(kind, "--nodes", "3", *OVERRIDES)
    (container,) = pod_spec(docs)["containers"]
    fake = tmp_path / "fake-launch"
    fake.write_text("#!/usr/bin/env python3\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    fake.chmod(0o755)
    env = {"PATH": os.environ["PATH"], "NCL_JOB_SECRET": "s3cret", "NODE_RANK": "2",
           "RANK": "2"}  # NODE_RANK: JobSet's job-index annotation; RANK: the operator's
    for item in container["env"]:
        if "value" in item:
            env[item["name"]] = item["value"]
    env["NCL_LAUNCH"] = str(fake)
    out = subprocess.run([*container["command"], *container["args"]], env=env, check=True,
                         capture_output=True, text=True, cwd=tmp_path).stdout
    argv = json.loads(out)
    monkeypatch.setenv("NCL_JOB_SECRET", "s3cret")
    args = agent_parse_args(argv)
    assert (args.nnodes, args.node_rank, args.nproc_per_node, args.spares) == (3, 2, 8, 1)
    assert args.peers == env["NCL_PEERS"]
    assert args.script == "recipes/pretrain.py"
    assert args.script_args == ["recipe=llama3_70b_2opt", *OVERRIDES]

