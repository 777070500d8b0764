"""The written parquet loads with HF `datasets` and with the trainer's `verl.utils.dataset.RLHFDataset`."""
import datasets
import numpy as np
import torch

from stepsearch.data.conversions import MusiConfig, EvalSetConfig, build_musi, build_test_set
from stepsearch.data.formats import read_rows_parquet

from .conftest import SAMPLES


def test_parquet_loads_with_datasets(tmp_path):
    out, _ = build_musi(MusiConfig(local_dir=str(tmp_path), input=str(SAMPLES / "musique_ans_train_100.json")))
    ds = datasets.load_dataset("parquet", data_files=out, split="train", cache_dir=str(tmp_path / "hf"))
    assert len(ds) == 100
    rows = read_rows_parquet(out)
    assert ds[3]["reward_model"] == rows[3]["reward_model"]
    assert ds[3]["extra_info"]["support_docs"] == rows[3]["extra_info"]["support_docs"]
    test_out, _ = build_test_set(EvalSetConfig(input=str(SAMPLES / "bamboogle_test.jsonl"), dataset="bamboogle",
                                               local_dir=str(tmp_path)))
    tds = datasets.load_dataset("parquet", data_files=test_out, split="train", cache_dir=str(tmp_path / "hf"))
    assert tds[0]["reward_model"]["ground_truth"] == {"target": ["james madison"], "search_keys": [],
                                                   "sub_answers": []}


def test_parquet_loads_with_the_trainer_dataset(tmp_path):
    from stepsearch.data.row_fields import search_row_fields
    from verl.utils.dataset import RLHFDataset
    from verl.utils.tiny_model import build_tokenizer

    torch.manual_seed(0)
    out, _ = build_musi(MusiConfig(local_dir=str(tmp_path), input=str(SAMPLES / "musique_ans_train_100.json"),
                                   sample_num=8, seed=0))
    rows = read_rows_parquet(out)
    tok = build_tokenizer()
    ds = RLHFDataset(out, tok, max_prompt_length=2048, batch_size=4, shuffle=False, row_adapter=search_row_fields)
    assert len(ds) == 8
    item = ds[1]
    assert item["input_ids"].shape == (2048,) and item["attention_mask"].sum() > 100  # left-padded prompt
    assert item["ground_truth"]["search_keys"] == rows[1]["reward_model"]["ground_truth"]["search_keys"]
    assert item["ground_truth"]["target"] == rows[1]["reward_model"]["ground_truth"]["target"]
    assert item["support_docs"] == rows[1]["extra_info"]["support_docs"]
    assert item["index"] == 1 and item["id"] == rows[1]["id"] and item["data_source"] == "musi"
    assert item["question"] == rows[1]["prompt"][0]["content"]
    batch = next(ds.iter_epoch())
    assert batch.batch["input_ids"].shape == (4, 2048)
    assert list(batch.non_tensor_batch["index"]) == [0, 1, 2, 3]
    assert isinstance(batch.non_tensor_batch["support_docs"], np.ndarray)
