"""Observation token ids: `<information>` blocks, warnings and retrieval errors, capped with balanced tags.

The model's own tokens are never re-tokenized; only these injected texts are. Fixed texts (the tags and the
warnings) are tokenized once and cached; the docs of a whole turn are tokenized in one batched call.
An information block is tokenized as three pieces, OPEN + body + CLOSE, so that a length cap can cut the body
and still end with ` </information>` (the released loop could cut the closing tag).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from stepsearch.agent.tags import (FINAL_TURN_WARNING, INFORMATION_CLOSE, INFORMATION_OPEN, INVALID_ACTION_WARNING,
                                      RETRIEVAL_ERROR_OBSERVATION)
from stepsearch.rewards.docs import doc_title_text, format_docs, format_docs_with_spans


@dataclass(frozen=True)
class Observation:
    """One observation to append: its ids, and whether it is an <information> block (a search round)."""

    token_ids: list[int]
    is_information: bool
    truncated: bool = False
    shown_chars: int | None = None
    """<information> blocks: how many characters of the rendered docs (``format_docs(hits).strip()``) fit."""


def hits_to_round(query: str, hits: Sequence[dict], shown_chars: int | None = None) -> dict:
    """The `rounds` entry of one search (docs/CONTRACTS.md), restricted to what the policy was shown:
    `{"query", "docs": [{"id", "title", "text", "truncated"}], "hidden_docs"}`.

    shown_chars: characters of the rendered docs that fit in the observation (None: all). A doc whose body was cut
    keeps the shown part of its text (truncated true); a doc whose body was not reached is left out and counted
    in hidden_docs. The rewards score exactly these texts, as the released code scores the cut <information> text.
    """
    _, spans = format_docs_with_spans(hits)
    docs, hidden = [], 0
    for rank, (hit, (start, end)) in enumerate(zip(hits, spans)):
        row = hit.get("document", hit) if isinstance(hit, dict) else hit
        title, text = doc_title_text(row, f"hit {rank} of query {query!r}")
        shown = len(text) if shown_chars is None else min(max(shown_chars - start, 0), len(text))
        if shown == 0 and text:
            hidden += 1
            continue
        doc_id = row.get("id") if isinstance(row, dict) else None
        docs.append({"id": None if doc_id is None else str(doc_id), "title": title, "text": text[:shown],
                     "truncated": shown < len(text)})
    return {"query": query, "docs": docs, "hidden_docs": hidden}


def _common_prefix_length(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class ObservationEncoder:
    """Turns observation texts into capped token ids with one tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._fixed: dict[str, list[int]] = {}

    def encode_fixed(self, text: str) -> list[int]:
        if text not in self._fixed:
            self._fixed[text] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._fixed[text]

    def information_overhead(self, final_warning: bool) -> int:
        """Tokens of an information block without its body (the least room a search round needs, plus one)."""
        extra = len(self.encode_fixed(FINAL_TURN_WARNING)) if final_warning else 0
        return len(self.encode_fixed(INFORMATION_OPEN)) + len(self.encode_fixed(INFORMATION_CLOSE)) + extra

    def information(self, hits_per_query: Sequence[Sequence[dict]], caps: Sequence[int],
                    final_warning: Sequence[bool]) -> list[Observation]:
        """One `<information>` block per query's hits: OPEN + docs + CLOSE (+ final warning), each capped.

        caps[i] is the most tokens observation i may take; the body is cut first so the tags stay balanced.
        A cap too small for the fixed parts raises (the loop checks `information_overhead` before retrieval).
        """
        bodies = [format_docs(hits).strip() for hits in hits_per_query]
        body_ids = self.tokenizer(bodies, add_special_tokens=False)["input_ids"] if bodies else []
        head, tail = self.encode_fixed(INFORMATION_OPEN), self.encode_fixed(INFORMATION_CLOSE)
        out = []
        for body, ids, cap, last in zip(bodies, body_ids, caps, final_warning):
            suffix = tail + (self.encode_fixed(FINAL_TURN_WARNING) if last else [])
            room = cap - len(head) - len(suffix)
            if room < 1:
                raise ValueError(f"[agent] an information block needs more than {len(head) + len(suffix)} tokens "
                                 f"but only {cap} are left; raise max_obs_length or max_response_length")
            shown = len(body)
            if len(ids) > room:  # the characters the kept tokens spell (a split multi-byte char is not counted)
                shown = _common_prefix_length(self.tokenizer.decode(ids[:room], skip_special_tokens=False), body)
            out.append(Observation(head + ids[:room] + suffix, is_information=True, truncated=len(ids) > room,
                                   shown_chars=shown))
        return out

    def warning(self, text: str, cap: int, final_warning: bool) -> Observation:
        """A fixed warning text (invalid action, retrieval error), optionally followed by the final warning.

        Over the cap, the whole observation is dropped (an empty observation) rather than cutting a
        `<warning>` block in half.
        """
        ids = self.encode_fixed(text) + (self.encode_fixed(FINAL_TURN_WARNING) if final_warning else [])
        if len(ids) > cap:
            return Observation([], is_information=False, truncated=True)
        return Observation(list(ids), is_information=False)

    def invalid_action(self, cap: int, final_warning: bool) -> Observation:
        return self.warning(INVALID_ACTION_WARNING, cap, final_warning)

    def retrieval_error(self, cap: int, final_warning: bool) -> Observation:
        return self.warning(RETRIEVAL_ERROR_OBSERVATION, cap, final_warning)

    def final_only(self, cap: int) -> Observation:
        return self.warning("", cap, final_warning=True)
