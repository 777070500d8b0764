"""Actor, Critic, configs and the value model on a tiny CPU Qwen2 (real transformers forward passes)."""
import copy

import pytest
import torch

from tests.verl.helpers import random_batch
from verl.models.value_model import CausalLMWithValueHead
from verl.protocol import DataProto
from verl.utils.tiny_model import build_tiny_causal_lm, build_tokenizer
from verl.workers.actor import Actor
from verl.workers.worker_config import ActorConfig, CriticConfig, config_from_mapping
from verl.workers.critic import Critic

pytestmark = pytest.mark.timeout(120)
B, P, T = 8, 5, 9


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(vocab_size=300)


@pytest.fixture()
def model(tokenizer):
    torch.manual_seed(0)
    return build_tiny_causal_lm(tokenizer, hidden_size=32, num_layers=2, num_heads=2, seed=0)


@pytest.fixture()
def batch(tokenizer):
    return random_batch(B, P, T, vocab=len(tokenizer), pad_id=tokenizer.pad_token_id, seed=0)


def per_sample_response_logits(model, data: DataProto, b: int) -> torch.Tensor:
    """Logits predicting each real response token of row b, from an unpadded forward: (t_b, V)."""
    ids = data.batch["input_ids"][b][data.batch["attention_mask"][b].bool()]
    t_b = int(data.batch["attention_mask"][b, P:].sum())
    with torch.no_grad():
        logits = model(input_ids=ids.unsqueeze(0)).logits[0]  # (l_b, V)
    return logits[len(ids) - t_b - 1:len(ids) - 1]


def with_ppo_keys(actor: Actor, data: DataProto, seed: int = 0) -> DataProto:
    gen = torch.Generator().manual_seed(seed)
    log_probs, _ = actor.compute_log_prob(data)
    old = log_probs + 0.3 * torch.randn(log_probs.shape, generator=gen)  # ratios away from 1: some clipping
    adv = torch.randn(log_probs.shape, generator=gen)
    return data.union(DataProto.from_dict(tensors={"old_log_probs": old, "advantages": adv}))


def sgd_actor(model, **cfg):
    return Actor(model, torch.optim.SGD(model.parameters(), lr=0.5), ActorConfig(**cfg))


# ---------------------------------------------------------------------------------------------------------------------
# Actor
# ---------------------------------------------------------------------------------------------------------------------
def test_compute_log_prob_matches_unpadded_forward(model, batch):
    actor = sgd_actor(model, ppo_mini_batch_size=8, ppo_micro_batch_size_per_device=8,
                      forward_micro_batch_size_per_device=3)  # 8 rows in micro-batches 3, 3, 2
    log_probs, entropy = actor.compute_log_prob(batch, calculate_entropy=True)
    assert log_probs.shape == (B, T) and entropy.shape == (B, T)
    for b in range(B):
        logits = per_sample_response_logits(model, batch, b)
        t_b = logits.shape[0]
        expected = torch.log_softmax(logits, -1).gather(-1, batch.batch["responses"][b, :t_b, None]).squeeze(-1)
        torch.testing.assert_close(log_probs[b, :t_b], expected, atol=1e-5, rtol=0)
        probs = torch.softmax(logits, -1)
        torch.testing.assert_close(entropy[b, :t_b], -(probs * probs.log()).sum(-1), atol=1e-5, rtol=0)


