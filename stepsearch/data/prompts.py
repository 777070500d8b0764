"""Prompt templates: the single source for the parquet `prompt` content and for the rollout.

Three templates exist (docs/method.md §2.1, "Paper vs. released code" table, and the paper's Table 5):

- ``"paper"`` (default): StepSearch paper Appendix A, Table 4 (think / search / information / answer).
- ``"released"``: the plan / search / observation / answer template that the released ``musi_search.py``
  actually writes (its second assignment overwrites the Table 4 string). Written here in our own words from
  docs/method.md §2.1(b); the wording is not byte-identical to the released string.
- ``"sub_answer"``: the paper's Table 5 variant with ``<sub_question_k>``/``<sub_answer_k>`` tags (the
  "ow sub-answer" ablation), in our own words.

Both templates end with the question, and the environment and reward only parse ``<search>``, ``<answer>``
and ``<information>``, so either one works with the reward.
"""
from __future__ import annotations

PAPER_TEMPLATE = (
    "## Background\n"
    "You are a deep AI research assistant. I will give you a single-hop or multi-hop question. "
    "You don't have to answer the question now, but you should first think about your research plan "
    "or what to search for next. You can use search to fill in knowledge gaps.\n"
    "## Response format: Your output format should be one of the following two formats:\n"
    "<think>your thinking process</think>\n"
    "<answer>your answer after getting enough information</answer>\n"
    "or\n"
    "<think>your thinking process</think>\n"
    "use <search>search keywords</search> to search for information. For example, "
    "<think> plan to search: (Q1) (Q2) (Q3) ... </think> <search> (Q1) question </search> "
    "<think> reasoning ... </think> <answer> Beijing </answer>.\n"
    "The search engine will return the results contained in <information> and </information>.\n"
    "Please follow the loop of think, search, information, think, search, information, and answer "
    "until the original question is finally solved.\n"
    "Note: The retrieval results may not contain the answer or contain noise. You need to tell whether "
    "there is a golden answer. If not, you need to correct the search query and search again. "
    "Question:{question}\n"
)

RELEASED_TEMPLATE = (
    "## Background\n"
    "You are a deep AI research assistant. I will give you a single-hop or multi-hop question. "
    "Answer it by searching step by step.\n"
    "## Response format:\n"
    "Start with <plan>your research plan: which sub-questions to search and in what order</plan>.\n"
    "Then search with <search>search keywords</search>. The search engine returns the results between "
    "<information> and </information>.\n"
    "After every <information> block, write <observation>what each retrieved document says about the "
    "question, e.g. Doc1 ...; Doc2 ...; Doc3 ...</observation>, then update your <plan>...</plan> "
    "and search again if needed.\n"
    "When you have enough information, give the final answer between <answer> and </answer> without "
    "detailed illustrations, for example <answer> Beijing </answer>.\n"
    "Note: The retrieval results may not contain the answer or may contain noise. If they do not help, "
    "correct the search query and search again.\n"
    "Question: {question}\n"
)

# The "ow sub-answer" ablation (paper Table 3) uses the paper's Table 5 prompt: the model names each sub-question
# and its answer in numbered tags, which r_sub (stepsearch/rewards/sub_answer.py) scores. Written in our own words.
SUB_ANSWER_TEMPLATE = (
    "## Background\n"
    "You are a deep AI research assistant. I will give you a single-hop or multi-hop question. "
    "Break it into sub-questions and answer them one by one, searching to fill in knowledge gaps.\n"
    "## Response format:\n"
    "<think>your thinking process</think>\n"
    "For the k-th sub-question write <sub_question_k>the sub-question</sub_question_k>, search with "
    "<search>search keywords</search> when you need to, and once you know its answer write "
    "<sub_answer_k>the answer of that sub-question</sub_answer_k>.\n"
    "The search engine will return the results contained in <information> and </information>.\n"
    "When every sub-question is answered, give the final answer: <answer>your answer</answer>. For example, "
    "<sub_question_1> Who directed Titanic? </sub_question_1> <search> Titanic director </search> ... "
    "<sub_answer_1> James Cameron </sub_answer_1> ... <answer> Kapuskasing </answer>.\n"
    "Note: The retrieval results may not contain the answer or contain noise. If they do not help, correct the "
    "search query and search again. Question:{question}\n"
)

TEMPLATES: dict[str, str] = {"paper": PAPER_TEMPLATE, "released": RELEASED_TEMPLATE,
                             "sub_answer": SUB_ANSWER_TEMPLATE}


def normalize_question(question: str) -> str:
    """Strip the question and append "?" unless it already ends with one (docs/method.md §2.1, preprocessing)."""
    if not isinstance(question, str):
        raise TypeError(f"question must be a str, got {type(question).__name__}: {question!r}")
    q = question.strip()
    if not q:
        raise ValueError("question is empty after stripping; every row needs a non-empty question")
    return q if q.endswith("?") else q + "?"


def make_prompt(question: str, template: str = "paper") -> str:
    """The user-message text for one question: the chosen template with the normalized question filled in.

    template: "paper" (Table 4, default), "released" (plan/observation variant of the released code) or
    "sub_answer" (Table 5, for the "ow sub-answer" ablation).
    """
    if template not in TEMPLATES:
        raise ValueError(f"unknown prompt template {template!r}; valid names: {sorted(TEMPLATES)}")
    return TEMPLATES[template].replace("{question}", normalize_question(question))
