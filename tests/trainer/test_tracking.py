"""Tracking: one log call reaches the console, the metrics JSONL and TensorBoard (wandb offline: slow test)."""
import json
import logging

import pytest

from verl.utils.tracking import ENGINE_CONSOLE_KEYS, Tracking, format_console


def test_console_jsonl_tensorboard(tmp_path, caplog):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tracker = Tracking("p", "e", ["console", "jsonl", "tensorboard"], str(tmp_path), config={"a": 1})
    with caplog.at_level(logging.INFO, logger="verl.utils.tracking"):
        tracker.log({"actor/pg_loss": 0.25, "timing_s/step": 2.0, "critic/vf_loss": float("nan")}, step=3)
        tracker.log({"actor/pg_loss": 0.5, "val/musi/em": 0.75}, step=4)
    tracker.close()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert rows[0] == {"step": 3, "actor/pg_loss": 0.25, "timing_s/step": 2.0, "critic/vf_loss": "nan"}
    assert rows[1]["val/musi/em"] == 0.75
    assert "step 3 | timing_s/step=2 | actor/pg_loss=0.25" in caplog.text
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("actor/pg_loss")] == [(3, 0.25), (4, 0.5)]


def test_format_console_orders_headline_keys():
    line = format_console({"perf/throughput": 10.0, "timing_s/step": 1.5, "other": 3}, step=7)
    assert line == "step 7 | timing_s/step=1.5 | perf/throughput=10"


def test_console_shows_the_task_keys_it_is_given(tmp_path, caplog):
    """The engine names no task metric; the keys a task's hooks name follow the engine's, then the val/ keys."""
    metrics = {"search/num_searches/mean": 2.5, "timing_s/step": 1.5, "val/x/em": 0.5}
    assert format_console(metrics, step=1) == "step 1 | timing_s/step=1.5 | val/x/em=0.5"
    keys = ENGINE_CONSOLE_KEYS + ("search/num_searches/mean",)
    assert format_console(metrics, 1, keys) == ("step 1 | timing_s/step=1.5 | search/num_searches/mean=2.5 | "
                                                "val/x/em=0.5")
    tracker = Tracking("p", "e", ["console"], str(tmp_path), console_keys=keys)
    with caplog.at_level(logging.INFO, logger="verl.utils.tracking"):
        tracker.log(metrics, step=2)
    tracker.close()
    assert "step 2 | timing_s/step=1.5 | search/num_searches/mean=2.5 | val/x/em=0.5" in caplog.text


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_wandb_offline(tmp_path):
    pytest.importorskip("wandb")
    tracker = Tracking("p", "e", ["wandb"], str(tmp_path), wandb_mode="offline")
    tracker.log({"actor/pg_loss": 0.25}, step=1)
    tracker.close()
    assert list((tmp_path / "wandb").glob("offline-run-*"))