def test_temperature_from_meta_info_scales_logits(model, batch):
    actor = sgd_actor(model, ppo_mini_batch_size=8, ppo_micro_batch_size_per_device=8)
    hot = DataProto(batch=batch.batch, meta_info={"temperature": 2.0})
    log_probs, _ = actor.compute_log_prob(hot)
    logits = per_sample_response_logits(model, batch, 0) / 2.0
    t_0 = logits.shape[0]
    expected = torch.log_softmax(logits, -1).gather(-1, batch.batch["responses"][0, :t_0, None]).squeeze(-1)
    torch.testing.assert_close(log_probs[0, :t_0], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_update_policy_micro_batches_equal_one_full_batch(model, batch, mode):
    """Gradient accumulation over 4 micro-batches gives the same step as one 8-row backward."""
    model_b = copy.deepcopy(model)
    kw = dict(ppo_mini_batch_size=8, loss_agg_mode=mode, grad_clip=None, entropy_coeff=0.01)
    full = sgd_actor(model, ppo_micro_batch_size_per_device=8, **kw)
    micro = sgd_actor(model_b, ppo_micro_batch_size_per_device=2, **kw)
    data = with_ppo_keys(full, batch)
    m_full = full.update_policy(data)
    m_micro = micro.update_policy(data)
    for (name, p), q in zip(model.named_parameters(), model_b.parameters()):
        torch.testing.assert_close(p, q, atol=2e-6, rtol=0, msg=name)
    assert m_full["actor/pg_loss"] == pytest.approx(m_micro["actor/pg_loss"], abs=1e-5)
    assert m_full["actor/grad_norm"] == pytest.approx(m_micro["actor/grad_norm"], rel=1e-4)
    assert 0 < m_full["actor/pg_clipfrac"] < 1
    for key in ("actor/pg_loss", "actor/pg_clipfrac", "actor/ppo_kl", "actor/grad_norm", "actor/entropy_loss",
                "actor/lr", "actor/skipped_steps"):
        assert key in m_full


def test_update_policy_mini_batches_make_several_steps(model, batch):
    actor = sgd_actor(model, ppo_mini_batch_size=4, ppo_micro_batch_size_per_device=2, ppo_epochs=2, shuffle=True)
    data = with_ppo_keys(actor, batch)
    steps = []
    original = actor.optimizer.step
    actor.optimizer.step = lambda *a, **k: (steps.append(1), original(*a, **k))
    actor.update_policy(data)
    assert len(steps) == 4  # 8 rows / mini 4 = 2 steps per epoch, 2 epochs


def test_non_finite_grad_norm_skips_the_step(model, batch):
    actor = Actor(model, torch.optim.AdamW(model.parameters(), lr=0.1),
                  ActorConfig(ppo_mini_batch_size=8, ppo_micro_batch_size_per_device=4))
    data = with_ppo_keys(actor, batch)
    adv = data.batch["advantages"].clone()
    adv[0, 0] = float("nan")  # response_mask[0, 0] = 1, so it reaches the loss
    before = copy.deepcopy(model.state_dict())
    metrics = actor.update_policy(DataProto(batch={**data.batch, "advantages": adv}))
    assert metrics["actor/skipped_steps"] == 1.0
    assert not torch.isfinite(torch.tensor(metrics["actor/grad_norm"]))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())
    assert not actor.optimizer.state  # AdamW never stepped


def test_grad_clip_bounds_the_update(model, batch):
    actor = Actor(model, torch.optim.SGD(model.parameters(), lr=1.0),
                  ActorConfig(ppo_mini_batch_size=8, ppo_micro_batch_size_per_device=8, grad_clip=1e-3))
    data = with_ppo_keys(actor, batch)
    before = [p.detach().clone() for p in model.parameters()]
    metrics = actor.update_policy(data)
    step = torch.sqrt(sum(((p.detach() - q) ** 2).sum() for p, q in zip(model.parameters(), before)))
    assert metrics["actor/grad_norm"] > 1e-2  # the raw norm, before clipping
    assert step.item() == pytest.approx(1e-3, rel=1e-3)  # SGD lr 1: |Δθ| = clip


def test_kl_loss_needs_ref_log_probs_and_changes_the_loss(model, batch):
    actor = sgd_actor(model, ppo_mini_batch_size=8, ppo_micro_batch_size_per_device=8, use_kl_loss=True,
                      kl_loss_coef=0.5, kl_loss_type="mse")
    data = with_ppo_keys(actor, batch)
    with pytest.raises(KeyError, match=r"needs batch key\(s\) \['ref_log_probs'\]"):
        actor.update_policy(data)
    ref = data.batch["old_log_probs"] - 1.0
    metrics = actor.update_policy(data.union(DataProto(batch={"ref_log_probs": ref})))
    assert metrics["actor/kl_loss"] > 0.1


