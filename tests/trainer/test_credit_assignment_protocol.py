"""The fair-comparison protocol of bench/credit_assignment.py: every arm's trainer configuration gets the same
trajectories and optimizer steps per RL step, the splits are disjoint, the tuning rule and the intervals are what the
docstring promises."""
from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np
import pandas as pd
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def ca():
    spec = importlib.util.spec_from_file_location("credit_assignment", os.path.join(REPO, "bench",
                                                                                    "credit_assignment.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["credit_assignment"] = module      # dataclasses look their module up in sys.modules
    spec.loader.exec_module(module)
    return module


def test_every_arm_and_configuration_gets_the_same_update_budget(ca):
    from hydra import compose, initialize_config_dir

    from verl.trainer.main_ppo import build_run_config, _validate_sizes

    budgets = {}
    with initialize_config_dir(config_dir=os.path.join(REPO, "configs"), version_base=None):
        for arm in ca.ARMS:
            for cfg in ca.grid(arm):
                composed = compose("cpu_demo", overrides=[
                    "model.path=m", "data.train_files=[t]", "data.val_files=[v]", "retriever.url=http://127.0.0.1:1",
                    *ca.arm_overrides(arm, cfg)])
                run = build_run_config(composed)
                _validate_sizes(run)
                trajectories = run.data.train_batch_size * run.actor.rollout_n
                optimizer_steps = run.actor.ppo_epochs * trajectories // run.actor.ppo_mini_batch_size_per_device
                budgets[(arm, ca.config_name(cfg))] = (trajectories, optimizer_steps, run.actor_optim.lr)
                assert run.actor_optim.lr == cfg["lr"]
                if arm != "grpo":
                    assert run.critic_optim.lr == cfg["lr"]
    assert {b[:2] for b in budgets.values()} == {(ca.TRAJECTORIES, 2)}, budgets
    assert len(budgets) == 2 + 2 + 4     # lr x 2 per arm, and G x 2 for GRPO


def test_validation_split_is_disjoint_and_seeded(ca, tmp_path):
    rows = [{"id": f"q{i}", "extra_info": {"question": f"Who is the rival of P{i}?"}} for i in range(300)]
    for d in ("a", "b"):
        os.makedirs(tmp_path / d)
        pd.DataFrame(rows).to_parquet(tmp_path / d / "train.parquet", index=False)
        ca.split_validation(str(tmp_path / d), seed=0)
    train, val = (pd.read_parquet(tmp_path / "a" / f"{n}.parquet") for n in ("train", "val"))
    assert len(val) == ca.NUM_VAL and len(train) == 300 - ca.NUM_VAL
    assert not set(train["id"]) & set(val["id"])
    assert list(val["id"]) == list(pd.read_parquet(tmp_path / "b" / "val.parquet")["id"])
    # running it again (a resumed call) splits the untouched original again, not the training part
    ca.split_validation(str(tmp_path / "a"), seed=0)
    assert list(pd.read_parquet(tmp_path / "a" / "val.parquet")["id"]) == list(val["id"])


def test_tuning_rule_uses_late_validation_points_and_breaks_ties_by_grid_order(ca):
    runs = [{"arm": "ppo", "cfg": {"lr": 1e-3}, "val_curve": [[0, 0.0], [5, 0.9], [10, 0.4], [15, 0.5], [20, 0.5]]},
            {"arm": "ppo", "cfg": {"lr": 2e-3}, "val_curve": [[0, 0.0], [5, 0.1], [10, 0.5], [15, 0.6], [20, 0.6]]},
            {"arm": "grpo", "cfg": {"lr": 1e-3, "group": 4}, "val_curve": [[0, 0.0], [20, 0.5]]},
            {"arm": "grpo", "cfg": {"lr": 2e-3, "group": 4}, "val_curve": [[0, 0.3], [20, 0.5]]}]
    # steps 15 and 20 count (> 20/2): 0.5 vs 0.6, although lr 1e-3 peaked higher at step 5
    assert ca.choose(runs, "ppo", steps=20) == {"lr": 2e-3}
    assert ca.choose(runs, "grpo", steps=20) == {"lr": 1e-3, "group": 4}     # tie: the earlier grid entry


def test_bootstrap_interval_and_collapse(ca):
    rng = np.random.default_rng(0)
    mean, lo, hi = ca.bootstrap_ci([0.2, 0.4, 0.6, 0.8, 1.0], rng)
    assert mean == pytest.approx(0.6)
    # the bootstrap distribution of a 5-sample mean: sd = population sd / sqrt(5) = 0.2828 / 2.236 = 0.126
    assert lo == pytest.approx(0.6 - 1.96 * 0.1265, abs=0.04) and hi == pytest.approx(0.6 + 1.96 * 0.1265, abs=0.04)
    assert ca.bootstrap_ci([0.5] * 5, rng) == (0.5, 0.5, 0.5)
    d, dlo, dhi = ca.diff_ci([0.7] * 5, [0.5] * 5, rng)
    assert (d, dlo, dhi) == pytest.approx((0.2, 0.2, 0.2))
    assert ca.collapsed([[0, 0.3], [10, 0.6], [20, 0.2]]) and not ca.collapsed([[0, 0.3], [20, 0.3]])
    assert ca.steps_to([[0, 0.1], [5, 0.5], [10, 0.7]], 0.5) == 5 and ca.steps_to([[0, 0.1]], 0.5) is None
