"""PPO with a critic learns a toy token environment with token-level (step + outcome) rewards.

Environment: one fixed prompt; the response is  [4 generated] [2 observation tokens] [4 generated].
A token is "good" when its id is a multiple of 5 (60 of the 300 ids, so a near-uniform random
policy scores ≈ 0.2). Rewards, as StepSearch places them:
- a step reward at the last token of segment 1 = fraction of good tokens in segment 1;
- an outcome reward at the last token of segment 2 = fraction of good tokens in segment 2.
The observation tokens are masked (response_mask = 0), so GAE must chain across them.
Mean reward per trajectory = (step + outcome) / 2; the test needs it ≥ 0.8 within 40 updates, from ≈ 0.2.
"""
import pytest
import torch

from tests.verl.helpers import build_batch
from verl.models.value_model import CausalLMWithValueHead
from verl.protocol import DataProto
from verl.trainer.ppo import core_algos
from verl.utils.tiny_model import build_tiny_causal_lm, build_tokenizer
from verl.workers.actor import Actor
from verl.workers.worker_config import ActorConfig, CriticConfig
from verl.workers.critic import Critic

BATCH, SEGMENT, OBSERVATION = 32, 4, [10, 11]
LAYOUT = [1] * SEGMENT + [0] * len(OBSERVATION) + [1] * SEGMENT  # response_mask
THRESHOLD, MAX_UPDATES = 0.8, 40  # seeds 0-2 reach 0.8 after 19-21 updates (~8 s each on 1 thread)


def is_good(token_ids: torch.Tensor) -> torch.Tensor:
    return (token_ids % 5 == 0).float()


@torch.no_grad()
def sample_responses(model, prompt: list[int], gen: torch.Generator) -> torch.Tensor:
    """(BATCH, T) responses: sampled at generated positions (temperature 1), observations injected."""
    ids = torch.tensor([prompt] * BATCH)
    observations = iter(OBSERVATION)
    for generated in LAYOUT:
        if generated:
            probs = torch.softmax(model(input_ids=ids).logits[:, -1].float(), dim=-1)
            nxt = torch.multinomial(probs, 1, generator=gen)
        else:
            nxt = torch.full((BATCH, 1), next(observations), dtype=torch.long)
        ids = torch.cat([ids, nxt], dim=1)
    return ids[:, len(prompt):]


def token_level_scores(responses: torch.Tensor) -> torch.Tensor:
    """Step reward at position SEGMENT−1, outcome reward at the last position. (BATCH, T)."""
    good = is_good(responses)
    scores = torch.zeros(responses.shape, dtype=torch.float32)
    scores[:, SEGMENT - 1] = good[:, :SEGMENT].mean(dim=1)
    scores[:, -1] = good[:, -SEGMENT:].mean(dim=1)
    return scores


def train_until_threshold(seed: int) -> tuple[int, float, float]:
    """Returns (updates used, first mean reward, last mean reward)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    tokenizer = build_tokenizer(vocab_size=300)
    policy = build_tiny_causal_lm(tokenizer, hidden_size=32, num_layers=2, num_heads=2, seed=seed)
    value_model = CausalLMWithValueHead.from_causal_lm(
        build_tiny_causal_lm(tokenizer, hidden_size=32, num_layers=2, num_heads=2, seed=seed + 100))
    sizes = dict(ppo_mini_batch_size=16, ppo_micro_batch_size_per_device=16, forward_micro_batch_size_per_device=32,
                 ppo_epochs=2)
    actor = Actor(policy, torch.optim.Adam(policy.parameters(), lr=3e-3), ActorConfig(**sizes, grad_clip=1.0))
    critic = Critic(value_model, torch.optim.Adam(value_model.parameters(), lr=3e-3), CriticConfig(**sizes))
    prompt = tokenizer("Question: pick good tokens")["input_ids"]
    first = reward = None
    for update in range(1, MAX_UPDATES + 1):
        responses = sample_responses(policy, prompt, gen)
        data = build_batch([prompt] * BATCH, responses.tolist(), [LAYOUT] * BATCH, tokenizer.pad_token_id)
        old_log_probs, _ = actor.compute_log_prob(data)
        values = critic.compute_values(data)
        scores = token_level_scores(responses)
        reward = float(scores.sum(dim=1).mean() / 2)
        first = reward if first is None else first
        if reward >= THRESHOLD:
            return update, first, reward
        mask = data.batch["response_mask"]
        advantages, returns = core_algos.compute_gae_advantage_return(scores, values, mask, gamma=1.0, lam=1.0)
        data = data.union(DataProto.from_dict(tensors={"old_log_probs": old_log_probs, "values": values,
                                                       "advantages": advantages, "returns": returns}))
        critic.update_critic(data)
        actor.update_policy(data)
    return MAX_UPDATES + 1, first, reward


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_ppo_learns_token_level_rewards_for_three_seeds():
    # measured: 3 seeds in 25-46 s on the shared 2-core machine (timeout above is the safety net)
    for seed in (0, 1, 2):
        updates, first, last = train_until_threshold(seed)
        assert first < 0.35, f"seed {seed}: the untrained policy already scores {first:.2f}"
        assert updates <= MAX_UPDATES, (f"seed {seed}: mean reward {first:.2f} -> {last:.2f}, below "
                                        f"{THRESHOLD} after {MAX_UPDATES} updates")
