"""bench/retrieval_scale.py's pipeline at tiny scale (issue 16, scale run): 20,000 synthetic passages with planted
real MiniLM rows, the Search-R1-style server and ours started cold one after the other. Both must answer every
planted query with its planted row as top-1, and the report must carry positive times and memory figures.
The "+rerank" stage (a build and two more server starts) runs under `-m slow`."""
import json

import numpy as np
import pytest

from bench import retrieval_scale as rs

N, PLANTED = 20_000, 8


def run_bench(tmp_path, *extra: str) -> dict:
    argv = ["--n", str(N), "--planted", str(PLANTED), "--data_dir", str(tmp_path / "data"), "--threads", "1",
            "--out", str(tmp_path / "scale.md"), "--json", str(tmp_path / "scale.json"), *extra]
    return rs.run(rs.parse_args(argv), argv)


def test_planted_rows_are_the_rows_the_import_checks():
    from stepsearch.search.build_index import BuildConfig

    cfg = BuildConfig(corpus="c", out="o")
    rows = rs.planted_rows(N, cfg.import_check_rows, cfg.seed)
    assert len(set(rows.tolist())) == cfg.import_check_rows and rows.max() < N
    assert rs.planted_query('"Ann Arbor"\nAnn Arbor is a city. It lies in Michigan.') == "Ann Arbor Ann Arbor is a city."
    assert rs.auto_factory(5_000_000) == "IVF4096,PQ32+rerank"


def test_both_servers_find_every_planted_row(tmp_path):
    res = run_bench(tmp_path, "--stages", "startup", "--starts", "cold")
    planted = json.loads((tmp_path / "data" / f"n{N}_k{PLANTED}_s0" / rs.PLANTED).read_text())
    expect = [str(r) for r in planted["rows"]]
    assert len(expect) == PLANTED and min(planted["own_cosine"]) >= rs.PLANTED_MIN_COS
    assert res["import"]["import_check"]["rows"] == PLANTED and res["import"]["import_check"]["min_cosine"] >= 0.99
    assert [(s["server"], s["state"]) for s in res["starts"]] == [("search_r1_style", "cold"), ("ours", "cold")]
    for s in res["starts"]:
        assert s["planted_top1"] == expect and s["planted_hit_rate"] == 1.0
        assert 0 < s["first_answer_s"] <= s["first_correct_s"]
        assert s["peak_rss"] > 0 and all(s["memory"][k] > 0 for k in ("VmHWM", "VmRSS", "RssAnon", "psutil_peak"))
        assert s["index_in_page_cache_bytes"] in (None, 0)  # cold: dropped from the page cache just before
    t = {row["kind"]: row for row in res["targets"]}
    assert set(t) == {"first_answer_ratio", "peak_rss", "planted_top1"}
    assert all(row["variant"] == "ours" for row in res["targets"])
    assert t["planted_top1"]["met"] and t["first_answer_ratio"]["ratio"] > 0 and t["peak_rss"]["peak_rss"] > 0
    gen = res["generation"]
    assert gen["bytes"][rs.FLAT] > N * rs.DIM * 4 and all(v > 0 for v in gen["seconds"].values())
    # the report: a marked section in the markdown, the raw numbers keyed by N in the JSON
    text = (tmp_path / "scale.md").read_text()
    assert f"<!-- retrieval_scale_n{N}:start -->" in text and "| time to first correct answer, cold" in text
    assert json.loads((tmp_path / "scale.json").read_text())[str(N)]["starts"][1]["planted_top1"] == expect
    # what bounds a start, measured apart: the disk read rate of the index file and one exhaustive Flat scan
    io = res["io"]
    assert io["disk_read_bytes"] == (tmp_path / "data" / f"n{N}_k{PLANTED}_s0" / rs.FLAT).stat().st_size
    assert io["disk_read_gib_s"] > 0 and 0 < io["flat_scan_s"] < 60 and "What bounds a start" in text
    # a rerun reuses the generated corpus and the import (same files, nothing rewritten)
    art = tmp_path / "data" / f"n{N}_k{PLANTED}_s0"
    mtime = (art / rs.FLAT).stat().st_mtime_ns
    assert rs.generate(art, N, PLANTED, 0) == gen and (art / rs.FLAT).stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_rerank_stage(tmp_path):
    res = run_bench(tmp_path, "--stages", "rerank", "--rerank_factory", "IVF16,SQ8+rerank", "--clients", "2",
                    "--per_request", "4", "--single_clients", "4", "--single_per_client", "1", "--recall_queries", "20",
                    "--nprobe_sweep", "8")
    rr = res["rerank"]
    for name in ("flat", "rerank"):
        srv = rr["servers"][name]
        assert srv["planted_hit_rate"] == 1.0 and srv["batch"]["qps"] > 0 and srv["single"]["qps"] > 0
        assert srv["memory"]["VmHWM"] > 0
    assert 0 <= rr["random_recall"]["recall3"] <= 1 and rr["build_s"] > 0
    assert rr["index_bytes"]["rerank_fp16"] == N * rs.DIM * 2
    assert np.isfinite(rr["real_question_top3_agreement"])
