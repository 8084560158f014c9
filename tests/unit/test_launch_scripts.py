"""Launch scripts, offline: Kubernetes manifests against their schemas, the Slurm script's
command lines and its supervisor (with stand-ins for srun and scontrol).

The manifests are rendered by scripts/k8s/render.py; built-in kinds are checked with
kubernetes-validate (strict), PyTorchJob and JobSet with the schemas in scripts/k8s/schemas/
(whose embedded pod and job templates resolve to the same strict Kubernetes definitions).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from referencing import Registry, Resource

from nemo_checkpointless.launch.agent import parse_args as agent_parse_args

REPO = Path(__file__).resolve().parents[2]
SBATCH = REPO / "scripts" / "slurm" / "pretrain.sbatch"
LOCAL_CLUSTER = REPO / "scripts" / "slurm" / "local_cluster.sh"
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


# ------------------------------------------------------------------ Slurm

FAKE_SCONTROL = f"""#!/usr/bin/env bash
# stand-in for scontrol: 'show hostnames LIST' and 'show node NAME'
if [[ $1 == show && $2 == hostnames ]]; then
    exec {shlex.quote(sys.executable)} -c 'import sys
from nemo_checkpointless.comm.init import expand_hostlist
print("\\n".join(expand_hostlist(sys.argv[1])))' "$3"
elif [[ $1 == show && $2 == node ]]; then
    if [[ " ${{FAKE_DOWN:-}} " == *" $3 "* ]]; then state=DOWN+NOT_RESPONDING; else state=ALLOCATED; fi
    echo "NodeName=$3 Arch=x86_64 CoresPerSocket=1"
    echo "   State=$state ThreadsPerCore=1"
fi
"""

FAKE_SRUN = """#!/usr/bin/env bash
# stand-in for srun: log the step, then fail as FAKE_FAIL says ("RANK@HOST=CODE ...", the
# first start there only) or run for FAKE_RUN_S seconds and succeed
host="" rank="" peers=""
prev=""
for arg in "$@"; do
    case $arg in --nodelist=*) host=${arg#--nodelist=} ;; esac
    [[ $prev == --node-rank ]] && rank=$arg
    [[ $prev == --peers ]] && peers=$arg
    prev=$arg
done
secret_sha=$(printf %s "$NCL_JOB_SECRET" | sha256sum | cut -c1-16)
printf '{"host": "%s", "rank": %s, "secret": "%s", "job_id": "%s", "peers": "%s"}\\n' \\
    "$host" "$rank" "$secret_sha" "$NCL_JOB_ID" "$peers" >>"$FAKE_LOG"
for item in ${FAKE_FAIL:-}; do
    if [[ ${item%%=*} == "$rank@$host" && ! -e $FAKE_LOG.$rank@$host ]]; then
        touch "$FAKE_LOG.$rank@$host"
        sleep 0.3
        exit "${item#*=}"
    fi
done
exec sleep "${FAKE_RUN_S:-1.5}"
"""


@pytest.fixture
def fake_slurm(tmp_path):
    """PATH with stand-ins for srun and scontrol, and the environment of a 3-node job."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in [("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)]:
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "NCL_", "SPARE", "STORE_", "OVERRIDES", "RECIPE"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", PYTHONPATH=str(REPO), SLURM_JOB_ID="4242",
               SLURM_JOB_NODELIST="gpu[01-03]", SLURMD_NODENAME="gpu01",
               SLURM_SUBMIT_DIR=str(REPO), FAKE_LOG=str(tmp_path / "steps.jsonl"),
               POLL_S="0.1", REPLACE_GRACE_S="0.3")
    return env


def run_sbatch(env: dict, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SBATCH), *args], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


def steps(env: dict) -> list[dict]:
    path = Path(env["FAKE_LOG"])
    return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []


def test_scripts_parse_and_pass_sanity_checks():
    for script in (SBATCH, LOCAL_CLUSTER):
        subprocess.run(["bash", "-n", str(script)], check=True)
        text = script.read_text()
        assert text.startswith("#!/usr/bin/env bash\n")
        assert "set -euo pipefail" in text
        code = [l for l in text.splitlines() if not l.lstrip().startswith("#")]
        assert "\r" not in text and "\t" not in text
        assert not [l for l in code if "`" in l], "use $(...), not backticks"
        assert not re.search(r"\b(pkill|killall)\b", text), "stop processes by pid only"
    lines = SBATCH.read_text().splitlines()
    first_command = next(i for i, l in enumerate(lines) if l and not l.startswith("#"))
    directives = [l for l in lines if l.startswith("#SBATCH")]
    assert all(lines.index(d) < first_command for d in directives), "#SBATCH after a command"
    assert "#SBATCH --no-kill" in directives
    assert "--kill-on-bad-exit=0" in SBATCH.read_text()
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", "-s", "bash", str(SBATCH), str(LOCAL_CLUSTER)], check=True)


def agent_argv(line: str) -> tuple[list[str], list[str]]:
    """Split one dry-run line into srun options and the ncl-launch argument list."""
    words = shlex.split(line)
    assert words[0] == "srun"
    i = next(i for i, w in enumerate(words) if w.endswith("ncl-launch"))
    return words[1:i], words[i + 1:]


