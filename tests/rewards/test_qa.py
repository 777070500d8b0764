"""Answer normalization, EM / F1 / cover-EM, answer extraction and the format gate (docs/method.md §1.3, §6.1)."""
import pytest

from stepsearch.rewards.qa import (check_format, cover_exact_match, exact_match, extract_answer,
                                   extract_eval_prediction, extract_queries, f1_score, normalize_answer, token_f1)

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize("raw, expected", [
    ("The  Eiffel-Tower!", "eiffeltower"),             # punctuation removed without a space; article dropped
    ("An apple a day", "apple day"),
    ("theatre", "theatre"),                            # 'the' only as a whole word
    ("  Barack\tOBAMA \n", "barack obama"),
    ("U.S. Army, a.k.a.", "us army aka"),
    ("", ""),
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_token_f1_hand_computed():
    # pred "barack obama" vs gold "obama": overlap 1, P = 1/2, R = 1/1, F1 = 2·0.5·1/1.5 = 2/3
    assert token_f1("Barack Obama", "Obama") == pytest.approx(2 / 3, abs=1e-12)
    # multiset overlap: pred "new new york", gold "new york city": overlap {new:1, york:1} = 2,
    # P = 2/3, R = 2/3, F1 = 2/3
    assert token_f1("new new york", "new york city") == pytest.approx(2 / 3, abs=1e-12)
    assert token_f1("paris", "london") == 0.0
    assert token_f1("the", "a") == 0.0                 # both normalize to empty: overlap 0


def test_f1_score_max_over_aliases_and_rounding():
    # aliases: "obama" → 2/3; "barack obama" → 1.0; max = 1.0
    assert f1_score("Barack Obama", ["Obama", "Barack Obama"]) == 1.0
    # 2/3 rounded to 4 decimals = 0.6667 (released reward rounding)
    assert f1_score("Barack Obama", ["Obama"]) == 0.6667
    assert f1_score("Barack Obama", ["Obama"], ndigits=None) == pytest.approx(2 / 3, abs=1e-12)
    assert f1_score(None, ["Obama"]) == 0.0


def test_exact_and_cover_match():
    assert exact_match("The Beatles.", ["beatles"]) == 1.0
    assert exact_match("Beatles band", ["beatles"]) == 0.0
    assert exact_match(None, ["x"]) == 0.0
    assert cover_exact_match("It was the Beatles band", ["Beatles"]) == 1.0
    assert cover_exact_match("hen house", ["he"]) == 0.0          # word-level, not substring
    assert cover_exact_match("new york city", ["york city", "boston"]) == 1.0
    assert cover_exact_match("anything", ["the"]) == 0.0           # empty gold never covers


def test_extract_answer_takes_last_block_across_newlines():
    text = "<think>x</think><answer> first </answer> more <answer>\n second\nline </answer>"
    assert extract_answer(text) == "second\nline"
    assert extract_answer("<answer>unclosed") is None
    # a second answer opened inside the first: only the last opened one counts (no credit for hedging)
    assert extract_answer("<answer> Bivix </think><answer> Zorai </answer>") == "Zorai"
    assert check_format("<answer> Bivix </think><answer> Zorai </answer>")
    assert extract_answer("no tags") is None


def test_extract_eval_prediction_brace_rule():
    assert extract_eval_prediction(r"<answer> The answer is \boxed{Paris} </answer>") == "Paris"
    assert extract_eval_prediction("<answer>{a} then {b}</answer>") == "b"
    assert extract_eval_prediction("<answer> Paris </answer>") == "Paris"
    assert extract_eval_prediction("nothing") == ""


@pytest.mark.parametrize("text, ok", [
    ("<think>t</think><answer>Paris</answer>", True),
    ("<answer>Paris</answer>  \n", True),
    ("<answer>Paris</answer><|im_end|>", True),
    ("<answer>Paris</answer> trailing words", False),
    ("<answer>a</answer><search>q</search>", False),           # final turn was a search
    ("<think>no answer</think>", False),
    ("<answer>cut off", False),                                  # length limit hit mid-answer
    ("<answer>a</answer> x <answer>b</answer>", True),          # the last block is at the end
])
def test_check_format(text, ok):
    assert check_format(text) is ok


def test_extract_queries():
    text = "<search> q one </search>\n\n<information>i</information><search>q2</search>"
    assert extract_queries(text) == ["q one", "q2"]
