"""`sbatch slurm/dpo.sh` for real: a one-node Slurm cluster on this machine (tests/slurm_cluster.py) runs the
DPO stage on the tiny model through srun + alignkit launch, and the test checks the job's output."""

from __future__ import annotations

import json
import os

import pytest

from conftest import tiny_recipe
from slurm_cluster import Cluster

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cluster():
    import shutil
    import tempfile

    # not under pytest's tmp dir: that is 0700 root, and munged runs as the munge user
    root = tempfile.mkdtemp(prefix="alignkit-slurm-")
    c = Cluster(root)
    yield c
    c.stop()
    shutil.rmtree(root, ignore_errors=True)


def test_sbatch_dpo_runs_the_stage_and_completes(cluster, tmp_path, tiny_model, tiny_data):
    import sys

    recipe = tiny_recipe(tmp_path, tiny_model, tiny_data, "dpo", global_batch_size=4, max_steps=2)
    out = tmp_path / "dpo-out"
    # The script asks for 8 GPUs and 32 CPUs; this node has none and 2: command-line options override #SBATCH.
    job = cluster.run(["sbatch", "--parsable", "--wait", "--gres=none", "--cpus-per-task=1", "--mem=4000",
                       f"--output={tmp_path}/job-%j.out", "slurm/dpo.sh", recipe, "--output_dir", str(out)],
                      cwd=ROOT, env={"ALIGNKIT_PYTHON": sys.executable,
                                     # one process on this node (auto would pick the 2-process CPU twin ddp-cpu.yaml)
                                     "ACCELERATE_CONFIG": "recipes/accelerate/ddp.yaml"}, timeout=600)
    job_id = job.stdout.strip().split(";")[0]
    log = (tmp_path / f"job-{job_id}.out").read_text(errors="replace") if job_id else ""
    assert job.returncode == 0, job.stderr + log
    assert f"alignkit dpo: job {job_id} on 1 node(s)" in log and "rendezvous" in log
    metrics = json.load(open(out / "metrics.json"))
    assert metrics["train_steps"] == 2 and metrics["world_size"] == 1 and metrics["gradient_accumulation_steps"] == 1
    assert (out / "adapter_model.safetensors").exists()


def test_prepare_step_checks_data_without_loading_weights(cluster, tmp_path, tiny_model, tiny_data):
    import sys

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "Hi", "chosen": "Hello.", "rejected": "Hello."}) + "\n")
    recipe = tiny_recipe(tmp_path, tiny_model, {**tiny_data, "pref_train": str(bad)}, "dpo")
    job = cluster.run(["sbatch", "--parsable", "--wait", "--cpus-per-task=1", "--mem=2000",
                       f"--output={tmp_path}/prep-%j.out", "slurm/prepare.sh",
                       "dpo", recipe], cwd=ROOT, env={"ALIGNKIT_PYTHON": sys.executable}, timeout=300)
    job_id = job.stdout.strip().split(";")[0]
    log = (tmp_path / f"prep-{job_id}.out").read_text()
    assert job.returncode != 0 and "bad.jsonl: row 1" in log and "chosen" in log
