"""Per-rank worker-group calls (`WorkerGroup.call_rank` / `call_per_rank`) and the rollout clock that counts
overlapping calls on several ranks once (no Ray: the in-process group; Ray: tests/agent/test_dp_placement.py)."""
import threading
import time

import pytest

from verl.single_controller.base import LocalWorkerGroup
from verl.workers.rollout.base import GenerationOutput
from verl.workers.rollout.worker_group import GenerateClock
from tests.trainer.toy_workers import SquareWorker


def test_call_rank_and_call_per_rank():
    wg = LocalWorkerGroup(SquareWorker, "square")
    assert wg.call_rank(0, "tag", ["a", "b"]) == [("a", 0), ("b", 0)]  # the whole list on rank 0, unsplit
    assert wg.call_per_rank("tag", [(["c"],)]) == [[("c", 0)]]
    with pytest.raises(ValueError, match=r"rank must be in \[0, 1\), got 1"):
        wg.call_rank(1, "tag", ["a"])
    with pytest.raises(ValueError, match="needs 1 argument tuples, got 2"):
        wg.call_per_rank("tag", [(["a"],), (["b"],)])
    with pytest.raises(AttributeError, match="not a registered worker method"):
        wg.call_rank(0, "master_address")


def test_clock_counts_overlapping_calls_once():
    clock = GenerateClock()
    out = [GenerationOutput([1, 2, 3], None, "stop")]

    def call(delay):
        clock.timed(lambda: (time.sleep(delay), out)[1])
    # [0, 0.4] and [0.1, 0.3] overlap: 0.4 s of wall time with a call running, not 0.6
    threads = [threading.Thread(target=call, args=(0.4,)), threading.Thread(target=call, args=(0.2,))]
    threads[0].start()
    time.sleep(0.1)
    threads[1].start()
    for t in threads:
        t.join()
    assert 0.38 <= clock.generate_s < 0.55 and clock.calls == 2 and clock.generated_tokens == 6
    clock.reset()
    assert (clock.generate_s, clock.calls, clock.generated_tokens) == (0.0, 0, 0)
