"""Parsing the model's action in one turn (docs/method.md §2.3, item 3)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

# The first <search>…</search> or <answer>…</answer> decides the action (across newlines, non-greedy).
ACTION_RE = re.compile(r"<(search|answer)>(.*?)</\1>", re.DOTALL)

ActionKind = Literal["search", "answer", "invalid"]


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    content: str
    """The stripped text between the tags ("" for invalid)."""


def parse_action(text: str) -> Action:
    """The first complete `<search>`/`<answer>` span of one turn's text; "invalid" if there is none.

    An empty query (`<search> </search>`) is invalid too: it cannot be retrieved, and sending it would make
    the server reject the whole turn's batched request.
    """
    match = ACTION_RE.search(text)
    if match is None:
        return Action("invalid", "")
    kind, content = match.group(1), match.group(2).strip()
    if kind == "search" and not content:
        return Action("invalid", "")
    return Action(kind, content)
