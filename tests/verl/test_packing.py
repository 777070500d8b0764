"""Sequence packing (use_remove_padding): the packed path against the padded path on tiny CPU models (fp32).

Rows of different lengths (left-padded prompts, right-padded responses) with observation tokens inside the responses
(response_mask 0, attention_mask 1); compared on every real response token.
"""
import copy
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from tests.verl.helpers import build_batch, random_batch
from verl.models.value_model import CausalLMWithValueHead
from verl.protocol import DataProto
from verl.trainer.main_ppo import build_run_config
from verl.utils.packing import VARLEN_SDPA, pack_rows, scatter_to_grid
from verl.workers.actor import Actor
from verl.workers.worker_config import ActorConfig, CriticConfig
from verl.workers.critic import Critic

pytestmark = pytest.mark.timeout(120)
B, P, T, VOCAB, PAD = 6, 7, 12, 97, 0
CONFIGS = str(Path(__file__).resolve().parents[2] / "configs")


def tiny_lm(family: str) -> torch.nn.Module:
    """fp32 causal LMs: Qwen2 (multi-head and grouped-query) and Llama, sdpa attention."""
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=128, pad_token_id=PAD)
    torch.manual_seed(0)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, **common))
    else:
        kv_heads = 1 if family == "qwen2-gqa" else 4
        model = Qwen2ForCausalLM(Qwen2Config(num_key_value_heads=kv_heads, **common))
    model.config._attn_implementation = "sdpa"
    return model


def the_batch(seed: int = 0) -> DataProto:
    """B rows, every prompt and response length different, an observation block in most responses."""
    return random_batch(B, P, T, vocab=VOCAB, pad_id=PAD, seed=seed)


def response_tokens(data: DataProto) -> torch.Tensor:
    """(B, T) bool: real response tokens (generated and observation)."""
    return data.batch["attention_mask"][:, -T:].bool()


def actor(model, use_remove_padding: bool, **kw) -> Actor:
    cfg = dict(ppo_mini_batch_size=B, ppo_micro_batch_size_per_device=3, forward_micro_batch_size_per_device=4,
               grad_clip=None, entropy_coeff=0.01, use_remove_padding=use_remove_padding)
    cfg.update(kw)
    return Actor(model, torch.optim.SGD(model.parameters(), lr=0.1), ActorConfig(**cfg))


