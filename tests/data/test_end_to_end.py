"""Data flow end to end (docs/data.md): process -> build corpus -> check -> build the index -> launch the retriever,
then the served passage for a sub-question is byte-for-byte the row's support doc."""
import pytest

from stepsearch.data.conversions import MusiConfig, build_musi
from stepsearch.data.check import main as check_main
from stepsearch.data.training_corpus import build_corpus
from stepsearch.data.formats import read_rows_parquet

from .conftest import SAMPLES


@pytest.mark.slow
def test_support_docs_come_back_from_the_real_retrieval_server(tmp_path):
    from stepsearch.search.build_index import main as build_index_main
    from stepsearch.search.client import RetrievalClient
    from stepsearch.search.testing import start_retrieval_server

    data, _ = build_musi(MusiConfig(local_dir=str(tmp_path), input=str(SAMPLES / "musique_ans_train_100.json")))
    corpus = tmp_path / "musi.jsonl"
    stats = build_corpus([str(SAMPLES / "musique_ans_train_100.json")], str(corpus))
    assert stats.passages_written == 1890  # HippoRAG's own corpus of these 100 questions also has 1890 paragraphs
    assert check_main(["--data", data, "--corpus", str(corpus)]) == 0
    assert build_index_main(["--corpus", str(corpus), "--out", str(tmp_path / "index"), "--method", "bm25", "--quiet"]) == 0
    server = start_retrieval_server(tmp_path / "index")
    try:
        rows = {r["id"]: r for r in read_rows_parquet(data)}
        row = rows["2hop__150763_14904"]
        hits = RetrievalClient(server.url).retrieve([row["reward_model"]["ground_truth"]["search_keys"][0][0]], 3)[0]
        top = hits[0]["document"]
        assert {"title": top["title"], "text": top["text"]} == row["extra_info"]["support_docs"][0]
        assert top["contents"] == f'"{top["title"]}"\n{top["text"]}'
    finally:
        server.stop()
