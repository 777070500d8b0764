"""Qwen3 and Llama-3 (tiny, random init): the family chat templates render the paper prompt through the
dataset's chat-template path, the tokenizer without a pad token gets one, and the HF rollout backend decodes
greedily as a no-cache oracle does, before and after a weight load (tied embeddings, Qwen3's q/k norms)."""
import os
import shutil

import pytest
import torch

from stepsearch.data.formats import QAExample, to_row, write_rows_parquet
from stepsearch.data.prompts import make_prompt
from tests.rollout.families import FAMILIES, family_lm, family_tokenizer, family_tokenizer_dir
from tests.rollout.test_hf import PROMPTS, greedy_reference
from verl.utils.dataset import RLHFDataset
from verl.utils.tokenizer import load_tokenizer
from verl.workers.rollout.base import SamplingConfig
from verl.workers.rollout.hf import HFRolloutBackend

pytestmark = pytest.mark.timeout(120)

QUESTION = "who directed the film that won the 1998 award"


def expected_chat_text(family: str, user: str) -> str:
    """The rendered prompt, written out by hand from each family's chat format."""
    if family == "qwen3":
        return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    return ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n" + user.strip()
            + "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


@pytest.mark.parametrize("family", FAMILIES)
def test_paper_prompt_renders_through_the_dataset(family, tmp_path):
    tok = load_tokenizer(family_tokenizer_dir(family))
    path = str(tmp_path / "rows.parquet")
    write_rows_parquet([to_row(QAExample(id="q0", question=QUESTION, answers=("x",)), "musique", "test", 0)], path)
    row = RLHFDataset(path, tok, max_prompt_length=700, batch_size=1, shuffle=False)[0]
    ids = row["input_ids"][row["attention_mask"].bool()].tolist()
    user = make_prompt(QUESTION, "paper")
    assert user.startswith("## Background\n") and user.endswith(f"Question:{QUESTION}?\n")
    assert tok.decode(ids, skip_special_tokens=False) == expected_chat_text(family, user)
    # the template's markers and the tags inside the paper prompt are single tokens
    search_id = tok.convert_tokens_to_ids("<search>")
    assert ids.count(search_id) == user.count("<search>") == 2
    if family == "qwen3":
        start, end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
        assert ids[0] == start and ids.count(start) == 2 and ids.count(end) == 1
        assert tok.bos_token_id is None
    else:
        bos, header, eot = tok.convert_tokens_to_ids(["<|begin_of_text|>", "<|start_header_id|>", "<|eot_id|>"])
        assert ids[0] == bos and ids.count(bos) == 1  # the template writes BOS; tokenizing adds no second one
        assert ids.count(header) == 2 and ids.count(eot) == 1


def test_qwen3_generation_prompt_without_thinking():
    tok = family_tokenizer("qwen3")
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, enable_thinking=False)
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n" \
                   "<think>\n\n</think>\n\n"
    assert tok.apply_chat_template(messages, tokenize=False) == \
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"


def test_tokenizer_without_pad_token_pads_with_eos(tmp_path):
    raw = family_tokenizer("llama3")
    assert raw.pad_token_id is None  # as the real Llama-3 tokenizers ship
    tok = load_tokenizer(family_tokenizer_dir("llama3"))
    assert tok.pad_token == "<|end_of_text|>" and tok.pad_token_id == tok.eos_token_id
    HFRolloutBackend(torch.nn.Linear(1, 1), tok)  # accepted now (it refuses a tokenizer without pad)
    broken = tmp_path / "no_eos"
    shutil.copytree(family_tokenizer_dir("llama3"), broken)
    conf = (broken / "tokenizer_config.json").read_text().replace('"<|end_of_text|>"', "null")
    (broken / "tokenizer_config.json").write_text(conf)
    with pytest.raises(ValueError, match=f"{os.path.basename(broken)}.*neither a pad nor an eos"):
        load_tokenizer(str(broken))


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_backend_greedy_matches_oracle_and_follows_weight_loads(family):
    tok = load_tokenizer(family_tokenizer_dir(family))
    model_a, model_b = family_lm(family, tok, seed=1), family_lm(family, tok, seed=2)
    assert model_a.config.tie_word_embeddings and model_a.lm_head.weight is model_a.model.embed_tokens.weight
    if family == "qwen3":
        with torch.no_grad():  # Qwen3's per-head q/k norms must travel with the weights too
            for layer in model_b.model.layers:
                layer.self_attn.q_norm.weight.uniform_(0.2, 3.0)
                layer.self_attn.k_norm.weight.uniform_(0.2, 3.0)
    greedy = SamplingConfig(max_new_tokens=10, greedy=True, stop=())
    backend = HFRolloutBackend(model_a, tok)
    outs_a = [o.token_ids for o in backend.generate(PROMPTS, greedy)]
    refs_a = [_until_eos(greedy_reference(model_a, p, 10), tok) for p in PROMPTS]
    assert outs_a == refs_a
    assert len(set(map(tuple, outs_a))) > 1  # random weights wide enough not to collapse onto one output
    rollout_copy = family_lm(family, tok, seed=1)
    rollout = HFRolloutBackend(rollout_copy, tok)
    rollout.load_weights({k: v.clone() for k, v in model_b.state_dict().items()})
    outs_b = [o.token_ids for o in rollout.generate(PROMPTS, greedy)]
    assert outs_b == [_until_eos(greedy_reference(model_b, p, 10), tok) for p in PROMPTS]
    assert outs_b != outs_a
    assert rollout_copy.lm_head.weight is rollout_copy.model.embed_tokens.weight  # still tied after the load


def _until_eos(ids, tok):
    return ids[:ids.index(tok.eos_token_id)] if tok.eos_token_id in ids else ids