def test_gradient_checkpointing_gives_the_same_update(model, batch):
    model_b = copy.deepcopy(model)
    kw = dict(ppo_mini_batch_size=8, ppo_micro_batch_size_per_device=4, grad_clip=None)
    plain = sgd_actor(model, **kw)
    ckpt = sgd_actor(model_b, gradient_checkpointing=True, **kw)
    data = with_ppo_keys(plain, batch)
    plain.update_policy(data)
    ckpt.update_policy(data)
    for p, q in zip(model.parameters(), model_b.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


def test_bf16_autocast_runs_and_stays_close(model, batch):
    fp32 = sgd_actor(model, ppo_mini_batch_size=8, ppo_micro_batch_size_per_device=8)
    bf16 = sgd_actor(model, ppo_mini_batch_size=8, ppo_micro_batch_size_per_device=8, use_bf16_autocast=True)
    lp32, _ = fp32.compute_log_prob(batch)
    lp16, _ = bf16.compute_log_prob(batch)
    assert lp16.dtype == torch.float32
    assert (lp32 - lp16).abs().max().item() < 0.1


# ---------------------------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------------------------
def test_config_validation_names_the_key():
    with pytest.raises(ValueError, match=r"\[actor\] ppo_micro_batch_size_per_device \(4\) must divide the "
                                         r"per-device mini-batch \(6"):
        ActorConfig(ppo_mini_batch_size=6, ppo_micro_batch_size_per_device=4)
    with pytest.raises(ValueError, match=r"\[critic\] ppo_mini_batch_size × rollout_n \(6 × 1 = 6\) must be "
                                         r"divisible by world_size \(4\)"):
        CriticConfig(ppo_mini_batch_size=6, ppo_micro_batch_size_per_device=1, world_size=4)
    with pytest.raises(ValueError, match=r"\[actor\] kl_loss_type 'kl2'"):
        ActorConfig(kl_loss_type="kl2")
    with pytest.raises(ValueError, match=r"\[actor\] clip_ratio_c must be > 1"):
        ActorConfig(clip_ratio_c=1.0)
    with pytest.raises(KeyError, match=r"\[actor\] unknown config key\(s\) \['ppo_mini_bs'\]"):
        config_from_mapping(ActorConfig, {"ppo_mini_bs": 4}, "actor")
    cfg = ActorConfig(ppo_mini_batch_size=8, rollout_n=4, world_size=2, ppo_micro_batch_size_per_device=4)
    assert (cfg.ppo_mini_batch_size_per_device, cfg.gradient_accumulation_steps) == (16, 4)  # 8·4/2, 16/4
    with pytest.raises(ValueError, match=r"per-device batch \(24 rows\) must be a multiple of the per-device "
                                         r"mini-batch \(16"):
        cfg.check_train_batch("actor", 24)


# ---------------------------------------------------------------------------------------------------------------------
# Critic and value model
# ---------------------------------------------------------------------------------------------------------------------
def make_critic(model, **cfg) -> Critic:
    torch.manual_seed(1)
    value_model = CausalLMWithValueHead.from_causal_lm(copy.deepcopy(model))
    torch.nn.init.normal_(value_model.value_head.weight, std=0.5)  # non-zero values to compare against
    cfg = {"ppo_mini_batch_size": 8, "ppo_micro_batch_size_per_device": 4, **cfg}
    return Critic(value_model, torch.optim.Adam(value_model.parameters(), lr=3e-3), CriticConfig(**cfg))


def test_compute_values_slice_and_masks(model, batch):
    critic = make_critic(model, forward_micro_batch_size_per_device=3)
    values = critic.compute_values(batch)
    assert values.shape == (B, T)
    mask = batch.batch["response_mask"]
    assert values[mask == 0].abs().max().item() == 0.0
    for b in range(B):
        ids = batch.batch["input_ids"][b][batch.batch["attention_mask"][b].bool()]
        t_b = int(batch.batch["attention_mask"][b, P:].sum())
        with torch.no_grad():
            full = critic.module(input_ids=ids.unsqueeze(0))[0]  # (l_b,)
        expected = full[len(ids) - t_b - 1:len(ids) - 1] * mask[b, :t_b]  # V(s) before each response token
        torch.testing.assert_close(values[b, :t_b], expected, atol=1e-5, rtol=0)
    on_obs = make_critic(model, value_loss_on_observations=True).compute_values(batch)
    obs = (mask == 0) & (batch.batch["attention_mask"][:, P:] == 1)
    assert obs.any() and on_obs[obs].abs().min().item() > 0  # observation tokens now carry values
    assert on_obs[batch.batch["attention_mask"][:, P:] == 0].abs().max().item() == 0.0  # padding does not


def test_update_critic_fits_returns(model, batch):
    critic = make_critic(model)
    critic.optimizer = torch.optim.Adam(critic.module.parameters(), lr=1e-2)
    returns = torch.linspace(-1, 1, T).repeat(B, 1) * batch.batch["response_mask"]
    first = last = None
    for _ in range(15):
        values = critic.compute_values(batch)
        data = batch.union(DataProto.from_dict(tensors={"values": values, "returns": returns}))
        metrics = critic.update_critic(data)
        first = metrics["critic/vf_error"] if first is None else first
        last = metrics["critic/vf_error"]
    for key in ("critic/vf_loss", "critic/vf_clipfrac", "critic/grad_norm", "critic/vpred_mean", "critic/lr"):
        assert key in metrics
    assert last < 0.3 * first, (first, last)


def test_update_critic_micro_batches_equal_full_batch(model, batch):
    a = make_critic(model, ppo_micro_batch_size_per_device=8, grad_clip=None)
    b = make_critic(model, ppo_micro_batch_size_per_device=2, grad_clip=None)
    for critic in (a, b):
        critic.optimizer = torch.optim.SGD(critic.module.parameters(), lr=0.1)
    values = a.compute_values(batch)
    data = batch.union(DataProto.from_dict(tensors={"values": values, "returns": values + 0.3}))
    a.update_critic(data)
    b.update_critic(data)
    for p, q in zip(a.module.parameters(), b.module.parameters()):
        torch.testing.assert_close(p, q, atol=2e-6, rtol=0)


def test_value_model_save_load_round_trip(model, batch, tmp_path):
    critic = make_critic(model)
    critic.module.save_pretrained(str(tmp_path / "critic"))
    loaded = CausalLMWithValueHead.from_pretrained(str(tmp_path / "critic"))
    with torch.no_grad():
        a = critic.module(input_ids=batch.batch["input_ids"], attention_mask=batch.batch["attention_mask"])
        b = loaded(input_ids=batch.batch["input_ids"], attention_mask=batch.batch["attention_mask"])
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    with pytest.raises(FileNotFoundError, match="is not a model folder"):
        CausalLMWithValueHead.from_pretrained(str(tmp_path / "missing"))
