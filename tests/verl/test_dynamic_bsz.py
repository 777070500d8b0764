"""Token-budget micro-batches (use_dynamic_bsz): the partition, and the same gradient as fixed-row micro-batches."""
import copy
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from tests.verl.helpers import random_batch
from verl.models.value_model import CausalLMWithValueHead
from verl.protocol import DataProto
from verl.trainer.main_ppo import build_run_config
from verl.utils.tiny_model import build_tiny_causal_lm, build_tokenizer
from verl.utils.token_budget import token_budget_groups
from verl.workers.actor import Actor, weighted_micro_batches
from verl.workers.worker_config import ActorConfig, CriticConfig
from verl.workers.critic import Critic

pytestmark = pytest.mark.timeout(120)
B, P, T = 8, 6, 10
BUDGET = 40  # real tokens per row are 5..16 here: 3-5 rows per micro-batch, never a fixed count


class RecordingSGD(torch.optim.SGD):
    """SGD that keeps a copy of the gradients of every step (the gradient the update produced)."""

    def __init__(self, params, lr):
        super().__init__(params, lr=lr)
        self.grads: list[list[torch.Tensor]] = []

    def step(self, closure=None):
        self.grads.append([p.grad.detach().clone() for g in self.param_groups for p in g["params"]])
        return super().step(closure)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(vocab_size=300)


@pytest.fixture()
def model(tokenizer):
    return build_tiny_causal_lm(tokenizer, hidden_size=32, num_layers=2, num_heads=2, seed=0)


@pytest.fixture()
def batch(tokenizer):
    return random_batch(B, P, T, vocab=len(tokenizer), pad_id=tokenizer.pad_token_id, seed=3)


def test_groups_cover_every_row_once_within_the_budget():
    lengths = torch.tensor([5, 9, 3, 9, 7, 2, 8, 6])
    groups = token_budget_groups(lengths, 12)
    assert sorted(i for g in groups for i in g) == list(range(8))
    assert all(int(lengths[g].sum()) <= 12 for g in groups)
    assert len(groups) == 5  # 49 tokens: at least 5 groups of 12; first-fit decreasing reaches it
    assert token_budget_groups(lengths, 12) == groups  # deterministic


def test_a_row_over_the_budget_is_an_error_naming_the_key():
    with pytest.raises(ValueError, match="row 1 has 9 tokens.*ppo_max_token_len_per_gpu"):
        token_budget_groups(torch.tensor([5, 9]), 8)


def test_token_budget_micro_batches_have_unequal_rows_and_weights_summing_to_one(batch):
    micros = weighted_micro_batches(batch, 2, "response_mask", "token-mean", max_tokens=BUDGET)
    sizes = [len(m) for m, _ in micros]
    assert sum(sizes) == B and len(set(sizes)) > 1
    assert all(int(m.batch["attention_mask"].sum()) <= BUDGET for m, _ in micros)
    assert sum(w for _, w in micros) == pytest.approx(1.0)


def with_ppo_keys(data: DataProto, log_probs: torch.Tensor) -> DataProto:
    gen = torch.Generator().manual_seed(0)
    return data.union(DataProto.from_dict(tensors={
        "old_log_probs": log_probs + 0.3 * torch.randn(log_probs.shape, generator=gen),
        "advantages": torch.randn(log_probs.shape, generator=gen)}))


@pytest.mark.parametrize("use_remove_padding", [True, False])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_actor_gradient_equals_the_fixed_row_gradient(model, batch, mode, use_remove_padding):
    kw = dict(ppo_mini_batch_size=B, ppo_micro_batch_size_per_device=2, loss_agg_mode=mode, grad_clip=None,
              entropy_coeff=0.01, use_remove_padding=use_remove_padding)
    fixed = Actor(model, RecordingSGD(model.parameters(), lr=0.1), ActorConfig(**kw))
    other = copy.deepcopy(model)
    dynamic = Actor(other, RecordingSGD(other.parameters(), lr=0.1),
                    ActorConfig(**kw, use_dynamic_bsz=True, ppo_max_token_len_per_gpu=BUDGET))
    data = with_ppo_keys(batch, fixed.compute_log_prob(batch)[0])
    m_fixed, m_dynamic = fixed.update_policy(data), dynamic.update_policy(data)
    for g_fixed, g_dynamic in zip(fixed.optimizer.grads[0], dynamic.optimizer.grads[0]):
        torch.testing.assert_close(g_dynamic, g_fixed, atol=1e-6, rtol=0)
    assert max(float(g.abs().max()) for g in fixed.optimizer.grads[0]) > 1e-3  # a real gradient, not ~0
    assert m_dynamic["actor/pg_loss"] == pytest.approx(m_fixed["actor/pg_loss"], abs=1e-6)


def test_log_probs_with_a_token_budget_come_back_in_row_order(model, batch):
    kw = dict(ppo_mini_batch_size=B, ppo_micro_batch_size_per_device=2, forward_micro_batch_size_per_device=3)
    fixed = Actor(model, None, ActorConfig(**kw))
    dynamic = Actor(copy.deepcopy(model), None, ActorConfig(**kw, use_dynamic_bsz=True,
                                                            forward_max_token_len_per_gpu=BUDGET))
    lp_fixed, ent_fixed = fixed.compute_log_prob(batch, calculate_entropy=True)
    lp_dynamic, ent_dynamic = dynamic.compute_log_prob(batch, calculate_entropy=True)
    real = batch.batch["attention_mask"][:, -T:].bool()
    torch.testing.assert_close(lp_dynamic[real], lp_fixed[real], atol=1e-6, rtol=0)
    torch.testing.assert_close(ent_dynamic[real], ent_fixed[real], atol=1e-6, rtol=0)


def test_critic_gradient_and_values_equal_the_fixed_row_path(model, batch):
    value_model = CausalLMWithValueHead.from_causal_lm(model)
    torch.nn.init.normal_(value_model.value_head.weight, std=0.1)
    kw = dict(ppo_mini_batch_size=B, ppo_micro_batch_size_per_device=2, forward_micro_batch_size_per_device=3,
              grad_clip=None)
    fixed = Critic(value_model, RecordingSGD(value_model.parameters(), lr=0.1), CriticConfig(**kw))
    other = copy.deepcopy(value_model)
    dynamic = Critic(other, RecordingSGD(other.parameters(), lr=0.1),
                     CriticConfig(**kw, use_dynamic_bsz=True, ppo_max_token_len_per_gpu=BUDGET,
                                  forward_max_token_len_per_gpu=BUDGET))
    values = fixed.compute_values(batch)
    torch.testing.assert_close(dynamic.compute_values(batch), values, atol=1e-6, rtol=0)
    gen = torch.Generator().manual_seed(1)
    data = batch.union(DataProto.from_dict(tensors={"values": values,
                                                    "returns": torch.randn(values.shape, generator=gen)}))
    fixed.update_critic(data)
    dynamic.update_critic(data)
    for g_fixed, g_dynamic in zip(fixed.optimizer.grads[0], dynamic.optimizer.grads[0]):
        torch.testing.assert_close(g_dynamic, g_fixed, atol=1e-6, rtol=0)


def test_yaml_defaults_agree_with_the_dataclasses():
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[2] / "configs"), version_base="1.3"):
        run = build_run_config(compose(config_name="ppo_trainer"))
    for name in ("use_dynamic_bsz", "ppo_max_token_len_per_gpu", "forward_max_token_len_per_gpu"):
        assert getattr(run.actor, name) == getattr(ActorConfig(), name)
        assert getattr(run.critic, name) == getattr(CriticConfig(), name)