@pytest.mark.parametrize("family", ["qwen2", "qwen2-gqa", "llama"])
def test_packed_log_probs_and_entropy_equal_the_padded_path(family):
    data = the_batch()
    assert len(set(data.batch["attention_mask"].sum(-1).tolist())) > 1
    assert ((data.batch["response_mask"] == 0) & response_tokens(data)).any()  # observation tokens are present
    model = tiny_lm(family)
    padded, packed = actor(copy.deepcopy(model), False), actor(copy.deepcopy(model), True)
    lp_pad, ent_pad = padded.compute_log_prob(data, calculate_entropy=True)
    lp_pack, ent_pack = packed.compute_log_prob(data, calculate_entropy=True)
    real = response_tokens(data)
    torch.testing.assert_close(lp_pack[real], lp_pad[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(ent_pack[real], ent_pad[real], atol=1e-5, rtol=0)
    assert lp_pack.shape == (B, T) and ent_pack.shape == (B, T)


def test_the_packed_forward_sees_only_real_tokens():
    data = the_batch()
    model = tiny_lm("qwen2")
    seen = []
    model.model.embed_tokens.register_forward_hook(lambda mod, args, out: seen.append(tuple(args[0].shape)))
    actor(model, True, forward_micro_batch_size_per_device=B).compute_log_prob(data)
    assert seen == [(1, int(data.batch["attention_mask"].sum()))]
    assert model.config._attn_implementation == VARLEN_SDPA


def test_packed_values_equal_the_padded_path():
    data = the_batch(seed=1)
    critic_model = CausalLMWithValueHead.from_causal_lm(tiny_lm("qwen2-gqa"))
    torch.nn.init.normal_(critic_model.value_head.weight)  # the zero init would make every value 0
    values = {}
    for use_remove_padding in (False, True):
        cfg = CriticConfig(ppo_mini_batch_size=B, ppo_micro_batch_size_per_device=3,
                           forward_micro_batch_size_per_device=4, value_loss_on_observations=True,
                           use_remove_padding=use_remove_padding)
        values[use_remove_padding] = Critic(copy.deepcopy(critic_model), None, cfg).compute_values(data)
    real = response_tokens(data)
    assert values[False][real].abs().min() > 0
    torch.testing.assert_close(values[True][real], values[False][real], atol=1e-5, rtol=0)


def test_packed_policy_update_equals_the_padded_update():
    data = the_batch(seed=2)
    model = tiny_lm("qwen2")
    padded, packed = actor(copy.deepcopy(model), False), actor(copy.deepcopy(model), True)
    lp, _ = padded.compute_log_prob(data)
    gen = torch.Generator().manual_seed(0)
    data = data.union(DataProto.from_dict(tensors={
        "old_log_probs": lp + 0.2 * torch.randn(lp.shape, generator=gen), "advantages": torch.randn(lp.shape,
                                                                                                     generator=gen)}))
    m_pad, m_pack = padded.update_policy(data), packed.update_policy(data)
    for (name, p), q in zip(padded.module.named_parameters(), packed.module.parameters()):
        torch.testing.assert_close(q, p, atol=1e-6, rtol=0, msg=name)
    assert m_pack["actor/pg_loss"] == pytest.approx(m_pad["actor/pg_loss"], abs=1e-6)
    assert m_pack["actor/grad_norm"] == pytest.approx(m_pad["actor/grad_norm"], rel=1e-5)


def test_a_row_with_pad_inside_keeps_its_position_ids():
    """Packing drops every attention_mask = 0 token but keeps the batch's position ids, as the padded path does."""
    data = build_batch([[5, 6, 7], [8, 9]], [[10, 11, 12, 13], [14, 15, 16]], [[1, 0, 1, 1], [1, 1, 1]], PAD)
    data.batch["attention_mask"][0, 4] = 0  # a hole in row 0's response
    model = tiny_lm("qwen2")
    lp_pad, _ = actor(copy.deepcopy(model), False, ppo_mini_batch_size=2, ppo_micro_batch_size_per_device=2
                      ).compute_log_prob(data)
    lp_pack, _ = actor(copy.deepcopy(model), True, ppo_mini_batch_size=2, ppo_micro_batch_size_per_device=2
                       ).compute_log_prob(data)
    # row 0: response tokens 0 and 2, 3 (token 1 is the hole, token 2 is predicted at the hole); row 1: all three
    torch.testing.assert_close(lp_pack[0, [0, 3]], lp_pad[0, [0, 3]], atol=1e-5, rtol=0)
    torch.testing.assert_close(lp_pack[1, :3], lp_pad[1, :3], atol=1e-5, rtol=0)


def test_pack_rows_round_trip():
    ids = torch.tensor([[0, 0, 3, 4, 5, 0], [6, 7, 8, 9, 10, 11], [0, 12, 13, 0, 0, 0]])
    mask = (ids != 0).long()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    packed = pack_rows(ids, mask, pos)
    assert packed.input_ids.tolist() == [[3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 3, 4, 5, 0, 1]]
    assert packed.cu_seqlens.tolist() == [0, 3, 9, 11] and packed.max_seqlen == 6
    grid = scatter_to_grid(packed.input_ids[0], packed.token_index, ids.numel()).view(3, 6)
    assert torch.equal(grid, ids)


def test_a_packing_model_is_plain_sdpa_on_padded_inputs_and_generation():
    """The actor's module is also the HF rollout's: switching it to varlen_sdpa must not change unpacked calls."""
    data = the_batch()
    plain = tiny_lm("qwen2-gqa")
    packing = actor(copy.deepcopy(plain), True).module
    inputs = {k: data.batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    with torch.no_grad():
        torch.testing.assert_close(packing(**inputs).logits, plain(**inputs).logits, atol=0, rtol=0)
    prompt_ids, prompt_mask = data.batch["input_ids"][:, :P], data.batch["attention_mask"][:, :P]
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=PAD)
    assert torch.equal(packing.generate(input_ids=prompt_ids, attention_mask=prompt_mask, **kw),
                       plain.generate(input_ids=prompt_ids, attention_mask=prompt_mask, **kw))


def test_eager_attention_is_refused_with_packing():
    model = tiny_lm("qwen2")
    model.config._attn_implementation = "eager"
    with pytest.raises(ValueError, match="use_remove_padding needs attn_implementation sdpa"):
        actor(model, True)


def _run(*overrides):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return build_run_config(compose(config_name="ppo_trainer", overrides=list(overrides)))


def test_use_remove_padding_is_one_switch_for_actor_ref_and_critic():
    assert ActorConfig().use_remove_padding and CriticConfig().use_remove_padding
    default = _run()
    assert default.actor.use_remove_padding and default.critic.use_remove_padding
    off = _run("actor_rollout_ref.model.use_remove_padding=false")
    assert not off.actor.use_remove_padding and not off.critic.use_remove_padding
    with pytest.raises(KeyError, match="use_remove_padding.*derived"):
        _run("+actor_rollout_ref.actor.use_remove_padding=false")
    with pytest.raises(KeyError, match="actor_rollout_ref.model"):
        _run("+actor_rollout_ref.model.use_rmpad=false")
