"""DataProto: round trips, indexing, padding and error messages."""
import numpy as np
import pytest
import torch

from verl.protocol import DataProto, DataProtoItem, to_object_array

pytestmark = pytest.mark.timeout(60)


def make(n=4, offset=0):
    return DataProto.from_dict(
        tensors={"ids": torch.arange(offset, offset + 3 * n).view(n, 3), "mask": torch.ones(n, 3)},
        non_tensors={"uid": [f"u{offset + i}" for i in range(n)], "docs": [[i, i + 1] for i in range(n)]},
        meta_info={"temperature": 1.0})


def assert_same(a: DataProto, b: DataProto):
    assert set(a.batch) == set(b.batch) and set(a.non_tensor_batch) == set(b.non_tensor_batch)
    for k in a.batch:
        assert torch.equal(a.batch[k], b.batch[k]), k
    for k in a.non_tensor_batch:
        assert list(a.non_tensor_batch[k]) == list(b.non_tensor_batch[k]), k
    assert a.meta_info == b.meta_info


def test_from_dict_keeps_one_element_per_row():
    dp = make()
    assert len(dp) == 4
    assert dp.non_tensor_batch["docs"].shape == (4,)  # lists stay single elements, not a 2-D array
    assert dp.non_tensor_batch["docs"][2] == [2, 3]
    assert to_object_array([(1, 2), (3, 4)]).shape == (2,)


def test_chunk_concat_round_trip():
    dp = make(6)
    parts = dp.chunk(3)
    assert [len(p) for p in parts] == [2, 2, 2]
    assert parts[1].non_tensor_batch["uid"].tolist() == ["u2", "u3"]
    assert torch.equal(parts[2].batch["ids"], torch.tensor([[12, 13, 14], [15, 16, 17]]))
    assert_same(DataProto.concat(parts), dp)


def test_chunk_requires_divisibility_and_pad_unpad_round_trip():
    dp = make(5)
    with pytest.raises(ValueError, match=r"batch size 5 is not divisible by chunks=2.*pad_to_divisor"):
        dp.chunk(2)
    padded, pad = dp.pad_to_divisor(4)
    assert (len(padded), pad) == (8, 3)
    # padding repeats the leading rows: u0 u1 u2
    assert padded.non_tensor_batch["uid"].tolist()[5:] == ["u0", "u1", "u2"]
    outputs = [p for p in padded.chunk(4)]  # what 4 workers would return
    assert_same(DataProto.concat(outputs).unpad(pad), dp)
    same, zero = dp.pad_to_divisor(5)
    assert zero == 0 and same is dp


def test_union_round_trip_and_conflicts():
    dp = make()
    a = dp.select(batch_keys=["ids"], non_tensor_batch_keys=["uid"])
    b = dp.select(batch_keys=["mask", "ids"], non_tensor_batch_keys=["docs"], meta_info_keys=[])
    assert_same(a.union(b), dp)
    assert "mask" not in a.batch  # union returned a new object
    clash = DataProto.from_dict(tensors={"ids": torch.zeros(4, 3, dtype=torch.long)})
    with pytest.raises(KeyError, match=r"batch key 'ids' is present in both with different values"):
        dp.union(clash)
    with pytest.raises(ValueError, match=r"batch sizes differ \(4 vs 2\)"):
        dp.union(make(2).select(batch_keys=["mask"], non_tensor_batch_keys=[]))
    with pytest.raises(KeyError, match=r"meta_info key 'temperature'"):
        dp.union(DataProto(meta_info={"temperature": 0.7}))


def test_mismatched_batch_sizes_are_named():
    with pytest.raises(ValueError, match=r"batch\['a'\]=3, batch\['b'\]=2"):
        DataProto.from_dict(tensors={"a": torch.zeros(3, 2), "b": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match=r"non_tensor_batch\['s'\]=2"):
        DataProto.from_dict(tensors={"a": torch.zeros(3, 2)}, non_tensors={"s": ["x", "y"]})
    with pytest.raises(TypeError, match=r"non_tensor_batch\['s'\] must be a numpy object array"):
        DataProto(batch={"a": torch.zeros(2)}, non_tensor_batch={"s": ["x", "y"]})


def test_concat_errors_name_keys_and_shapes():
    with pytest.raises(KeyError, match="part 1 has keys"):
        DataProto.concat([make(2), make(2).select(batch_keys=["ids"])])
    wide = DataProto.from_dict(tensors={"ids": torch.zeros(2, 4, dtype=torch.long), "mask": torch.ones(2, 4)},
                               non_tensors={"uid": ["a", "b"], "docs": [[], []]}, meta_info={"temperature": 1.0})
    with pytest.raises(ValueError, match=r"batch\['ids'\] shapes \[\(2, 3\), \(2, 4\)\]"):
        DataProto.concat([make(2), wide])


def test_indexing_select_and_repeat():
    dp = make(4)
    item = dp[1]
    assert isinstance(item, DataProtoItem)
    assert torch.equal(item.batch["ids"], torch.tensor([3, 4, 5])) and item.non_tensor_batch["uid"] == "u1"
    assert dp[1:3].non_tensor_batch["uid"].tolist() == ["u1", "u2"]
    for idx in ([3, 0], np.array([3, 0]), torch.tensor([3, 0])):
        assert dp[idx].non_tensor_batch["uid"].tolist() == ["u3", "u0"]
    assert dp[np.array([True, False, False, True])].non_tensor_batch["uid"].tolist() == ["u0", "u3"]
    with pytest.raises(IndexError, match="out of range"):
        dp[[4]]
    assert dp.repeat(2).non_tensor_batch["uid"].tolist() == ["u0", "u0", "u1", "u1", "u2", "u2", "u3", "u3"]
    tiled = dp.repeat(2, interleave=False)
    assert torch.equal(tiled.batch["ids"][4:], dp.batch["ids"])
    with pytest.raises(KeyError, match=r"batch has no key\(s\) \['nope'\]"):
        dp.select(batch_keys=["nope"])
    assert [len(p) for p in make(5).split(2)] == [2, 2, 1]


def test_save_load_and_to(tmp_path):
    dp = make(3)
    path = tmp_path / "sub" / "batch.pt"
    dp.save(path)
    assert_same(DataProto.load(path), dp)
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    moved = dp.to("cpu")
    assert moved is not dp and moved.batch["ids"].device.type == "cpu"
    torch.save({"x": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="was not written by DataProto.save"):
        DataProto.load(tmp_path / "other.pt")
