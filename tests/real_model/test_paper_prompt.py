"""The paper's prompt through the training data path with the real tokenizer and its chat template.

A dataset row is rendered by `stepsearch.data.formats.to_row` (the paper template of `stepsearch.data.prompts`),
written to parquet and read back by `RLHFDataset`, which applies the chat template and tokenizes, exactly as in
training. With a real chat tokenizer the prompt must keep the question and the tag instructions, and its length
must be realistic for the configs' `data.max_prompt_length`.
"""
import pytest
from transformers import AutoTokenizer

from stepsearch.agent.tags import STOP_STRINGS, TAG_TOKENS
from stepsearch.data.formats import QAExample, to_row, write_rows_parquet
from stepsearch.data.row_fields import search_row_fields
from verl.utils.dataset import RLHFDataset

QUESTION = "Who founded the company that makes the iPhone"
CPU_TEST_MAX_PROMPT_LENGTH = 512  # configs/cpu_test.yaml data.max_prompt_length


@pytest.fixture(scope="module")
def tokenizer(real_model_dir):
    return AutoTokenizer.from_pretrained(str(real_model_dir))


@pytest.fixture()
def paper_row(tmp_path):
    """One training row with the paper template, written to parquet; returns (row, parquet path)."""
    row = to_row(QAExample(id="q0", question=QUESTION, answers=("Steve Jobs",)), "musique", "train", 0,
                 template="paper")
    path = tmp_path / "train.parquet"
    write_rows_parquet([row], str(path))
    return row, path


def test_paper_prompt_renders_with_the_real_chat_template(tokenizer, paper_row):
    row, path = paper_row
    item = RLHFDataset(str(path), tokenizer, max_prompt_length=1024, batch_size=1, shuffle=False,
                       drop_last=False, row_adapter=search_row_fields)[0]
    ids = item["input_ids"][item["attention_mask"].bool()].tolist()
    text = tokenizer.decode(ids)
    assert text == tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\n")  # SmolLM2's template adds its default system turn
    assert "<|im_start|>user\n## Background\n" in text
    assert text.endswith(f"Question:{QUESTION}?\n<|im_end|>\n<|im_start|>assistant\n")
    for tag in TAG_TOKENS:
        assert tag in text, tag
    assert item["question"] == row["prompt"][0]["content"]
    n = len(ids)
    print(f"paper prompt with the SmolLM2 chat template: {n} tokens")
    assert 250 <= n <= CPU_TEST_MAX_PROMPT_LENGTH, n


def test_tags_are_plain_text_for_the_real_tokenizer(tokenizer):
    """Unlike the tiny test tokenizers, SmolLM2 has no tag tokens: a stop string spans several ids, and the
    stop test on decoded text (StopCutter) is what finds it."""
    for stop in STOP_STRINGS:
        ids = tokenizer(f"<search> iphone maker {stop}", add_special_tokens=False)["input_ids"]
        assert len(tokenizer(stop, add_special_tokens=False)["input_ids"]) > 1
        assert tokenizer.decode(ids).endswith(stop)
