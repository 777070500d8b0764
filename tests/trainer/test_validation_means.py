"""Validation scores are the reward hook's: per data_source means of RewardResult.per_sample's score keys."""
import pytest

from verl.trainer.ppo.ray_trainer import _per_source_means

SOURCES = ["a", "b", "a", "b", "b"]
SAMPLES = [{"em": 1.0, "f1": 0.5, "ok": True, "text": "x"},
           {"em": 0.0, "f1": 1.0, "ok": False, "text": "y"},
           {"em": 0.0, "f1": 0.25, "ok": True, "text": "z"},
           {"em": 1, "f1": 0.0, "ok": True, "text": "w"},
           {"em": 1.0, "ok": False, "text": "v"}]  # no f1: left out of the f1 means only


def test_named_keys_are_averaged_per_source_and_overall():
    m = _per_source_means(SOURCES, SAMPLES, ("em", "f1"))
    assert m == pytest.approx({"val/a/em": 0.5, "val/a/f1": 0.375, "val/a/n": 2.0,
                               "val/b/em": 2 / 3, "val/b/f1": 0.5, "val/b/n": 3.0,
                               "val/all/em": 0.6, "val/all/f1": 1.75 / 4, "val/all/n": 5.0})


def test_no_named_keys_means_every_numeric_key_but_bools():
    m = _per_source_means(SOURCES, SAMPLES, None)
    assert sorted(m) == sorted(f"val/{s}/{k}" for s in ("a", "b", "all") for k in ("em", "f1", "n"))
    assert m["val/all/em"] == pytest.approx(0.6)


def test_a_named_bool_key_is_a_rate():
    assert _per_source_means(SOURCES, SAMPLES, ("ok",))["val/all/ok"] == pytest.approx(0.6)
