"""Corpus reader: the three row shapes, .jsonl.gz, file:line errors, and the memory-mapped row table."""
import gzip
import json

import numpy as np
import pytest

from bench.machine import drop_from_page_cache
from stepsearch.search.corpus import ArrowCorpus, build_arrow_corpus, iter_passages, split_contents

ROWS = [
    {"id": "a", "contents": '"Alpha"\nfirst text', "extra": 1},
    {"id": 7, "title": "Beta", "content": "second text"},
    {"id": "c", "title": "Gamma", "text": "third\ntext", "url": "http://x"},
]


def write_jsonl(path, rows, gz=False):
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    if gz:
        with gzip.open(path, "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)
    return path


@pytest.mark.parametrize("gz", [False, True])
def test_three_shapes_parse_to_id_title_text(tmp_path, gz):
    path = write_jsonl(tmp_path / ("c.jsonl.gz" if gz else "c.jsonl"), ROWS, gz=gz)
    got = [(p.id, p.title, p.text) for p in iter_passages(path)]
    assert got == [("a", "Alpha", "first text"), ("7", "Beta", "second text"), ("c", "Gamma", "third\ntext")]


def test_split_contents_strips_quotes_only_when_paired():
    assert split_contents('"T"\nbody\nmore') == ("T", "body\nmore")
    assert split_contents("No quotes\nbody") == ("No quotes", "body")
    assert split_contents('"only title"') == ("only title", "")


@pytest.mark.parametrize("line, message", [
    ("{not json", "malformed JSON"),
    ('["a list"]', "expected a JSON object"),
    ('{"contents": "\\"T\\"\\nx"}', "no 'id' field"),
    ('{"id": "1", "body": "x"}', "unrecognized row shape"),
    ('{"id": "1", "title": 3, "text": "x"}', "must be strings"),
])
def test_malformed_row_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + line + "\n")
    with pytest.raises(ValueError) as err:
        list(iter_passages(path))
    assert f"{path}:3" in str(err.value) and message in str(err.value)


def test_arrow_rows_carry_original_fields_and_contents(tmp_path):
    src = write_jsonl(tmp_path / "c.jsonl", ROWS)
    assert build_arrow_corpus(src, tmp_path / "c.arrow", batch_rows=2) == 3
    corpus = ArrowCorpus(tmp_path / "c.arrow")
    docs = corpus.rows([2, 0, 1, 2])
    assert docs[0] == {"id": "c", "title": "Gamma", "text": "third\ntext", "url": "http://x",
                       "contents": '"Gamma"\nthird\ntext'}
    assert docs[1] == {"id": "a", "contents": '"Alpha"\nfirst text', "extra": 1, "title": "Alpha", "text": "first text"}
    assert docs[2] == {"id": "7", "title": "Beta", "content": "second text", "text": "second text",
                       "contents": '"Beta"\nsecond text'}
    assert docs[3] == docs[0]
    with pytest.raises(IndexError):
        corpus.rows([3])


def test_arrow_lookup_matches_slow_reference_on_wiki_sample(tmp_path):
    src = "data/samples/wiki18_sample_1000.jsonl"
    build_arrow_corpus(src, tmp_path / "w.arrow", batch_rows=128)
    corpus = ArrowCorpus(tmp_path / "w.arrow")
    reference = [json.loads(line) for line in open(src)]  # the slow oracle: every row as a Python dict
    assert len(corpus) == len(reference) == 1000
    rng = np.random.default_rng(0)
    picks = rng.integers(0, 1000, size=50)
    for i, doc in zip(picks, corpus.rows(picks)):
        ref = reference[i]
        assert doc["id"] == ref["id"] and doc["contents"] == ref["contents"]
        first_line, _, rest = ref["contents"].partition("\n")
        assert (doc["title"], doc["text"]) == (first_line.strip('"'), rest)  # some wiki-18 titles are unquoted


def test_empty_corpus_is_an_error(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no passages"):
        build_arrow_corpus(tmp_path / "e.jsonl", tmp_path / "e.arrow")
    assert not (tmp_path / "e.arrow").exists()


def page_cache_fraction(path) -> float:
    """Share of `path`'s pages in the page cache (mincore over a private mapping, which shares the cached pages)."""
    import ctypes
    import mmap

    with open(path, "rb") as fh:
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
    pages = -(-len(mm) // mmap.PAGESIZE)
    vec = (ctypes.c_ubyte * pages)()
    buf = ctypes.c_char.from_buffer(mm)
    libc = ctypes.CDLL(None, use_errno=True)
    rc = libc.mincore(ctypes.c_void_p(ctypes.addressof(buf)), ctypes.c_size_t(len(mm)), vec)
    del buf
    mm.close()
    assert rc == 0, ctypes.get_errno()
    return sum(v & 1 for v in vec) / pages


def test_random_access_open_reads_only_what_it_serves(tmp_path):
    """Serving opens the table with random_access=True: opening it and looking up a few rows must not read the
    file from disk (without it, read-ahead pulls in every record batch: the whole corpus at start-up)."""
    rng = np.random.default_rng(0)
    rows = [{"id": str(i), "contents": f'"T{i}"\n' + " ".join(rng.choice(["alpha", "beta", "gamma"], size=200))}
            for i in range(20_000)]  # ~28 MB of Arrow in 1,024-row batches
    src = write_jsonl(tmp_path / "big.jsonl", rows)
    build_arrow_corpus(src, tmp_path / "big.arrow", batch_rows=1024)
    drop_from_page_cache([tmp_path / "big.arrow"])
    if page_cache_fraction(tmp_path / "big.arrow") > 0.05:
        pytest.skip("this file system keeps the file in the page cache (tmpfs?)")
    corpus = ArrowCorpus(tmp_path / "big.arrow", random_access=True)
    picks = [0, 19_999, 7_777, 7_778]
    docs = corpus.rows(picks)
    assert [d["contents"] for d in docs] == [rows[i]["contents"] for i in picks]
    assert page_cache_fraction(tmp_path / "big.arrow") < 0.05  # the footer, the batches' metadata and 4 rows
    assert corpus.rows(picks) == ArrowCorpus(tmp_path / "big.arrow").rows(picks)
