"""Server pieces in-process (FastAPI TestClient): hybrid RRF serving, config validation, --check_only."""
import pytest
from fastapi.testclient import TestClient

from stepsearch.search.server import ServerConfig, create_app, main, open_backend


def test_hybrid_method_serves_rrf_scores(wiki_index_dir):
    cfg = ServerConfig(index_dir=wiki_index_dir, method="hybrid", torch_threads=1)
    with TestClient(create_app(cfg, open_backend(cfg))) as client:
        body = client.post("/retrieve", json={"queries": ["Evan Morris", "1972 Caribbean Series"], "topk": 3,
                                              "return_scores": True}).json()
        assert [hits[0]["document"]["title"] for hits in body["result"]] == ["Evan Morris", "1972 Caribbean Series"]
        for hits in body["result"]:
            # an RRF score is at most 1/61 + 1/61 (rank 1 in both lists, k = 60)
            assert all(0 < h["score"] <= 2 / 61 + 1e-9 for h in hits)
        health = client.get("/health").json()
        assert health["method"] == "hybrid" and health["cache"]["redis"] == "disabled"


@pytest.mark.parametrize("kwargs, message", [
    ({}, "exactly one of --index_dir"),
    ({"index_dir": "x", "online": "serper"}, "exactly one of --index_dir"),
    ({"online": "bing"}, "--online must be one of serper, got 'bing'"),
    ({"index_dir": "x", "max_topk": 0}, "--max_topk must be positive"),
    ({"index_dir": "x", "default_topk": 10, "max_topk": 5}, "exceeds --max_topk"),
    ({"index_dir": "x", "torch_threads": -1}, "--torch_threads must be >= 0"),
    ({"index_dir": "x", "gpu_storage": "int8"}, "--gpu_storage must be one of fp16, bf16, fp32, got 'int8'"),
    ({"index_dir": "x", "method": "splade"}, "--method must be one of dense, bm25, hybrid, got 'splade'"),
])
def test_server_config_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ServerConfig(**kwargs)


def test_check_only(wiki_index_dir, tmp_path, capsys):
    assert main(["--index_dir", wiki_index_dir, "--method", "bm25", "--check_only"]) == 0
    assert '"num_passages": 1000' in capsys.readouterr().out
    assert main(["--index_dir", str(tmp_path), "--check_only"]) == 2
    assert "manifest.json is missing" in capsys.readouterr().err
