"""The user's own recipe object, as is: NeMo-Run's local executor through ncl-launch (run for
real, on a real Megatron indexed dataset, with a killed rank), the Slurm executor's
generated batch script, the runner's inputs, and the command line's data override."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("nemo.collections.llm", reason="NeMo 2 is not installed here; run `make "
                    "test-nemo`, which uses .venv-nemo")

from nemo_jobs import ENTRY, REPO, Job, assert_same_run, nemo_env  # noqa: E402

pytestmark = [pytest.mark.timeout(1800)]


def test_local_executor_resumes_the_recovered_jobs_checkpoint(dataset, chaos, reference,
                                                               tmp_path):
    """The user's recipe object as is, run by NeMo-Run's local executor through ncl-launch:
    a new job that resumes (NeMo's AutoResume) from the step-4 checkpoint the recovered job
    wrote, loses rank 1 in step 6, and ends as the fault-free job did."""
    (ckpt,) = [p for p in chaos.checkpoints() if "step=3" in p.name]
    run_dir = tmp_path / "run"
    script = tmp_path / "user.py"
    script.write_text(textwrap.dedent(f"""
        import nemo_run as run
        from nemo_checkpointless.nemo import (apply_checkpointless, ncl_executor,
                                              pretraining_data, tiny_llama)

        recipe = tiny_llama.pretrain_recipe(max_steps=8, dir="{run_dir}/log")
        recipe = pretraining_data(recipe, paths=["{dataset}"])
        recipe.resume.resume_from_path = "{ckpt}"
        recipe = apply_checkpointless(
            recipe, run_dir="{run_dir}",
            fault_plan=[dict(rank=1, step=6, phase="grad_sync", kind="kill")])
        executor = ncl_executor(run.LocalExecutor(ntasks_per_node=2), spares=1)
        run.run(recipe, executor=executor, name="tiny", tail_logs=False)
    """))
    env = nemo_env(NEMORUN_HOME=str(tmp_path / "nemo_run"))
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                         text=True, timeout=1500, env=env)
    logs = "".join(p.read_text() for p in (tmp_path / "nemo_run").rglob("*.log"))
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:] + logs[-6000:]
    job = Job(0, logs, run_dir)
    assert_same_run(job, reference, first_step=5)
    assert len(job.summary["recoveries"]) == 1, logs[-6000:]
    assert [e["step"] for e in job.events if e["event"] == "fault"] == [6]


def test_slurm_executor_script_starts_ncl_launch(tmp_path):
    """NeMo-Run's own packaging and sbatch rendering of a Slurm job with NclLaunch (in a
    process of its own: NeMo-Run's packager runs git through a terminal library)."""
    script = tmp_path / "slurm.py"
    script.write_text(textwrap.dedent(f"""
        import json
        import nemo_run as run
        from nemo_run.run.torchx_backend.packaging import package
        from nemo_run.run.torchx_backend.schedulers.slurm import SlurmTunnelScheduler
        from nemo_checkpointless.nemo import NclLaunch, apply_checkpointless, tiny_llama

        recipe = apply_checkpointless(tiny_llama.pretrain_recipe(num_nodes=2,
                                                                 num_gpus_per_node=8))
        executor = run.SlurmExecutor(
            account="acct", partition="gpu", nodes=2, ntasks_per_node=1, gpus_per_node=8,
            tunnel=run.LocalTunnel(job_dir="{tmp_path}/jobs"),
            launcher=NclLaunch(nproc_per_node=8, spares=1))
        executor.assign("exp", "{tmp_path}/jobs/exp", "tiny", "tiny")
        app = package("tiny", recipe, executor, serialize_to_file=True)
        info = SlurmTunnelScheduler(session_name="t")._submit_dryrun(app, executor)
        print(json.dumps({{"sbatch": info.request.materialize()}}))
    """))
    out = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True,
                         text=True, timeout=900, env=nemo_env(NEMORUN_HOME=str(tmp_path / "h")),
                         stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr[-4000:]
    sbatch = json.loads(out.stdout.strip().splitlines()[-1])["sbatch"]
    from nemo_checkpointless.nemo.launch_env import AGENT_ENV
    from nemo_checkpointless.nemo.run import load

    assert "#SBATCH --nodes=2" in sbatch and "#SBATCH --ntasks-per-node=1" in sbatch
    node_script = tmp_path / "jobs" / "exp" / "tiny" / "scripts" / "tiny.sh"
    assert f"bash {node_script}" in sbatch
    node = node_script.read_text()
    for key, value in AGENT_ENV.items():
        assert f"export {key}={value}" in node
    assert "import nemo_checkpointless.nemo.scripts.run_recipe as m" in node
    launch = node.strip().splitlines()[-1]
    assert launch.startswith("exec python -m nemo_checkpointless.launch.agent --nnodes "
                             '"${SLURM_NNODES:-1}" --nproc-per-node 8 --spares 1 '
                             '--rdzv-endpoint "${head_node_ip:-127.0.0.1}:29400"'), launch
    assert launch.split()[-4:-1] == ['"$runner"', "-n", "tiny"]
    # the ranks load the recipe object itself, checkpointless fields and all
    from nemo_checkpointless.nemo import apply_checkpointless, tiny_llama

    assert load(launch.split()[-1]) == apply_checkpointless(
        tiny_llama.pretrain_recipe(num_nodes=2, num_gpus_per_node=8))


def test_runner_loads_module_function_and_serialized_forms():
    from nemo_run.core.serialization.zlib_json import ZlibJSONSerializer

    from nemo_checkpointless.nemo import tiny_llama
    from nemo_checkpointless.nemo.run import load

    recipe = load("nemo_checkpointless.nemo.tiny_llama:pretrain_recipe")
    assert recipe == tiny_llama.pretrain_recipe()
    assert load(ZlibJSONSerializer().serialize(recipe)) == recipe
    with pytest.raises(SystemExit, match="neither NeMo-Run's serialized recipe"):
        load("not-a-recipe")


def test_data_override_needs_paths():
    out = subprocess.run([sys.executable, str(ENTRY), "recipe=tiny_llama", "data=pretraining",
                          "--dryrun"], cwd=REPO, capture_output=True, text=True, timeout=600,
                         env=nemo_env())
    assert out.returncode != 0
    assert "error: data=pretraining needs data.paths=[PREFIX,...]" in out.stderr
    assert "Traceback" not in out.stderr


def test_data_override_builds_a_pretraining_data_module(dataset):
    from nemo.collections.llm.gpt.data.pre_training import PreTrainingDataModule

    from nemo_checkpointless.data.tokenizer import load_tokenizer

    entry = load_entry()
    recipe, _, _ = entry.build(["recipe=tiny_llama", "data=pretraining",
                                f"data.paths=[{dataset}]", "data.seq_length=32"])
    assert recipe.data.__fn_or_cls__ is PreTrainingDataModule
    assert recipe.data.paths == [str(dataset)]
    assert recipe.data.tokenizer.__fn_or_cls__ is load_tokenizer
    assert (recipe.data.global_batch_size, recipe.data.micro_batch_size) == (8, 2)


def load_entry():
    """recipes/nemo_pretrain.py as a module (its build() is what the command line runs)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("nemo_pretrain", ENTRY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
