"""Tag tokens and the fixed observation texts of the agent loop (docs/method.md §2.3, item 4).

The instruction templates themselves live in `stepsearch.data.prompts` (the dataset applies them and the
chat template); the loop only appends these observation texts after the model's turns.
"""
from __future__ import annotations

# Added to tiny tokenizers as extra (non-special) tokens so that each tag is one id (docs/CONTRACTS.md).
TAG_TOKENS: tuple[str, ...] = (
    "<search>", "</search>", "<answer>", "</answer>", "<information>", "</information>", "<think>", "</think>",
)

# Stop strings of a turn: generation ends right after the first of these (docs/method.md §2.3, item 2).
STOP_STRINGS: tuple[str, ...] = ("</search>", "</answer>")

# An <information> block is OPEN + formatted docs (stripped) + CLOSE (docs/method.md §2.3, item 4).
INFORMATION_OPEN = "\n\n<information> "
INFORMATION_CLOSE = " </information>\n\n"

# Corrective observation after a turn without a parsable action (docs/method.md §2.3, item 4; released wording).
INVALID_ACTION_WARNING = (
    "\n<warning> My previous action is invalid. If I want to search, I should put the query between <search> "
    "and </search>. If I want to give the final answer, I should put the answer between <answer> and "
    "</answer>. Let me try again. </warning>\n"
)

# Appended on the last loop turn after a search or an invalid action; a forced final turn follows.
FINAL_TURN_WARNING = (
    "<warning> Now, I can no longer call <search></search> for external information. I must analyze and "
    "answer based on the existing information. Now let me make a final thought and give an answer. "
    "</warning>\n\n"
)

# Observation when the retriever failed after the client's retries (AgentConfig.on_retrieval_error="observe").
# Not an <information> block: no documents were retrieved, so the round earns no step reward.
RETRIEVAL_ERROR_OBSERVATION = (
    "\n\n<warning> The search engine failed to answer this query (retrieval error), so there are no results. "
    "I can search again or answer based on the existing information. </warning>\n\n"
)
