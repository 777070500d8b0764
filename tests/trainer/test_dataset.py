"""RLHFDataset: the contract's tensors and non-tensors, seeded order, exact resume of the position."""
import numpy as np
import pyarrow.parquet as pq
import pytest

from verl.utils.dataset import RLHFDataset


def _ds(path, tok, **kw):
    args = dict(max_prompt_length=2048, batch_size=8, shuffle=True, seed=7)
    args.update(kw)
    return RLHFDataset(path, tok, **args)


def test_row_tensors_and_non_tensors(musi_parquet, tiny_tokenizer):
    ds = _ds(musi_parquet, tiny_tokenizer)
    rows = pq.read_table(musi_parquet).to_pylist()
    batch = ds.next_batch()
    order = np.random.default_rng(7).permutation(100)[:8]  # epoch 0 visits permutation(seed + 0)
    assert list(batch.non_tensor_batch["index"]) == [rows[i]["extra_info"]["index"] for i in order]
    assert list(batch.non_tensor_batch["id"]) == [rows[i]["id"] for i in order]
    first = rows[order[0]]
    text = tiny_tokenizer.apply_chat_template(first["prompt"], add_generation_prompt=True, tokenize=False)
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    ids_t, mask = batch.batch["input_ids"][0], batch.batch["attention_mask"][0]
    assert ids_t.shape == (2048,) and int(mask.sum()) == len(ids)
    assert ids_t[-len(ids):].tolist() == ids and mask[:2048 - len(ids)].sum() == 0  # left padding
    assert batch.non_tensor_batch["ground_truth"][0]["target"] == first["reward_model"]["ground_truth"]["target"]
    assert batch.non_tensor_batch["support_docs"][0] == first["extra_info"]["support_docs"]
    assert batch.non_tensor_batch["question"][0] == first["prompt"][-1]["content"]
    assert batch.non_tensor_batch["data_source"][0] == "musi"


def test_epochs_reshuffle_and_state_dict_resumes(musi_parquet, tiny_tokenizer):
    ds = _ds(musi_parquet, tiny_tokenizer, batch_size=32)  # 100 rows -> 3 batches per epoch (drop_last)
    seen = [list(ds.next_batch().non_tensor_batch["index"]) for _ in range(4)]
    assert ds.epoch == 1 and ds.offset == 1
    assert seen[3] == [int(i) for i in np.random.default_rng(8).permutation(100)[:32]]  # epoch 1 -> seed 7 + 1
    state = ds.state_dict()
    expected = [list(ds.next_batch().non_tensor_batch["index"]) for _ in range(3)]
    fresh = _ds(musi_parquet, tiny_tokenizer, batch_size=32)
    fresh.load_state_dict(state)
    assert [list(fresh.next_batch().non_tensor_batch["index"]) for _ in range(3)] == expected
    with pytest.raises(ValueError, match="batch 16"):
        _ds(musi_parquet, tiny_tokenizer, batch_size=16).load_state_dict(state)


def test_too_long_prompt_names_the_row(musi_parquet, tiny_tokenizer):
    ds = _ds(musi_parquet, tiny_tokenizer, max_prompt_length=16)
    with pytest.raises(ValueError, match=r"musi_answerable_train.parquet:\d+: prompt has \d+ tokens > "
                                         r"data.max_prompt_length \(16\)"):
        ds.next_batch()
    left = _ds(musi_parquet, tiny_tokenizer, max_prompt_length=16, truncation="left")[0]
    assert left["attention_mask"].sum() == 16


def test_validation_pass_keeps_order_and_last_partial_batch(musi_parquet, tiny_tokenizer):
    ds = _ds(musi_parquet, tiny_tokenizer, batch_size=32, shuffle=False, drop_last=False)
    sizes = [len(b) for b in ds.iter_epoch()]
    assert sizes == [32, 32, 32, 4]
    assert ds.offset == 0  # a validation pass does not move the training position
