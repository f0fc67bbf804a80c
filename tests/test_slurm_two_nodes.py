"""`sbatch --nodes 2 slurm/dpo.sh` on a two-node Slurm cluster built on this machine (tests/slurm_cluster.py:
two network namespaces, each with its own hostname, address and slurmd): the DPO stage trains with world size 2
across the nodes, each node's rank from its own SLURM_NODEID, the rendezvous on the first node."""

from __future__ import annotations

import json
import os
import re
import sys

import pytest

from conftest import tiny_recipe
from slurm_cluster import TwoNodeCluster

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def two_nodes():
    import shutil
    import tempfile

    root = tempfile.mkdtemp(prefix="alignkit-slurm2-")  # not pytest's 0700 tmp: munged runs as the munge user
    cluster = TwoNodeCluster(root)
    yield cluster
    cluster.stop()
    shutil.rmtree(root, ignore_errors=True)


# ~7-10 steps/s: the USR1 must arrive mid-run even on a loaded machine (at 40 steps it once came after the end)
STEPS = 160
ENV = {"ALIGNKIT_PYTHON": sys.executable, "ACCELERATE_CONFIG": "recipes/accelerate/ddp.yaml",
       "GLOO_SOCKET_IFNAME": TwoNodeCluster.IFACE}


def sbatch(cluster, recipe, out, *extra):
    return cluster.run(["sbatch", "--parsable", *extra, "--nodes", "2", "--gres=none", "--cpus-per-task=1",
                        "--mem=2000", f"--output={out}-%j.out", "slurm/dpo.sh", recipe, "--output_dir", str(out)],
                       cwd=ROOT, timeout=900, env=ENV)


@pytest.fixture(scope="module")
def uninterrupted(two_nodes, tmp_path_factory, tiny_model, tiny_data):
    """One DPO job on both nodes, run to the end: checked below, and the reference of the preemption test."""
    tmp = tmp_path_factory.mktemp("two-nodes")
    recipe = tiny_recipe(tmp, tiny_model, tiny_data, "dpo", global_batch_size=4, per_device_train_batch_size=2,
                         max_steps=STEPS, save_steps=2, learning_rate=5e-3)
    out = tmp / "uninterrupted"
    job = sbatch(two_nodes, recipe, out, "--wait")
    job_id = job.stdout.strip().split(";")[0]
    log = (tmp / f"uninterrupted-{job_id}.out").read_text(errors="replace") if job_id else ""
    return recipe, out, job, job_id, log


def test_sbatch_on_two_nodes_trains_with_world_size_two(uninterrupted):
    recipe, out, job, job_id, log = uninterrupted
    assert job.returncode == 0, job.stderr + log[-4000:]
    assert f"alignkit dpo: job {job_id} on 2 node(s) [node[1-2]], rendezvous node1:" in log
    # one `alignkit launch` per node, each with its own machine rank and node1 as the rendezvous
    for rank in (0, 1):
        assert f"--num_machines 2 --machine_rank {rank} --main_process_ip node1" in log, log[-4000:]
    metrics = json.load(open(out / "metrics.json"))
    assert metrics["world_size"] == 2 and metrics["train_steps"] == STEPS
    assert metrics["gradient_accumulation_steps"] == 1


def job_state(cluster, job_id: str) -> dict:
    out = cluster.run(["scontrol", "show", "job", job_id, "-o"]).stdout
    return dict(f.split("=", 1) for f in out.split() if "=" in f)


def test_usr1_under_slurm_checkpoints_requeues_and_the_requeued_job_resumes_to_the_uninterrupted_result(
        two_nodes, uninterrupted):
    """`scancel --signal=USR1 --batch` (what `--signal=B:USR1@300` sends before the time limit or on preemption)
    mid-training: the batch shell forwards it through srun to `alignkit launch` on each node, every rank checkpoints
    and exits 75, the job requeues itself, the requeued job resumes from the checkpoint and ends with the
    uninterrupted run's adapter and logged losses."""
    import csv
    import time

    from safetensors.torch import load_file

    recipe, reference, job, _, _ = uninterrupted
    assert job.returncode == 0
    out = reference.parent / "preempted"
    job_id = sbatch(two_nodes, recipe, out).stdout.strip().split(";")[0]
    log = reference.parent / f"preempted-{job_id}.out"
    deadline = time.time() + 600
    while time.time() < deadline and not (log.exists() and "'loss'" in log.read_text(errors="replace")):
        time.sleep(0.2)  # training is under way on both nodes
    assert two_nodes.run(["scancel", "--signal=USR1", "--batch", job_id]).returncode == 0
    while time.time() < deadline and job_state(two_nodes, job_id).get("JobState") != "COMPLETED":
        time.sleep(2)
    state, text = job_state(two_nodes, job_id), log.read_text(errors="replace")
    assert state.get("JobState") == "COMPLETED" and state.get("Restarts") == "1", (state, text[-4000:])
    assert f"USR1 — asking the stage to checkpoint, then requeueing job {job_id}" in text
    # Every rank stops at the same step; a rank whose node's launcher forwards the signal after the ranks agreed to
    # stop says it was stopped by another rank's signal (a race of signal delivery, seen on a 2-core CI machine).
    stops = re.findall(r"stopped by (SIGUSR1|a signal to another rank) at step (\d+);", text)
    assert len(stops) == 2 and ("SIGUSR1", stops[0][1]) in stops and len({step for _, step in stops}) == 1, stops
    assert "resuming from" in text, text[-4000:]
    stopped = int(stops[0][1])
    assert 0 < stopped < STEPS
    metrics = json.load(open(out / "metrics.json"))
    assert metrics["world_size"] == 2 and metrics["train_steps"] == STEPS
    a, b = (load_file(str(d / "adapter_model.safetensors")) for d in (out, reference))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)

    def losses(d):
        with open(d / "train_log.csv") as f:
            return [r["loss"] for r in csv.DictReader(f)]

    assert losses(out) == losses(reference) and len(losses(out)) == STEPS
