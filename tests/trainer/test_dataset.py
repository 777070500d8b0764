"""RLHFDataset: the contract's tensors and non-tensors (the engine's, the search task's row adapter's, the default
adapter's opaque columns), seeded order, exact resume of the position."""
import numpy as np
import pyarrow.parquet as pq
import pytest

from stepsearch.data.row_fields import search_row_fields
from verl.utils.dataset import RLHFDataset, collate_rows


def _ds(path, tok, **kw):
    args = dict(max_prompt_length=2048, batch_size=8, shuffle=True, seed=7, row_adapter=search_row_fields)
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
    assert sorted(batch.non_tensor_batch) == ["data_source", "ground_truth", "id", "index", "question",
                                              "support_docs"]


def test_default_adapter_keeps_the_other_columns_opaque(musi_parquet, tiny_tokenizer):
    """Without a task adapter: the engine's three non-tensors plus every column but the prompt, values as read."""
    rows = pq.read_table(musi_parquet).to_pylist()
    item = RLHFDataset(musi_parquet, tiny_tokenizer, max_prompt_length=2048, batch_size=8, shuffle=False)[3]
    opaque = sorted(set(rows[3]) - {"prompt", "data_source", "id"})
    assert sorted(item) == sorted(["input_ids", "attention_mask", "data_source", "index", "id", *opaque])
    assert (item["index"], item["id"]) == (rows[3]["extra_info"]["index"], rows[3]["id"])
    assert all(item[k] == rows[3][k] for k in opaque)
    assert "ground_truth" not in item and "question" not in item  # the search task's fields come from its adapter


def test_adapter_may_not_set_the_engines_fields(musi_parquet, tiny_tokenizer):
    def bad(columns, messages, where):
        return {"index": 0, "text": messages[-1]["content"]}

    ds = RLHFDataset(musi_parquet, tiny_tokenizer, max_prompt_length=2048, batch_size=8, row_adapter=bad)
    with pytest.raises(ValueError, match=r"parquet:0: the row adapter .*bad returned \['index'\]"):
        ds[0]
    a, b = (RLHFDataset(musi_parquet, tiny_tokenizer, max_prompt_length=2048, batch_size=8)[i] for i in (0, 1))
    b["extra"] = 1
    with pytest.raises(ValueError, match="row 1 has keys"):
        collate_rows([a, b])


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


def test_search_adapter_names_a_missing_field_and_fills_the_optional_ones(tmp_path, tiny_tokenizer):
    import pyarrow as pa

    row = {"data_source": "toy", "prompt": "Who?", "id": "toy_0",
           "reward_model": {"style": "rule", "ground_truth": {"target": ["x"]}}}
    good, bad = tmp_path / "good.parquet", tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([row]), good)
    pq.write_table(pa.Table.from_pylist([{k: v for k, v in row.items() if k != "reward_model"}]), bad)
    item = _ds(str(good), tiny_tokenizer, batch_size=1)[0]
    assert item["ground_truth"] == {"target": ["x"], "search_keys": [], "sub_answers": []}
    assert (item["support_docs"], item["question"], item["index"], item["id"]) == ([], "Who?", 0, "toy_0")
    with pytest.raises(KeyError, match=r"bad.parquet:0: row has no 'reward_model' field"):
        _ds(str(bad), tiny_tokenizer, batch_size=1)[0]
