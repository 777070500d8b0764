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


TWO_HOP = ("<|im_start|>user\nAnswer the question by searching. Question: Who is the rival of the rival of "
           "Kiba?<|im_end|>\n<|im_start|>assistant\n")


def test_scripted_policy_premature_answer_actions():
    always = ScriptedSearchBackend(None, ScriptedPolicyConfig(premature_answer_prob=1.0))
    never = ScriptedSearchBackend(None, ScriptedPolicyConfig(premature_answer_prob=0.0))
    # the first turn always searches (there is nothing to answer with yet)
    assert always.next_action(TWO_HOP) == "<think> 2 left </think><search> rival of Kiba </search>"
    one = TWO_HOP + "<search> rival of Kiba </search>\n\n" + INFO + "\n\n"
    # after hop 1: answer at once with the intermediate name (wrong), keeping the true count, or search hop 2
    assert always.next_action(one) == "<think> 1 left </think><answer> Nathi </answer>"
    assert never.next_action(one) == "<think> 1 left </think><search> rival of Nathi </search>"
    # after the last hop both answer, with the name just read
    two = one + "<search> rival of Nathi </search>\n\n" + INFO + "\n\n"
    assert always.next_action(two) == never.next_action(two) == "<think> 0 left </think><answer> Nathi </answer>"
    with pytest.raises(ValueError, match="premature_answer_prob"):
        ScriptedPolicyConfig(premature_answer_prob=1.5)


def test_scripted_policy_premature_rate_is_the_configured_probability():
    backend = ScriptedSearchBackend(None, ScriptedPolicyConfig(premature_answer_prob=0.65, seed=0))
    picks = [backend.next_action(PROMPT + f"<search> mother of Sugok{i} </search>\n\n" + INFO)
             for i in range(2000)]
    assert all(a.startswith("<think> 2 left </think>") for a in picks)
    share = sum(a.endswith("<answer> Nathi </answer>") for a in picks) / len(picks)
    assert abs(share - 0.65) < 0.035           # binomial sd = sqrt(.65*.35/2000) = 0.011; 3 sd
    # the rest search the next hop with the correctly copied name (copy_correct_prob defaults to 1.0)
    assert sum(a.endswith("<search> rival of Nathi </search>") for a in picks) == len(picks) - round(share * 2000)


def test_scripted_policy_flaws_combine_independently():
    backend = ScriptedSearchBackend(None, ScriptedPolicyConfig(copy_correct_prob=0.4, premature_answer_prob=0.5))
    picks = [backend.next_action(PROMPT + f"<search> mother of Sugok{i} </search>\n\n" + INFO)
             for i in range(2000)]
    counts = {k: sum(a.endswith(k) for a in picks) / len(picks) for k in
              ("<answer> Nathi </answer>", "<answer> Sugok </answer>", "rival of Nathi </search>",
               "rival of Sugok </search>")}
    for k, p in zip(counts, (0.2, 0.3, 0.2, 0.3)):
        assert abs(counts[k] - p) < 0.035, (k, counts[k])


FOUR_HOP = ("<|im_start|>user\nAnswer the question by searching. Question: Who is the rival of the rival of the rival "
            "of the rival of Kiba?<|im_end|>\n<|im_start|>assistant\n")


def test_scripted_policy_mid_chain_flaw_starts_at_the_configured_hop():
    mid = ScriptedSearchBackend(None, ScriptedPolicyConfig(premature_answer_prob=1.0, premature_from_hop=2))
    ctx = FOUR_HOP
    actions = []
    for _ in range(2):   # hop 1 and, after its block, hop 2 are always searched
        actions.append(mid.next_action(ctx))
        ctx += actions[-1] + "\n\n" + INFO + "\n\n"
    assert actions == ["<think> 4 left </think><search> rival of Kiba </search>",
                       "<think> 3 left </think><search> rival of Nathi </search>"]
    # after hop 2's block, mid-chain: the premature answer (2 hops still to go)
    assert mid.next_action(ctx) == "<think> 2 left </think><answer> Nathi </answer>"
    # the demo's setting (premature_from_hop=1) would already have stopped after hop 1
    demo = ScriptedSearchBackend(None, ScriptedPolicyConfig(premature_answer_prob=1.0))
    assert demo.next_action(FOUR_HOP + actions[0] + "\n\n" + INFO + "\n\n") == \
        "<think> 3 left </think><answer> Nathi </answer>"
    with pytest.raises(ValueError, match="premature_from_hop"):
        ScriptedPolicyConfig(premature_from_hop=0)
