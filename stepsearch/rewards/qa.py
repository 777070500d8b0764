"""Answer scoring: SQuAD normalization, EM / F1 / cover-EM, answer extraction and the format gate.

docs/method.md §1.3 (training reward) and §6.1 (evaluation). Every F1/EM in the project goes through these functions.
"""
from __future__ import annotations

import re
import string
from collections import Counter
from functools import lru_cache
from typing import Iterable

__all__ = [
    "normalize_answer", "token_f1", "clear_answer_cache", "f1_score", "exact_match", "cover_exact_match",
    "extract_answer", "answer_prediction", "answer_scores", "extract_eval_prediction", "check_format",
    "check_format_paper", "extract_queries", "as_str_list",
]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
# ASCII punctuation; a regex deletion is ~3x faster than str.translate with a deletion table.
PUNCT_RE = re.compile("[" + re.escape(string.punctuation) + "]")
# Non-greedy, across newlines (docs/method.md §1.3). Tags are matched literally.
# an answer span never contains another "<answer>": in "<answer> A </think><answer> B </answer>" the last answer is
# " B " (a hedging policy that opens a second answer inside the first is scored on its last answer only, not on
# the token overlap of both candidates)
_ANSWER_RE = re.compile(r"<answer>((?:(?!<answer>).)*?)</answer>", re.DOTALL)
_SEARCH_RE = re.compile(r"<search>(.*?)</search>", re.DOTALL)
# One think+search round of the paper's loop: a closed <think> block, then (after whitespace) a closed <search>.
_THINK_SEARCH_RE = re.compile(r"<think>.*?</think>\s*<search>.*?</search>", re.DOTALL)
# End-of-turn markers a decoder may leave at the very end of a response; they count as whitespace for the gate.
_TRAILING_END_MARKERS = ("<|im_end|>", "<|endoftext|>")


def normalize_answer(text: str) -> str:
    """SQuAD normalization (docs/method.md §1.3): lower-case, drop ASCII punctuation, drop a/an/the, collapse whitespace."""
    text = text.lower()
    text = PUNCT_RE.sub("", text)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def as_str_list(value, what: str) -> list[str]:
    """Gold strings as a list: accepts a str, a list/tuple or a numpy array (parquet gives arrays)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if hasattr(value, "tolist") and not isinstance(value, (list, tuple)):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{what} must be a string or a list of strings, got {type(value).__name__}: {value!r}")
    out = []
    for v in value:
        if not isinstance(v, str):
            raise TypeError(f"{what} must contain strings only, got {type(v).__name__}: {v!r}")
        out.append(v)
    return out


@lru_cache(maxsize=65536)
def _answer_tokens(text: str) -> tuple[Counter, int]:
    """(multiset of normalized words, word count) of a short answer or query; cached, callers must not mutate."""
    tokens = normalize_answer(text).split()
    return Counter(tokens), len(tokens)


def clear_answer_cache() -> None:
    """Empty the LRU cache of normalized answer/query words (benchmarks time a cold cache)."""
    _answer_tokens.cache_clear()


def token_f1(prediction: str, gold: str) -> float:
    """Word-level F1 of one normalized pair (paper: F1 = 2·IN/(PN+RN)); the overlap is a multiset intersection."""
    pred_counts, num_pred = _answer_tokens(prediction)
    gold_counts, num_gold = _answer_tokens(gold)
    overlap = sum((pred_counts & gold_counts).values())
    if overlap == 0:
        return 0.0
    precision = overlap / num_pred
    recall = overlap / num_gold
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str | None, golds: Iterable[str], ndigits: int | None = 4) -> float:
    """Max token F1 over the gold strings (answer + aliases), rounded to ``ndigits`` as the released reward does.

    A missing prediction (no ``<answer>``) scores 0. ``ndigits=None`` keeps full precision.
    """
    if prediction is None:
        return 0.0
    best = max((token_f1(prediction, g) for g in golds), default=0.0)
    return best if ndigits is None else round(best, ndigits)


def exact_match(prediction: str | None, golds: Iterable[str]) -> float:
    """1.0 if the normalized prediction equals any normalized gold string (docs/method.md §6.1), else 0.0."""
    if prediction is None:
        return 0.0
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in golds))


def cover_exact_match(prediction: str | None, golds: Iterable[str]) -> float:
    """1.0 if some normalized gold appears in the normalized prediction as a contiguous word sequence.

    Word-level (not character-level) containment, so gold "he" does not cover prediction "hen".
    An empty normalized gold never covers.
    """
    if prediction is None:
        return 0.0
    pred = f" {normalize_answer(prediction)} "
    for g in golds:
        gold = normalize_answer(g)
        if gold and f" {gold} " in pred:
            return 1.0
    return 0.0


def extract_answer(response: str) -> str | None:
    """Content of the LAST ``<answer>…</answer>`` in the response, stripped; None when there is none (docs/method.md §1.3).

    Pass the response only (never prompt + response): the prompt itself contains ``<answer> Beijing </answer>``.
    """
    matches = _ANSWER_RE.findall(response)
    return matches[-1].strip() if matches else None


def answer_prediction(answer: str | None) -> str | None:
    """The scored prediction of an answer text, the one rule of training rewards and evaluation (docs/method.md
    §1.3, §6.1): the stripped text; if it contains "{", the text after the last "{" up to the following "}"
    (``\\boxed{…}``-style answers). None (no answer) stays None."""
    if answer is None:
        return None
    answer = answer.strip()
    if "{" in answer:
        tail = answer[answer.rindex("{") + 1:]
        answer = tail.split("}", 1)[0].strip()
    return answer


def answer_scores(prediction: str | None, golds: Iterable[str]) -> tuple[float, float]:
    """(EM, F1 rounded to 4 decimals) of one prediction against the gold strings; (0, 0) without a prediction.
    The rollout calls it once per trajectory and stores both in the trajectory record."""
    golds = list(golds)
    return exact_match(prediction, golds), f1_score(prediction, golds)


def extract_eval_prediction(response: str) -> str:
    """``answer_prediction`` of the last ``<answer>`` of a response text; "" when there is no answer tag. For
    texts without a trajectory record (saved files of older runs)."""
    prediction = answer_prediction(extract_answer(response))
    return "" if prediction is None else prediction


def check_format(response: str) -> bool:
    """The released format gate (docs/method.md §1.3): at least one closed ``<answer>…</answer>`` block and nothing but
    whitespace after the last one. Trailing ``<|im_end|>``/``<|endoftext|>`` markers count as whitespace."""
    last_end = None
    for m in _ANSWER_RE.finditer(response):
        last_end = m.end()
    if last_end is None:
        return False
    tail = response[last_end:]
    for marker in _TRAILING_END_MARKERS:
        tail = tail.replace(marker, "")
    return tail.strip() == ""


def check_format_paper(policy_text: str) -> bool:
    """The paper's format check: at least one think+search round (``<think>…</think>`` then ``<search>…</search>``),
    exactly one ``<answer>`` tag pair, and it ends the text (the released check, :func:`check_format`).

    ``policy_text``: the policy's own text (``docs.policy_text``); the environment's warnings quote
    ``<answer> and </answer>``, which would otherwise count as a second answer.
    """
    if policy_text.count("<answer>") != 1 or policy_text.count("</answer>") != 1:
        return False
    return _THINK_SEARCH_RE.search(policy_text) is not None and check_format(policy_text)


def extract_queries(response: str) -> list[str]:
    """Every ``<search>…</search>`` span of the response, tags removed and stripped, in order (docs/method.md §1.4)."""
    return [q.strip() for q in _SEARCH_RE.findall(response)]
