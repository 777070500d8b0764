"""HFRolloutBackend against slow reference loops on a tiny random Qwen2 (CPU, float32)."""
import pytest
import torch

from tests.rollout.models import random_lm, tag_tokenizer
from verl.workers.rollout.base import SamplingConfig
from verl.workers.rollout.hf import HFRolloutBackend

pytestmark = pytest.mark.timeout(120)

PROMPTS = [[5, 6, 7, 8, 9], [40, 41], [300, 12, 77, 9, 9, 100, 3]]  # different lengths: left padding matters


@pytest.fixture(scope="module")
def tok():
    return tag_tokenizer()


@pytest.fixture(scope="module")
def model_a(tok):
    torch.manual_seed(0)
    return random_lm(tok, seed=1)


def greedy_reference(model, prompt, n):
    """Slow oracle: full forward on the unpadded sequence, argmax, append; no cache, no padding."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def no_stop(n, **kw):
    return SamplingConfig(max_new_tokens=n, greedy=True, stop=(), **kw)


def test_greedy_batch_matches_unpadded_reference(tok, model_a):
    outs = HFRolloutBackend(model_a, tok).generate(PROMPTS, no_stop(12))
    for prompt, out in zip(PROMPTS, outs):
        ref = greedy_reference(model_a, prompt, 12)
        if tok.eos_token_id in ref:
            ref = ref[:ref.index(tok.eos_token_id)]
        assert out.token_ids == ref
    assert len(set(tuple(o.token_ids) for o in outs)) > 1  # the model does not collapse onto one output


def test_stop_string_cuts_after_completing_token(tok, model_a):
    # Pick a stop string from the model's own greedy text that ends inside token 6 and spans a boundary:
    # the backend must return exactly tokens 0..6 (the token that completes it is kept).
    full = greedy_reference(model_a, PROMPTS[0], 12)
    pieces = [tok.decode([t]) for t in full]
    prefix5 = tok.decode(full[:6])
    stop = pieces[5][-1:] + pieces[6][:1]  # last char of token 5 + first char of token 6
    assert stop and stop not in prefix5[:-1]
    out = HFRolloutBackend(model_a, tok).generate([PROMPTS[0]], SamplingConfig(max_new_tokens=12, greedy=True,
                                                                                 stop=(stop,)))[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == full[:7]


def test_log_probs_match_full_forward(tok, model_a):
    outs = HFRolloutBackend(model_a, tok).generate(PROMPTS[:2], no_stop(6, logprobs=True))
    for prompt, out in zip(PROMPTS, outs):
        seq = torch.tensor([prompt + out.token_ids])
        with torch.no_grad():
            log_probs = torch.log_softmax(model_a(seq).logits[0].float(), dim=-1)
        ref = [log_probs[len(prompt) - 1 + s, t].item() for s, t in enumerate(out.token_ids)]
        assert out.log_probs == pytest.approx(ref, abs=1e-4)


def test_seeded_sampling_is_reproducible_and_leaves_global_rng(tok, model_a):
    backend = HFRolloutBackend(model_a, tok)
    params = SamplingConfig(max_new_tokens=10, temperature=1.0, stop=(), seed=123)
    torch.manual_seed(7)
    before = torch.rand(1)
    torch.manual_seed(7)
    first = backend.generate(PROMPTS, params)
    after = torch.rand(1)
    assert torch.equal(before, after)  # fork_rng: the caller's RNG stream is untouched
    second = backend.generate(PROMPTS, params)
    assert [o.token_ids for o in first] == [o.token_ids for o in second]
    third = backend.generate(PROMPTS, SamplingConfig(max_new_tokens=10, stop=(), seed=124))
    assert [o.token_ids for o in first] != [o.token_ids for o in third]


def test_micro_batches_give_the_same_greedy_output(tok, model_a):
    whole = HFRolloutBackend(model_a, tok).generate(PROMPTS, no_stop(8))
    split = HFRolloutBackend(model_a, tok, micro_batch_size=1).generate(PROMPTS, no_stop(8))
    assert [o.token_ids for o in whole] == [o.token_ids for o in split]


def test_load_weights_into_a_separate_copy(tok, model_a):
    model_b = random_lm(tok, seed=2)
    backend = HFRolloutBackend(model_b, tok)
    before = backend.generate(PROMPTS, no_stop(10))
    backend.load_weights(model_a.state_dict())
    after = backend.generate(PROMPTS, no_stop(10))
    ref = HFRolloutBackend(model_a, tok).generate(PROMPTS, no_stop(10))
    assert [o.token_ids for o in after] == [o.token_ids for o in ref]
    assert [o.token_ids for o in before] != [o.token_ids for o in after]
    with pytest.raises(KeyError, match="unexpected"):
        backend.load_weights({"not.a.param": torch.zeros(1)})


def test_load_weights_shared_module_is_a_noop(tok):
    model = random_lm(tok, seed=3)
    backend = HFRolloutBackend(model, tok)
    params = dict(model.named_parameters())
    ptrs = {k: p.data_ptr() for k, p in params.items()}
    backend.load_weights(dict(params))
    assert {k: p.data_ptr() for k, p in model.named_parameters()} == ptrs


def test_bad_prompts_raise(tok, model_a):
    backend = HFRolloutBackend(model_a, tok)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        backend.generate([[1, 2], []], no_stop(2))
    with pytest.raises(ValueError, match="empty batch"):
        backend.generate([], no_stop(2))
