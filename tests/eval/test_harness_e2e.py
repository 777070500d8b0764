"""The evaluation harness end to end: real MiniLM index, real uvicorn retriever, the real rollout loop.

The scripted searcher that always copies the top-ranked passage must score exactly what an independent walk
over the retriever gives (query each hop directly with the client, follow the top-1 passage); a tiny HF model
evaluated twice must give byte-identical summaries; `--from-predictions` must reproduce the numbers.
"""
import hashlib
import json
import os
import re

import pytest

from stepsearch.eval.__main__ import main as eval_main
from stepsearch.eval.harness import EvalConfig, evaluate
from stepsearch.search.client import RetrievalClient

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _cfg(stack, out, **kw):
    return EvalConfig(data=(os.path.join(stack.world_dir, "test.parquet"),), model=stack.model_dir,
                      retriever_url=stack.url, out=str(out), max_prompt_length=96, max_new_tokens=16,
                      max_response_length=512, index_dir=stack.index_dir, batch_size=8, **kw)


def top1_walk(client, q):
    """(final entity, top-1 doc ids) following the retriever's first passage at every hop (the reference)."""
    entity, ids = q.start, []
    for relation in q.relations:
        doc = client.retrieve([f"{relation} of {entity}"], topk=3)[0][0]["document"]
        ids.append(doc["id"])
        entity = re.fullmatch(r"The \w+ of \w+ is (\w+)\.", doc["text"]).group(1)
    return entity, ids


def test_scripted_reference_policy_matches_a_retriever_walk(world_stack, tmp_path):
    summary = evaluate(_cfg(world_stack, tmp_path / "s", backend="scripted", scripted_copy_prob=1.0))
    client = RetrievalClient(world_stack.url)
    walks = [top1_walk(client, q) for q in world_stack.world.test]
    expected_em = sum(w[0] == q.answer for w, q in zip(walks, world_stack.world.test)) / len(walks)
    hops = [len(q.relations) for q in world_stack.world.test]
    overall = summary["per_source"]["all"]
    assert overall["n"] == len(hops) == 12 and expected_em >= 0.75     # MiniLM ranks the hop passage first mostly
    assert overall["em"] == round(expected_em, 4)
    assert overall["num_searches"] == round(sum(hops) / len(hops), 4)
    preds = [json.loads(line) for line in open(tmp_path / "s" / "predictions.jsonl")]
    for p, q, (entity, ids) in zip(preds, world_stack.world.test, walks):
        assert p["targets"] == [q.answer] and p["answer"] == entity
        assert [r["doc_ids"][0] for r in p["rounds"]] == ids
        if entity == q.answer:
            assert p["support_recall"] == 1.0 and all(r["gold_hits"][0] for r in p["rounds"])


def test_hf_eval_is_deterministic_and_rescorable(world_stack, tmp_path):
    s1 = evaluate(_cfg(world_stack, tmp_path / "a", backend="hf"))
    s2 = evaluate(_cfg(world_stack, tmp_path / "b", backend="hf"))
    assert (tmp_path / "a" / "summary.json").read_bytes() == (tmp_path / "b" / "summary.json").read_bytes()
    assert (tmp_path / "a" / "predictions.jsonl").read_bytes() == (tmp_path / "b" / "predictions.jsonl").read_bytes()
    manifest = open(os.path.join(world_stack.index_dir, "manifest.json"), "rb").read()
    assert s1["index_manifest_sha256"] == hashlib.sha256(manifest).hexdigest()
    assert s1["model_path"] == os.path.abspath(world_stack.model_dir) and s1["backend"] == "hf"
    assert "| synthetic_world | 12 |" in (tmp_path / "a" / "metrics.md").read_text()
    rescored = eval_main(["--from-predictions", str(tmp_path / "a" / "predictions.jsonl"), "--out",
                          str(tmp_path / "r")])
    assert rescored["per_source"] == json.loads(json.dumps(s2["per_source"]))
    assert rescored["index_manifest_sha256"] == s1["index_manifest_sha256"]


def test_cli_runs_and_rejects_missing_args(world_stack, tmp_path):
    out = tmp_path / "cli"
    summary = eval_main(["--data", os.path.join(world_stack.world_dir, "test.parquet"), "--model",
                         world_stack.model_dir, "--retriever_url", world_stack.url, "--out", str(out),
                         "--backend", "scripted", "--scripted_copy_prob", "0.0", "--max_prompt_length", "96",
                         "--max_samples", "4"])
    assert summary["per_source"]["all"]["n"] == 4 and (out / "run_info.json").exists()
    with pytest.raises(SystemExit, match="--model"):
        eval_main(["--data", "x.parquet", "--out", str(tmp_path / "x")])
