"""scripts/slurm/pretrain.sbatch offline: its command lines (dry run, read back by the agent's
own parser) and its supervisor, with stand-ins for srun, scancel and scontrol that record
each step and act out agents, standbys and the time-limit signal.

On a real (single-node) Slurm: tests/e2e/test_slurm.py.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nemo_checkpointless.launch.agent import parse_args as agent_parse_args

REPO = Path(__file__).resolve().parents[2]
SLURM = REPO / "scripts" / "slurm"
SBATCH = SLURM / "pretrain.sbatch"
SUPERVISE = SLURM / "supervise.sh"
LOCAL_CLUSTER = SLURM / "local_cluster.sh"
OVERRIDES = ["checkpointless=tier4", "trainer.max_steps=1000",
             "fault.plan=[{rank:1,step:2,phase:optimizer,kind:kill}]"]

FAKE_SCONTROL = f"""#!/usr/bin/env bash
# stand-in for scontrol: 'show hostnames LIST', 'show node NAME', 'requeue JOB'
if [[ $1 == show && $2 == hostnames ]]; then
    if [[ $3 =~ ^([a-z]+)\\[([0-9]+)-([0-9]+)\\]$ ]]; then
        width=${{#BASH_REMATCH[2]}}
        for ((i = 10#${{BASH_REMATCH[2]}}; i <= 10#${{BASH_REMATCH[3]}}; i++)); do
            printf "%s%0${{width}}d\\n" "${{BASH_REMATCH[1]}}" "$i"
        done
    else
        tr , '\\n' <<<"$3"
    fi
elif [[ $1 == show && $2 == node ]]; then
    if [[ " ${{FAKE_DOWN:-}} " == *" $3 "* ]]; then state=DOWN+NOT_RESPONDING; else state=ALLOCATED; fi
    echo "NodeName=$3 Arch=x86_64 CoresPerSocket=1"
    echo "   State=$state ThreadsPerCore=1"
elif [[ $1 == requeue ]]; then
    echo '{{"requeue": "'"$2"'"}}' >>"$FAKE_LOG"
fi
"""

FAKE_SCANCEL = """#!/usr/bin/env bash
# stand-in for 'scancel --signal=SIG JOB': the signal to every live step (fake srun)
sig=${1#--signal=}
echo '{"scancel": "'"$sig"'"}' >>"$FAKE_LOG"
for pid in $(grep -o '"pid": [0-9]*' "$FAKE_LOG" | cut -d' ' -f2); do
    kill -"$sig" "$pid" 2>/dev/null || true
done
"""

FAKE_SRUN = """#!/usr/bin/env bash
# stand-in for srun + ncl-launch: log the step, then act as FAKE_* say
host="" rank=null prev="" standby=false
for arg in "$@"; do
    case $arg in --nodelist=*) host=${arg#--nodelist=} ;; --standby) standby=true ;; esac
    [[ $prev == --node-rank ]] && rank=$arg
    [[ $prev == --peers ]] && peers=$arg
    prev=$arg
done
secret_sha=$(printf %s "$NCL_JOB_SECRET" | sha256sum | cut -c1-16)
env_json=$(env | grep -E '^(NCCL|FI|CUDA_DEVICE)_' | sort | sed 's/"/\\\\"/g; s/^\\(.*\\)$/"\\1"/' | paste -sd, -)
printf '{"pid": %s, "host": "%s", "rank": %s, "standby": %s, "secret": "%s", "job_id": "%s", "peers": "%s", "env": [%s]}\\n' \\
    "$$" "$host" "$rank" "$standby" "$secret_sha" "$NCL_JOB_ID" "$peers" "$env_json" >>"$FAKE_LOG"
trap 'exit "${FAKE_STOP_CODE:-143}"' USR1 TERM
ticks=$(awk -v s="${FAKE_RUN_S:-1.5}" 'BEGIN { print int(s * 10) }')
if [[ $standby == true ]]; then
    # a standby: take over node FAKE_TAKEOVER once its agent failed (its marker file exists)
    for ((i = 0; i < 300; i++)); do
        for item in ${FAKE_FAIL:-}; do
            r=${item%%@*}
            if [[ -n ${FAKE_TAKEOVER:-} && $r == "$FAKE_TAKEOVER" && -e $FAKE_LOG.$item.failed &&
                ! -e $FAKE_LOG.taken ]]; then
                echo "[agent standby] WARNING: node $r lost: this standby takes it over (store shard at $host:1)" >&2
                touch "$FAKE_LOG.taken"
                for ((j = 0; j < ticks + 5; j++)); do sleep 0.1 & wait $!; done
                exit 0
            fi
        done
        sleep 0.1 & wait $!
    done
    exit 0
fi
[[ -n ${FAKE_METRICS:-} && $rank == 0 ]] && echo '{"step": 1}' >>"$FAKE_METRICS"
for item in ${FAKE_FAIL:-}; do
    if [[ ${item%%=*} == "$rank@$host" && ! -e $FAKE_LOG.${item}.failed ]]; then
        sleep 0.3
        touch "$FAKE_LOG.${item}.failed"
        exit "${item#*=}"
    fi
done
for ((j = 0; j < ticks; j++)); do sleep 0.1 & wait $!; done
"""


@pytest.fixture
def fake_slurm(tmp_path):
    """PATH with stand-ins for srun, scancel and scontrol, and the environment of a 3-node
    job whose agent command (ncl-launch) is on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in [("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL),
                       ("scancel", FAKE_SCANCEL), ("ncl-launch", "#!/bin/sh\nexit 0\n")]:
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "NCL_", "SPARE", "STORE_", "OVERRIDES", "RECIPE",
                                "NCCL_", "FI_", "CUDA_DEVICE", "RUN_DIR", "CONTAINER",
                                "ENTRY", "SITE_ENV", "CPU_BIND", "STANDBY"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", PYTHONPATH=str(REPO), SLURM_JOB_ID="4242",
               SLURM_JOB_NODELIST="gpu[01-03]", SLURMD_NODENAME="gpu01",
               SLURM_SUBMIT_DIR=str(REPO), FAKE_LOG=str(tmp_path / "steps.jsonl"),
               RUN_DIR=str(tmp_path / "run"), POLL_S="0.1", REPLACE_GRACE_S="0.3")
    return env


def run_sbatch(env: dict, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SBATCH), *args], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


def records(env: dict) -> list[dict]:
    path = Path(env["FAKE_LOG"])
    return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []


def steps(env: dict) -> list[dict]:
    return [r for r in records(env) if "pid" in r]


def dry_run(env: dict, *args: str) -> list[list[str]]:
    result = run_sbatch(dict(env, NCL_DRY_RUN="1"), *args)
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.strip().splitlines()]


def agent_argv(words: list[str]) -> tuple[list[str], list[str]]:
    """Split one dry-run line into srun options and the ncl-launch argument list."""
    assert words[0] == "srun"
    i = next(i for i, w in enumerate(words) if w.endswith("ncl-launch"))
    return words[1:i], words[i + 1:]


# ------------------------------------------------------------------ static checks


def test_scripts_parse_and_pass_sanity_checks():
    for script in (SBATCH, LOCAL_CLUSTER, SUPERVISE):
        subprocess.run(["bash", "-n", str(script)], check=True)
        text = script.read_text()
        code = [l for l in text.splitlines() if not l.lstrip().startswith("#")]
        assert "\r" not in text and "\t" not in text
        assert not [l for l in code if "`" in l], "use $(...), not backticks"
        assert not re.search(r"\b(pkill|killall)\b", text), "stop processes by pid only"
    for script in (SBATCH, LOCAL_CLUSTER):
        assert script.read_text().startswith("#!/usr/bin/env bash\n")
        assert "set -euo pipefail" in script.read_text()
    assert SUPERVISE.read_text().startswith("# shellcheck shell=bash")
    lines = SBATCH.read_text().splitlines()
    first_command = next(i for i, l in enumerate(lines) if l and not l.startswith("#"))
    directives = [l for l in lines if l.startswith("#SBATCH")]
    assert all(lines.index(d) < first_command for d in directives), "#SBATCH after a command"
    for flag in ("--no-kill", "--requeue", "--open-mode=append"):
        assert f"#SBATCH {flag}" in directives
    assert any(re.fullmatch(r"#SBATCH --signal=B:USR1@\d+", d) for d in directives)
    assert "--kill-on-bad-exit=0" in SBATCH.read_text()
    # SIGTERM to srun makes it SIGKILL its tasks: graceful signals go through scancel
    assert 'scancel --signal="$fwd" "$SLURM_JOB_ID"' in SUPERVISE.read_text()
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", "-s", "bash", "-x", str(SBATCH), str(SUPERVISE),
                        str(LOCAL_CLUSTER)], check=True, cwd=SLURM)


# ------------------------------------------------------------------ command lines


def test_dry_run_builds_one_agent_per_training_node_and_a_standby_per_spare(fake_slurm,
                                                                            monkeypatch):
    env = dict(fake_slurm, SLURMD_NODENAME="gpu02", SPARE_NODES="1", GPUS_PER_NODE="8",
               SLURM_CPUS_ON_NODE="64", RECIPE="llama3_70b_2opt", LOST_AFTER_S="2",
               OVERRIDES="checkpointless=tier4 trainer.max_steps=1000", NCL_JOB_SECRET="s3cret")
    result = run_sbatch(dict(env, NCL_DRY_RUN="1"), OVERRIDES[-1])
    assert result.returncode == 0, result.stderr
    assert "s3cret" not in result.stdout + result.stderr
    lines = [shlex.split(l) for l in result.stdout.strip().splitlines()]
    assert len(lines) == 3  # 2 training nodes (batch host first), 1 standby
    monkeypatch.setenv("NCL_JOB_SECRET", "s3cret")
    run_dir = env["RUN_DIR"]
    for rank, (words, host) in enumerate(zip(lines, ["gpu02", "gpu01", "gpu03"])):
        srun, argv = agent_argv(words)
        assert f"--nodelist={host}" in srun and "--nodes=1" in srun and "--ntasks=1" in srun
        assert "--kill-on-bad-exit=0" in srun and "--cpus-per-task=64" in srun
        assert "--gres=gpu:8" in srun
        assert words[words.index(srun[-1]) + 1] == "ncl-launch"  # from PATH, no venv
        args = agent_parse_args(argv)
        assert (args.nnodes, args.nproc_per_node, args.spares) == (2, 8, 1)
        assert args.peers == "gpu02:24242,gpu01:24243"  # every training node serves a shard
        assert args.script == str(REPO / "recipes" / "pretrain.py")
        assert args.script_args == ["recipe=llama3_70b_2opt", f"hydra.run.dir={run_dir}",
                                    *OVERRIDES]
        if rank < 2:
            assert not args.standby and args.node_rank == rank
        else:
            assert args.standby and args.node_rank is None
            assert (args.standby_host, args.standby_port, args.timeout_node_lost_after_s) == ("gpu03", 24244, "2")


def test_dry_run_without_spare_nodes_spreads_the_store(fake_slurm):
    env = dict(fake_slurm, NPROC_PER_NODE="4", HANG_TIMEOUT="8", NCL_PORT="30000",
               NCL_LAUNCH=f"{sys.executable} -m nemo_checkpointless.launch.agent")
    lines = dry_run(env, "trainer.max_steps=4")
    assert len(lines) == 3
    for rank, words in enumerate(lines):
        argv = words[words.index("nemo_checkpointless.launch.agent") + 1:]
        assert argv[argv.index("--peers") + 1] == "gpu01:30000,gpu02:30001,gpu03:30002"
        assert argv[argv.index("--node-rank") + 1] == str(rank)
        assert argv[argv.index("--hang-timeout") + 1] == "8"
        assert "recipe=tiny_gpt" in argv and argv[-1] == "trainer.max_steps=4"


@pytest.mark.parametrize("entry,script,recipe,run_key", [
    ("lean", "recipes/pretrain.py", "tiny_gpt", "hydra.run.dir"),
    ("nemo", "recipes/nemo_pretrain.py", "tiny_llama", "run_dir"),
    ("bridge", "recipes/bridge_pretrain.py", None, "hydra.run.dir"),
])
def test_entry_chooses_the_script_recipe_and_run_dir_key(fake_slurm, entry, script, recipe,
                                                         run_key):
    env = dict(fake_slurm, ENTRY=entry, SLURM_JOB_NODELIST="gpu01")
    if recipe is None:
        result = run_sbatch(dict(env, NCL_DRY_RUN="1"))
        assert result.returncode == 1
        assert "ENTRY=bridge needs RECIPE=<name>" in result.stderr
        recipe = "llama3_70b"
        env["RECIPE"] = recipe
    (words,) = dry_run(env)
    _, argv = agent_argv(words)
    i = argv.index(str(REPO / script))
    assert argv[i + 1:] == [f"recipe={recipe}", f"{run_key}={env['RUN_DIR']}"]


@pytest.mark.parametrize("change,message", [
    ({"RUN_DIR": "outputs/run"}, "is relative: give an absolute path"),
    ({"ENTRY": "megatron"}, "ENTRY=megatron: use lean"),
    ({"CPU_BIND": "cores"}, "CPU_BIND=cores: use none or numa"),
    ({"STANDBY": "yes"}, "STANDBY=yes: use 1"),
    ({"SPARE_NODES": "1", "STORE_NODES": "1"}, "standby agents watch every node's store"),
    ({"NCL_VENV": "/nonexistent"}, "NCL_VENV=/nonexistent has no bin/ncl-launch"),
    ({"NCL_VENV": "/x", "NCL_LAUNCH": "ncl-launch"}, "set NCL_LAUNCH or NCL_VENV, not both"),
])
def test_bad_parameters_are_refused_with_what_to_do(fake_slurm, change, message):
    result = run_sbatch(dict(fake_slurm, NCL_DRY_RUN="1", **change))
    assert result.returncode == 1
    assert message in result.stderr, result.stderr


def test_run_dir_override_is_refused(fake_slurm):
    result = run_sbatch(dict(fake_slurm, NCL_DRY_RUN="1"), "hydra.run.dir=/tmp/x")
    assert result.returncode == 1
    assert "set the run directory with RUN_DIR=" in result.stderr


def test_container_runs_the_agent_from_the_image_with_shared_mounts(fake_slurm, tmp_path):
    env = dict(fake_slurm, CONTAINER_IMAGE="/shared/ncl.sqsh", DATA_DIR="/shared/data",
               CONTAINER_MOUNTS="/scratch:/scratch:ro", SLURM_JOB_NODELIST="gpu[01-02]",
               SITE_ENV="scripts/site/efa.env", NCCL_DEBUG="INFO")
    # a venv in the checkout is never picked up: the image's ncl-launch runs
    for words in dry_run(env):
        srun, argv = agent_argv(words)
        assert words[len(srun) + 1] == "ncl-launch"
        opts = dict(o.split("=", 1) for o in srun if "=" in o)
        assert opts["--container-image"] == "/shared/ncl.sqsh"
        assert opts["--container-mounts"] == (f"{env['RUN_DIR']}:{env['RUN_DIR']},"
                                              "/shared/data:/shared/data,/scratch:/scratch:ro")
        assert opts["--container-workdir"] == "/workspace/nemo_checkpointless"
        assert opts["--container-name"] == "ncl-4242"
        assert "--no-container-mount-home" in srun
        names = set(opts["--container-env"].split(","))
        assert {"NCL_JOB_ID", "NCL_JOB_SECRET", "CUDA_DEVICE_MAX_CONNECTIONS", "FI_PROVIDER",
                "FI_EFA_USE_DEVICE_RDMA", "NCCL_DEBUG"} <= names
        assert "/workspace/nemo_checkpointless/recipes/pretrain.py" in argv


def test_a_checkout_venv_is_used_only_when_named(fake_slurm, tmp_path):
    repo = tmp_path / "checkout"
    (repo / ".venv" / "bin").mkdir(parents=True)
    (repo / ".venv" / "bin" / "ncl-launch").write_text("#!/bin/sh\n")
    (repo / ".venv" / "bin" / "ncl-launch").chmod(0o755)
    (repo / "scripts").symlink_to(REPO / "scripts")
    env = dict(fake_slurm, NCL_REPO=str(repo))
    assert {w[len(agent_argv(w)[0]) + 1] for w in dry_run(env)} == {"ncl-launch"}
    named = {w[len(agent_argv(w)[0]) + 1] for w in dry_run(dict(env, NCL_VENV=str(repo / ".venv")))}
    assert named == {str(repo / ".venv" / "bin" / "ncl-launch")}
    no_path = dict(env, PATH="/usr/bin:/bin")
    result = run_sbatch(dict(no_path, NCL_DRY_RUN="1"))
    assert result.returncode == 1
    assert "ncl-launch is not on PATH: activate the environment" in result.stderr


def test_numa_binding_asks_the_agent_and_unbinds_the_step(fake_slurm):
    for words in dry_run(dict(fake_slurm, CPU_BIND="numa")):
        srun, argv = agent_argv(words)
        assert "--cpu-bind=none" in srun
        assert argv[argv.index("--cpu-bind") + 1] == "numa"
    for words in dry_run(dict(fake_slurm, CPU_BIND="none")):
        srun, argv = agent_argv(words)
        assert "--cpu-bind=none" in srun and "--cpu-bind" not in argv
    srun, _ = agent_argv(dry_run(fake_slurm)[0])
    assert not [o for o in srun if o.startswith("--cpu-bind")]


def test_site_environment_files_layer_and_the_environment_wins(fake_slurm, tmp_path):
    site = tmp_path / "site.env"
    site.write_text("# a site\nNCCL_IB_HCA=mlx5_0,mlx5_1\nNCCL_SOCKET_IFNAME=\n"
                    "NCCL_DEBUG=TRACE\nFI_PROVIDER=efa\n")
    env = dict(fake_slurm, SLURM_JOB_NODELIST="gpu01", SITE_ENV=str(site),
               NCCL_DEBUG="INFO", FAKE_RUN_S="0.2")
    result = run_sbatch(env)
    assert result.returncode == 0, result.stderr
    (step,) = steps(env)
    got = dict(e.split("=", 1) for e in step["env"])
    assert got == {"CUDA_DEVICE_MAX_CONNECTIONS": "1",  # default.env
                   "NCCL_IB_HCA": "mlx5_0,mlx5_1", "FI_PROVIDER": "efa",  # site file
                   "NCCL_DEBUG": "INFO"}  # the environment's; NCCL_SOCKET_IFNAME unset
    assert "kept from the submitting environment: NCCL_DEBUG" in result.stderr
    site.write_text("NCCL_IB_HCA mlx5\n")
    result = run_sbatch(dict(env, NCL_DRY_RUN="1"))
    assert result.returncode == 1
    assert f"{site}:1: 'NCCL_IB_HCA mlx5' is not KEY=VALUE" in result.stderr


# ------------------------------------------------------------------ supervisor


def test_a_standby_takes_over_a_dead_node_and_a_new_standby_fills_its_host(fake_slurm):
    env = dict(fake_slurm, SPARE_NODES="1", FAKE_FAIL="1@gpu02=137", FAKE_TAKEOVER="1")
    result = run_sbatch(env)
    assert result.returncode == 0, result.stderr
    log = steps(env)
    started = [(s["rank"], s["host"], s["standby"]) for s in log]
    assert sorted(started[:3], key=str) == sorted(
        [(0, "gpu01", False), (1, "gpu02", False), (None, "gpu03", True)], key=str)
    # no scheduler restart of node rank 1; gpu02 (still usable) becomes the next standby
    assert started[3:] == [(None, "gpu02", True)]
    assert log[3]["peers"] == "gpu01:24242,gpu03:24244"  # node 1's shard: on the standby
    assert len({s["secret"] for s in log}) == 1 and log[0]["job_id"] == "slurm-4242"
    err = result.stderr
    # the failure is seen first (srun returned) or the claim is (a standby may be faster)
    assert ("node rank 1: agent on gpu02 exited with code 137" in err
            or "node rank 1: its former agent on gpu02 exited (code 137)" in err)
    assert "node rank 1: taken over by the standby on gpu03 (replacement 1 of 4)" in err
    assert "every node rank finished: ending the idle standby agents" in err
    assert "job finished: every node rank completed" in err


def test_without_a_claim_the_supervisor_restarts_the_node_itself(fake_slurm):
    env = dict(fake_slurm, SPARE_NODES="1", FAKE_FAIL="1@gpu02=137", CLAIM_WAIT_S="1")
    result = run_sbatch(env)
    assert result.returncode == 0, result.stderr
    assert "no standby took it over within CLAIM_WAIT_S=1s" in result.stderr
    assert [(s["rank"], s["host"]) for s in steps(env)][-1] == (1, "gpu02")


def test_idle_spare_nodes_receive_a_restarted_node(fake_slurm):
    env = dict(fake_slurm, SPARE_NODES="1", STANDBY="0", FAKE_FAIL="1@gpu02=137")
    result = run_sbatch(env)
    assert result.returncode == 0, result.stderr
    log = steps(env)
    started = [(s["rank"], s["host"]) for s in log]
    assert sorted(started[:2]) == [(0, "gpu01"), (1, "gpu02")] and started[2:] == [(1, "gpu03")]
    assert not any(s["standby"] for s in log)
    assert "node rank 1: replacement 1 of 4 on gpu03" in result.stderr
    # the replacement serves store shard 1 from the spare (and publishes it; docs/architecture.md)
    assert log[-1]["peers"] == "gpu01:24242,gpu03:24243"


def test_without_spare_nodes_a_node_restarts_in_place(fake_slurm):
    env = dict(fake_slurm, SLURM_JOB_NODELIST="gpu[01-02]", FAKE_FAIL="1@gpu02=137")
    result = run_sbatch(env)
    assert result.returncode == 0, result.stderr
    assert [(s["rank"], s["host"]) for s in steps(env)][-1] == (1, "gpu02")


def test_supervisor_gives_up_on_a_lost_node_with_no_spare(fake_slurm):
    env = dict(fake_slurm, SLURM_JOB_NODELIST="gpu[01-02]", FAKE_FAIL="1@gpu02=137",
               FAKE_DOWN="gpu02", FAKE_RUN_S="30")
    started = time.monotonic()
    result = run_sbatch(env)
    assert result.returncode == 1
    assert "no spare node left and gpu02 is unusable" in result.stderr
    assert time.monotonic() - started < 15, "the surviving agent must be stopped"
    assert len(steps(env)) == 2


@pytest.mark.parametrize("fail,code,message,spare_nodes,extra", [
    ("1@gpu02=3", 3, "cannot continue", "0", {}),  # the job itself is unrecoverable
    ("0@gpu01=1 1@gpu02=1", 1, "no agent is left", "0", {}),  # every node: a bad config
    ("0@gpu01=137", 1, "only store shard", "1", {"STORE_NODES": "1", "STANDBY": "0"}),
])
def test_supervisor_does_not_replace_job_failures(fake_slurm, fail, code, message, spare_nodes,
                                                  extra):
    env = dict(fake_slurm, FAKE_FAIL=fail, FAKE_RUN_S="30", SPARE_NODES=spare_nodes,
               SLURM_JOB_NODELIST="gpu[01-03]" if spare_nodes == "1" else "gpu[01-02]", **extra)
    started = time.monotonic()
    result = run_sbatch(env)
    assert result.returncode == code, result.stderr
    assert message in result.stderr
    assert time.monotonic() - started < 15
    assert len(steps(env)) == 2  # nothing restarted


# ------------------------------------------------------------------ time limit, requeue


def signalled_run(env: dict, sig: int = signal.SIGUSR1, after_steps: int = 2,
                  timeout: float = 60) -> subprocess.CompletedProcess:
    """Run the script; once `after_steps` steps started, send `sig` to it (what
    `#SBATCH --signal=B:USR1@...` or a preemption does)."""
    proc = subprocess.Popen(["bash", str(SBATCH)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    deadline = time.monotonic() + timeout
    while len(steps(env)) < after_steps:
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture
def stop_env(fake_slurm, tmp_path):
    run_dir = Path(fake_slurm["RUN_DIR"])
    run_dir.mkdir()
    return dict(fake_slurm, SLURM_JOB_NODELIST="gpu[01-02]", FAKE_RUN_S="30",
                FAKE_METRICS=str(run_dir / "metrics.jsonl"))


def test_usr1_checkpoints_every_agent_and_requeues_the_job(stop_env):
    result = signalled_run(stop_env)
    assert result.returncode == 0, result.stderr
    recs = records(stop_env)
    assert {"scancel": "USR1"} in recs and {"requeue": "4242"} in recs
    assert "got SIGUSR1: every agent checkpoints at the next step boundary" in result.stderr
    assert "every agent checkpointed and stopped" in result.stderr
    assert "requeueing job 4242 (run 2)" in result.stderr
    assert len(steps(stop_env)) == 2  # stopped agents are not replaced


@pytest.mark.parametrize("change,message,code", [
    ({"REQUEUE": "0"}, "REQUEUE=0: not requeueing", 143),
    ({"SLURM_RESTART_COUNT": "3", "MAX_REQUEUES": "3"}, "MAX_REQUEUES=3 reached", 143),
    ({"FAKE_METRICS": ""}, "no step was committed in this run", 143),
    ({"FAKE_STOP_CODE": "138"}, "not every agent confirmed a checkpoint", 1),
])
def test_usr1_does_not_requeue_when_it_should_not(stop_env, change, message, code):
    env = dict(stop_env, **change)
    if change.get("FAKE_METRICS") == "":
        Path(stop_env["FAKE_METRICS"]).write_text('{"step": 1}\n')
    result = signalled_run(env)
    assert result.returncode == code, result.stderr
    assert message in result.stderr
    assert {"requeue": "4242"} not in records(env)
    if "SLURM_RESTART_COUNT" in change:
        assert steps(env)[0]["job_id"] == "slurm-4242.3"  # a new identity per run


def test_sigterm_stops_every_agent_and_leaves_the_requeue_to_slurm(stop_env):
    result = signalled_run(stop_env, signal.SIGTERM)
    assert result.returncode == 143, result.stderr
    recs = records(stop_env)
    assert {"scancel": "TERM"} in recs and {"requeue": "4242"} not in recs
    assert "every agent checkpointed and stopped" in result.stderr


def test_nemo_entry_forks_its_ranks_from_a_zygote_that_imported_nemo(fake_slurm):
    """scripts/slurm/nemo.env is what NeMo-Run's NclLaunch exports (AGENT_ENV), read for
    ENTRY=nemo only; the submitting environment still wins."""
    from nemo_checkpointless.nemo.launch_env import AGENT_ENV

    lines = [l for l in (SLURM / "nemo.env").read_text().splitlines()
             if l.strip() and not l.startswith("#")]
    assert dict(l.split("=", 1) for l in lines) == AGENT_ENV

    def from_files(env: dict) -> set[str]:
        result = run_sbatch(dict(env, NCL_DRY_RUN="1"))
        assert result.returncode == 0, result.stderr
        (line,) = [l for l in result.stderr.splitlines() if "environment from files:" in l]
        return set(line.split("environment from files: ", 1)[1].split(" ")[0].split(","))

    assert set(AGENT_ENV) <= from_files(dict(fake_slurm, ENTRY="nemo"))
    assert not set(AGENT_ENV) & from_files(dict(fake_slurm, ENTRY="lean"))
    kept = run_sbatch(dict(fake_slurm, ENTRY="nemo", NCL_DRY_RUN="1",
                           JE_ARROW_MALLOC_CONF="x")).stderr
    assert "kept from the submitting environment: JE_ARROW_MALLOC_CONF" in kept
