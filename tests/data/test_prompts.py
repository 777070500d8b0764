import pytest

from stepsearch.data.prompts import PAPER_TEMPLATE, RELEASED_TEMPLATE, make_prompt, normalize_question


def test_question_is_stripped_and_gets_one_question_mark():
    assert normalize_question("  Who wrote Hamlet  ") == "Who wrote Hamlet?"
    assert normalize_question("Who wrote Hamlet?\n") == "Who wrote Hamlet?"


def test_paper_template_is_table4_with_question_at_the_end():
    p = make_prompt(" Who wrote Hamlet ")
    assert p.startswith("## Background\nYou are a deep AI research assistant.")
    assert p.endswith("Question:Who wrote Hamlet?\n")
    for tag in ("<think>", "<search>", "<information>", "<answer>"):
        assert tag in p
    assert p == PAPER_TEMPLATE.replace("{question}", "Who wrote Hamlet?")


def test_released_template_asks_for_plan_and_observation():
    p = make_prompt("Who wrote Hamlet", template="released")
    assert "<plan>" in p and "<observation>" in p and "<search>" in p and "<answer>" in p
    assert p.endswith("Question: Who wrote Hamlet?\n")
    assert p == RELEASED_TEMPLATE.replace("{question}", "Who wrote Hamlet?")


def test_bad_template_and_question_are_named():
    with pytest.raises(ValueError, match="valid names: \\['paper', 'released', 'sub_answer'\\]"):
        make_prompt("q", template="nope")
    with pytest.raises(ValueError, match="empty"):
        make_prompt("   ")
    with pytest.raises(TypeError, match="question must be a str"):
        make_prompt(None)