def test_sbatch_dry_run_builds_one_agent_per_training_node(fake_slurm, monkeypatch):
    env = dict(fake_slurm, NCL_DRY_RUN="1", SLURMD_NODENAME="gpu02", SPARE_NODES="1",
               GPUS_PER_NODE="8", SLURM_CPUS_ON_NODE="64", RECIPE="llama3_70b_2opt",
               OVERRIDES="checkpointless=tier4 trainer.max_steps=1000", NCL_JOB_SECRET="s3cret")
    result = run_sbatch(env, OVERRIDES[-1])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2  # 3 nodes, 1 spare
    assert "s3cret" not in result.stdout + result.stderr
    monkeypatch.setenv("NCL_JOB_SECRET", "s3cret")
    for rank, (line, host) in enumerate(zip(lines, ["gpu02", "gpu01"])):  # batch host first
        srun, argv = agent_argv(line)
        assert f"--nodelist={host}" in srun and "--nodes=1" in srun and "--ntasks=1" in srun
        assert "--kill-on-bad-exit=0" in srun and "--cpus-per-task=64" in srun
        assert "--gres=gpu:8" in srun
        args = agent_parse_args(argv)
        assert (args.nnodes, args.node_rank, args.nproc_per_node, args.spares) == (2, rank, 8, 1)
        assert args.peers == "gpu02:24242,gpu01:24243"  # every training node serves a shard
        assert args.script == str(REPO / "recipes" / "pretrain.py")
        assert args.script_args == ["recipe=llama3_70b_2opt", *OVERRIDES]


def test_sbatch_dry_run_without_spare_nodes_spreads_the_store(fake_slurm):
    env = dict(fake_slurm, NCL_DRY_RUN="1", NPROC_PER_NODE="4", HANG_TIMEOUT="8",
               NCL_PORT="30000", NCL_LAUNCH=f"{sys.executable} -m nemo_checkpointless.launch.agent")
    result = run_sbatch(env, "trainer.max_steps=4")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 3
    for rank, line in enumerate(lines):
        words = shlex.split(line)
        argv = words[words.index("nemo_checkpointless.launch.agent") + 1:]
        assert argv[argv.index("--peers") + 1] == "gpu01:30000,gpu02:30001,gpu03:30002"
        assert argv[argv.index("--node-rank") + 1] == str(rank)
        assert argv[argv.index("--hang-timeout") + 1] == "8"
        assert "recipe=tiny_gpt" in argv and argv[-1] == "trainer.max_steps=4"


def test_supervisor_replaces_a_dead_node_on_a_spare(fake_slurm):
    env = dict(fake_slurm, SPARE_NODES="1", FAKE_FAIL="1@gpu02=137")
    result = run_sbatch(env)
    assert result.returncode == 0, result.stderr
    log = steps(env)
    started = [(s["rank"], s["host"]) for s in log]
    assert sorted(started[:2]) == [(0, "gpu01"), (1, "gpu02")] and started[2:] == [(1, "gpu03")]
    assert len({s["secret"] for s in log}) == 1 and log[0]["job_id"] == "slurm-4242"
    assert "node rank 1: replacement 1 of 4 on gpu03" in result.stderr


def test_supervisor_moves_a_store_node_to_a_spare_and_restarts_in_place_without_one(fake_slurm):
    env = dict(fake_slurm, SPARE_NODES="1", STORE_NODES="2", FAKE_FAIL="1@gpu02=137")
    result = run_sbatch(env)
    assert result.returncode == 0, result.stderr
    assert [(s["rank"], s["host"]) for s in steps(env)][-1] == (1, "gpu03")
    # the replacement serves store shard 1 from the spare (and publishes it; docs/tier1.md)
    assert steps(env)[-1]["peers"] == "gpu01:24242,gpu03:24243"
    env = dict(fake_slurm, SLURM_JOB_NODELIST="gpu[01-02]", FAKE_FAIL="1@gpu02=137",
               FAKE_LOG=fake_slurm["FAKE_LOG"] + ".nospare")
    result = run_sbatch(env)
    assert result.returncode == 0, result.stderr
    assert [(s["rank"], s["host"]) for s in steps(env)][-1] == (1, "gpu02")


def test_supervisor_gives_up_on_a_lost_node_with_no_spare(fake_slurm):
    env = dict(fake_slurm, SLURM_JOB_NODELIST="gpu[01-02]", FAKE_FAIL="1@gpu02=137",
               FAKE_DOWN="gpu02", FAKE_RUN_S="30")
    started = time.monotonic()
    result = run_sbatch(env)
    assert result.returncode == 137
    assert "no spare node left and gpu02 is unusable" in result.stderr
    assert time.monotonic() - started < 15, "the surviving agent must be stopped"
    assert len(steps(env)) == 2


@pytest.mark.parametrize("fail,code,message,spare_nodes", [
    ("1@gpu02=3", 3, "cannot continue", "0"),  # the job itself is unrecoverable
    ("0@gpu01=1 1@gpu02=1", 1, "no agent is left", "0"),  # every node failed: a bad config
    ("0@gpu01=137", 137, "only store shard", "1"),  # the one store server died with it
])
def test_supervisor_does_not_replace_job_failures(fake_slurm, fail, code, message,
                                                  spare_nodes):
    env = dict(fake_slurm, FAKE_FAIL=fail, FAKE_RUN_S="30", SPARE_NODES=spare_nodes,
               SLURM_JOB_NODELIST="gpu[01-03]" if spare_nodes == "1" else "gpu[01-02]")
    if message == "only store shard":
        env["STORE_NODES"] = "1"
    started = time.monotonic()
    result = run_sbatch(env)
    assert result.returncode == code, result.stderr
    assert message in result.stderr
    assert time.monotonic() - started < 15
    assert len(steps(env)) == 2  # nothing restarted
