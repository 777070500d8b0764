"""Sub-answer reward r_sub for the "ow sub-answer" row of the paper's Table 3 (arXiv 2505.15107).

With the "sub_answer" prompt template (stepsearch.data.prompts) the policy writes each hop as
``<sub_question_k>…</sub_question_k>`` and ``<sub_answer_k>…</sub_answer_k>``. r_sub scores its sub-answers
against the gold intermediate answers g_1..g_M of the question's decomposition (``ground_truth.sub_answers``)
the way r_key scores queries against key groups:

    r_sub = (1/M) Σ_{i=1..M} max_k F1(a_k, g_i)

Each g_i is one hop of ``ground_truth.sub_answers``: a string, or a list of alternative strings (the hop's answer
and its aliases, as the data converters write it), where F1(a, g_i) is the best F1 over the alternatives.

The paper gives the prompt but no formula for this reward; this one mirrors the paper's r_key (eq. of the
search-key reward) with sub-answers in place of queries. Without gold sub-answers (test splits) r_sub = 0.
"""
from __future__ import annotations

import re

from .qa import as_str_list, f1_score

__all__ = ["extract_sub_answers", "gold_hops", "sub_answer_reward"]

# <sub_answer_k> … </sub_answer_k> with the same k on both tags, non-greedy, across newlines.
_SUB_ANSWER_RE = re.compile(r"<sub_answer_(\d+)>(.*?)</sub_answer_\1>", re.DOTALL)


def extract_sub_answers(policy_text: str) -> list[str]:
    """Every closed ``<sub_answer_k>`` span of the policy's own text, stripped, in order."""
    return [m.group(2).strip() for m in _SUB_ANSWER_RE.finditer(policy_text)]


def gold_hops(gold_sub_answers) -> list[list[str]]:
    """``ground_truth.sub_answers`` as one list of alternatives per hop: each hop a str or a list/array of str
    (parquet gives arrays); None or [] is no hops."""
    if gold_sub_answers is None:
        return []
    if hasattr(gold_sub_answers, "tolist") and not isinstance(gold_sub_answers, (list, tuple)):
        gold_sub_answers = gold_sub_answers.tolist()
    if isinstance(gold_sub_answers, str) or not isinstance(gold_sub_answers, (list, tuple)):
        raise TypeError(f"ground_truth.sub_answers must be a list with one str or list of str per hop, "
                        f"got {gold_sub_answers!r}")
    return [as_str_list(hop, f"ground_truth.sub_answers[{i}]") for i, hop in enumerate(gold_sub_answers)]


def sub_answer_reward(sub_answers: list[str], gold_sub_answers) -> float:
    """r_sub = (1/M) Σ_i max_k F1(a_k, g_i) (4-decimal answer F1, best over hop i's alternatives); 0 when either
    list is empty."""
    hops = gold_hops(gold_sub_answers)
    if not sub_answers or not hops:
        return 0.0
    return sum(max(f1_score(a, hop) for a in sub_answers) for hop in hops) / len(hops)
