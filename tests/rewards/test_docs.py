"""The <information> document format: format_docs and its parser (docs/method.md §2.3 item 7, §1.6)."""
import pytest

from stepsearch.rewards.docs import (doc_title_text, format_docs, parse_information_blocks, rounds_from_response,
                                     support_doc_text)

pytestmark = pytest.mark.timeout(30)

DOCS = [{"id": "1", "title": "Paris", "text": "Paris is the capital of France."},
        {"document": {"id": "2", "contents": '"Lyon"\nLyon is a city.\nSecond line.'}, "score": 0.5},
        {"id": "3", "title": "Nice", "content": "Nice is on the coast."}]


def test_format_docs_exact_text():
    assert format_docs(DOCS) == ("Doc 1<## Title: Paris ##> Paris is the capital of France.\n"
                                 "Doc 2<## Title: Lyon ##> Lyon is a city.\nSecond line.\n"
                                 "Doc 3<## Title: Nice ##> Nice is on the coast.\n")


def test_parse_round_trip_without_rank_label_quirk():
    obs = f"\n\n<information> {format_docs(DOCS).strip()} </information>\n\n"
    response = "<think>t</think><search> paris </search>" + obs + "<search>q2</search>" + obs + "<answer>x</answer>"
    blocks = parse_information_blocks(response)
    assert len(blocks) == 2
    assert [(d["title"], d["text"]) for d in blocks[0]] == [
        ("Paris", "Paris is the capital of France."),          # no trailing "Doc 2" label (released quirk)
        ("Lyon", "Lyon is a city.\nSecond line."),
        ("Nice", "Nice is on the coast."),
    ]
    assert [r["query"] for r in rounds_from_response(response)] == ["paris", "q2"]


def test_search_without_information_is_not_a_round():
    text = ("<search>a</search> <warning>invalid</warning> <search>b</search>\n<information>"
            "Doc 1<## Title: T ##> body\n</information><search>final</search>")
    rounds = rounds_from_response(text)
    assert [r["query"] for r in rounds] == ["b"]               # "a" has no block; the tempered regex keeps them apart
    assert rounds[0]["docs"] == [{"id": None, "title": "T", "text": "body", "rank": 1}]


def test_support_doc_text_forms_and_errors():
    assert support_doc_text("plain") == "plain"
    assert support_doc_text({"title": "T", "paragraph_text": "P"}) == "P"
    assert support_doc_text({"title": "T", "text": "B"}) == "B"
    assert doc_title_text({"contents": '"T"\nB'}) == ("T", "B")
    with pytest.raises(TypeError, match=r"support_docs\[2\] must be a string or a dict"):
        support_doc_text(3, "support_docs[2]")
    with pytest.raises(KeyError, match="has no 'text'"):
        support_doc_text({"title": "only"})
