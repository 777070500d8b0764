"""Dispatch split/gather, the in-process worker group, and the Ray worker group with timeouts."""
import numpy as np
import pytest
import torch

from verl.protocol import DataProto
from verl.single_controller.base import Dispatch, LocalWorkerGroup, merge_outputs, split_args
from tests.trainer.toy_workers import SquareWorker


def _data(n):
    return DataProto.from_dict(tensors={"x": torch.arange(n, dtype=torch.float32)},
                               non_tensors={"id": [f"q{i}" for i in range(n)]})


def test_split_pads_and_merge_unpads_proto():
    # 5 rows over 2 ranks: padded to 6 with a copy of row 0, chunks of 3; merge drops the pad row.
    per_args, _, pad = split_args(Dispatch.DP_COMPUTE_PROTO, 2, (_data(5),), {})
    assert pad == 1
    assert [a[0].batch["x"].tolist() for a in per_args] == [[0.0, 1.0, 2.0], [3.0, 4.0, 0.0]]
    merged = merge_outputs(Dispatch.DP_COMPUTE_PROTO, [a[0] for a in per_args], pad)
    assert merged.batch["x"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert list(merged.non_tensor_batch["id"]) == ["q0", "q1", "q2", "q3", "q4"]


def test_split_list_and_other_modes():
    per_args, _, pad = split_args(Dispatch.DP_COMPUTE_LIST, 2, (["a", "b", "c"], "p"), {"k": 1})
    assert pad == 1 and per_args == [(["a", "b"], "p"), (["c", "a"], "p")]
    assert merge_outputs(Dispatch.DP_COMPUTE_LIST, [["A", "B"], ["C", "A"]], pad) == ["A", "B", "C"]
    assert merge_outputs(Dispatch.RANK_ZERO, [7, 8], 0) == 7
    assert merge_outputs(Dispatch.ONE_TO_ALL, [7, 8], 0) == [7, 8]
    with pytest.raises(TypeError, match="DataProto"):
        split_args(Dispatch.DP_COMPUTE_PROTO, 2, ([1, 2],), {})


def test_local_worker_group_calls_and_rejects_unregistered():
    wg = LocalWorkerGroup(SquareWorker, "square", offset=1.0)
    out = wg.square(_data(3))
    assert out.batch["y"].tolist() == [1.0, 2.0, 5.0]  # x*x + 1 for x = 0, 1, 2
    assert wg.all_reduce_rank() == [1.0]
    with pytest.raises(AttributeError, match="not a registered worker method"):
        wg.master_address


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_ray_worker_group_dp_dispatch_gloo_and_timeouts(ray_cluster):
    from verl.single_controller.ray import RayResourcePool, RayWaitTimeout, RayWorkerGroup

    pool = RayResourcePool(2, num_cpus_per_bundle=0.5, num_gpus_per_bundle=0, timeout_s=60)
    wg = RayWorkerGroup(pool, SquareWorker, "square", {"offset": 0.5}, fraction=1.0, timeout_s=60)
    try:
        out = wg.square(_data(5))
        assert out.batch["y"].tolist() == [0.5, 1.5, 4.5, 9.5, 16.5]
        assert out.batch["rank"].tolist() == [0, 0, 0, 1, 1]  # rows 0-2 on rank 0, rows 3-4 (+pad) on rank 1
        assert wg.tag(["a", "b", "c"]) == [("a", 0), ("b", 0), ("c", 1)]
        assert wg.all_reduce_rank() == [3.0, 3.0]  # gloo all-reduce of 1 + 2 on both ranks
        assert wg.whoami() == 0
        wg.timeout_s = 1.0
        with pytest.raises(RayWaitTimeout, match=r"square.sleep on 2 rank\(s\) did not finish within 1 s"):
            wg.sleep(5.0)
    finally:
        wg.shutdown()
        pool.release()
    with pytest.raises(RayWaitTimeout, match="placement group"):
        RayResourcePool(1, num_cpus_per_bundle=64, num_gpus_per_bundle=0, timeout_s=2)
