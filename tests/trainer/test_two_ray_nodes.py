"""Two Ray nodes on this machine (Ray's own ``ray.cluster_utils.Cluster``, 1 CPU each, so the two data-parallel
ranks sit on different nodes): the trainer joins the cluster with ``ray.address``, trains with
``trainer.nnodes=2 trainer.dp_size=2``, is SIGKILLed during step 4 and resumes exactly from checkpoint 2
(tests/trainer/resume_runs.py). ``workers.json`` (written by the trainer at start) names each rank's Ray node.
"""
from __future__ import annotations

import json
import os

import pytest

from tests.trainer.resume_runs import (assert_exact_resume, kill_then_resume, musi_server,  # noqa: F401
                                      trainer_command)
from tests.trainer.test_e2e_cpu import warm_policy  # noqa: F401  (module fixture)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


@pytest.fixture
def two_node_cluster(monkeypatch):
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("RAY_raylet_start_wait_time_s", "120")  # a loaded 2-core machine registers nodes slowly
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "wait": False})
    cluster.add_node(num_cpus=1, wait=False)
    cluster.wait_for_nodes(timeout=300)
    try:
        yield cluster
    finally:
        cluster.shutdown()


def _node_ids(out_dir: str) -> dict[str, list[str]]:
    groups = json.load(open(os.path.join(out_dir, "workers.json")))
    return {name: [w["node_id"] for w in sorted(ranks, key=lambda w: w["rank"])] for name, ranks in groups.items()}


def test_two_nodes_train_and_resume(tmp_path, musi_parquet, musi_server, warm_policy, two_node_cluster):
    nodes = {two_node_cluster.head_node.node_id} | {n.node_id for n in two_node_cluster.worker_nodes}
    assert len(nodes) == 2
    out_dir = str(tmp_path / "run")
    cmd = trainer_command("cpu_test", warm_policy, musi_parquet, musi_server, out_dir,
                          f"ray.address={two_node_cluster.address}", "trainer.nnodes=2", "trainer.dp_size=2",
                          "actor_rollout_ref.fsdp.enable=auto")

    def check_placement() -> None:
        placed = _node_ids(out_dir)
        for name in ("actor_rollout_ref", "critic"):
            assert set(placed[name]) == nodes, (name, placed)  # rank 0 on one node, rank 1 on the other
        assert placed["actor_rollout_ref"] == placed["critic"]  # colocated per rank

    # the killed run's placement is checked before run 2 rewrites workers.json
    run1, _ = kill_then_resume(cmd, out_dir, tmp_path, after_run1=check_placement)
    check_placement()  # the resumed run spans both nodes too
    rows = assert_exact_resume(out_dir, run1)
    assert all(m["search/num_searches/mean"] > 0 for m in rows)
