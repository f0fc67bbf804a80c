"""`sbatch --nodes 2 slurm/dpo.sh` on a two-node Slurm cluster built on this machine (tests/slurm_cluster.py:
two network namespaces, each with its own hostname, address and slurmd): the DPO stage trains with world size 2
across the nodes, each node's rank from its own SLURM_NODEID, the rendezvous on the first node."""

from __future__ import annotations

import json
import os
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


def test_sbatch_on_two_nodes_trains_with_world_size_two(two_nodes, tmp_path, tiny_model, tiny_data):
    recipe = tiny_recipe(tmp_path, tiny_model, tiny_data, "dpo", global_batch_size=4, per_device_train_batch_size=2,
                         max_steps=2)
    out = tmp_path / "dpo-out"
    job = two_nodes.run(["sbatch", "--parsable", "--wait", "--nodes", "2", "--gres=none", "--cpus-per-task=1",
                         "--mem=2000", f"--output={tmp_path}/job-%j.out", "slurm/dpo.sh", recipe,
                         "--output_dir", str(out)], cwd=ROOT, timeout=900,
                        env={"ALIGNKIT_PYTHON": sys.executable, "ACCELERATE_CONFIG": "recipes/accelerate/ddp.yaml",
                             "GLOO_SOCKET_IFNAME": TwoNodeCluster.IFACE})
    job_id = job.stdout.strip().split(";")[0]
    log = (tmp_path / f"job-{job_id}.out").read_text() if job_id else ""
    assert job.returncode == 0, job.stderr + log[-4000:]
    assert f"alignkit dpo: job {job_id} on 2 node(s) [node[1-2]], rendezvous node1:" in log
    # one `alignkit launch` per node, each with its own machine rank and node1 as the rendezvous
    for rank in (0, 1):
        assert f"--num_machines 2 --machine_rank {rank} --main_process_ip node1" in log, log[-4000:]
    metrics = json.load(open(out / "metrics.json"))
    assert metrics["world_size"] == 2 and metrics["train_steps"] == 2 and metrics["gradient_accumulation_steps"] == 1
