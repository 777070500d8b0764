"""The HF rollout backend on the real pretrained model: a left-padded batch gives the same greedy tokens as
`model.generate` on each prompt alone, without padding (docs/real_model.md)."""
import torch

from stepsearch.data.prompts import make_prompt
from verl.workers.rollout.base import SamplingConfig
from verl.workers.rollout.hf import HFRolloutBackend

MAX_NEW_TOKENS = 16
QUESTIONS = ("What is the capital of France?", make_prompt("Who founded the company that makes the iPhone"))


def chat_ids(tokenizer, content: str) -> list[int]:
    """Token ids of one user message rendered with the chat template, ready for the assistant's turn."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def direct_greedy(model, tokenizer, ids: list[int], eos_ids: list[int]) -> list[int]:
    """`model.generate` on one unpadded prompt; the new ids up to (not including) the first EOS."""
    input_ids = torch.tensor([ids])
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                         max_new_tokens=MAX_NEW_TOKENS, eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id)
    new = out[0, len(ids):].tolist()
    ends = [k for k, t in enumerate(new) if t in eos_ids]
    return new[:ends[0]] if ends else new


def test_left_padded_batch_matches_unpadded_generate(real_model):
    model, tokenizer = real_model
    prompts = [chat_ids(tokenizer, q) for q in QUESTIONS]
    assert len(prompts[1]) - len(prompts[0]) > 200  # the short prompt gets a long run of left padding
    backend = HFRolloutBackend(model, tokenizer)
    outputs = backend.generate(prompts, SamplingConfig(max_new_tokens=MAX_NEW_TOKENS, greedy=True, stop=()))
    for ids, out in zip(prompts, outputs):
        expected = direct_greedy(model, tokenizer, ids, backend.eos_token_ids)
        assert out.token_ids == expected, (tokenizer.decode(out.token_ids), tokenizer.decode(expected))
        assert out.finish_reason == ("eos" if len(expected) < MAX_NEW_TOKENS else "length")
    assert "Paris" in tokenizer.decode(outputs[0].token_ids)
