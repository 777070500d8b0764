"""The scripted warm-start policy: parsing, the hop-by-hop actions and its configured copy rate."""
import pytest

from stepsearch.envs.scripted import ScriptedPolicyConfig, ScriptedSearchBackend, parse_objects, parse_question

INFO = ("<information> Doc 1<## Title: Kiba ##> The rival of Kiba is Nathi.\n"
        "Doc 2<## Title: Kiba ##> The mother of Kiba is Sugok.\n"
        "Doc 3<## Title: Zel ##> The rival of Zel is Kiba. </information>")
PROMPT = ("<|im_start|>user\nAnswer the question by searching. Question: Who is the neighbor of the rival of the "
          "mother of Sugok?<|im_end|>\n<|im_start|>assistant\n")


def test_scripted_parsers():
    assert parse_question(PROMPT) == ("Sugok", ["mother", "rival", "neighbor"])
    assert parse_objects(INFO) == ["Nathi", "Sugok", "Kiba"]
    with pytest.raises(ValueError, match="no world question"):
        parse_question("hello")


def test_scripted_policy_actions():
    always = ScriptedSearchBackend(None, ScriptedPolicyConfig(copy_correct_prob=1.0))
    never = ScriptedSearchBackend(None, ScriptedPolicyConfig(copy_correct_prob=0.0))
    assert always.next_action(PROMPT) == "<think> 3 left </think><search> mother of Sugok </search>"
    ctx = PROMPT + "<search> rival of Kiba </search>\n\n" + INFO + "\n\n"
    # one block seen -> hop 2 (rival) on the copied name: top-ranked doc's object vs the second-ranked one's
    assert always.next_action(ctx) == "<think> 2 left </think><search> rival of Nathi </search>"
    assert never.next_action(ctx) == "<think> 2 left </think><search> rival of Sugok </search>"
    three = ctx + "<search> x </search>\n\n" + INFO + "\n\n<search> y </search>\n\n" + INFO
    assert always.next_action(three) == "<think> 0 left </think><answer> Nathi </answer>"


def test_scripted_policy_copy_rate_is_the_configured_probability():
    backend = ScriptedSearchBackend(None, ScriptedPolicyConfig(copy_correct_prob=0.4, seed=0))
    picks = [backend.next_action(PROMPT + f"<search> mother of Sugok{i} </search>\n\n" + INFO)
             for i in range(2000)]
    share = sum(a.endswith("<search> rival of Nathi </search>") for a in picks) / len(picks)
    assert abs(share - 0.4) < 0.035            # binomial sd = sqrt(.4*.6/2000) = 0.011; 3 sd
