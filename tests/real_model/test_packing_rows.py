"""bench/packing.py's distribution (c): MuSiQue trajectories tokenized with the real SmolLM2 tokenizer.

The rows are checked against what they claim to be, recomputed here from the same record: the prompt is the
training data's paper prompt through the chat template, every observation is an <information> block holding the
hop's supporting paragraph, the loss mask covers exactly the generated turns, and the response ends with EOS.
"""
import pytest
from transformers import AutoTokenizer

from bench import packing
from stepsearch.data.io import iter_records


@pytest.fixture(scope="module")
def tokenizer(real_model_dir):
    return AutoTokenizer.from_pretrained(str(real_model_dir))


def segments(response: list[int], mask: list[int]) -> list[tuple[int, list[int]]]:
    """Runs of equal mask value: [(mask value, ids), ...]."""
    out = []
    for t, m in zip(response, mask):
        if out and out[-1][0] == m:
            out[-1][1].append(t)
        else:
            out.append((m, [t]))
    return out


def test_rows_are_the_paper_prompt_and_real_passages(tokenizer):
    n = 6
    rows, lengths = packing.real_tokenizer_rows(tokenizer, n, vocab=len(tokenizer), max_response=4096)
    records = [loc.record for loc in iter_records(packing.MUSIQUE_SAMPLE, show_progress=False)][:n]
    assert all(r.get("answerable", True) for r in records)
    for (prompt, response, mask), record in zip(rows, records):
        text = tokenizer.decode(prompt)
        assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_end|>\n<|im_start|>assistant\n")
        assert f"Question:{record['question'].rstrip('?')}" in text
        hops = record["question_decomposition"]
        parts = segments(response, mask)
        # generated turn, observation, ..., final generated turn
        assert [m for m, _ in parts] == [1, 0] * len(hops) + [1]
        by_idx = {p["idx"]: p for p in record["paragraphs"]}
        for h, hop in enumerate(hops):
            turn = tokenizer.decode(parts[2 * h][1])
            assert turn.startswith("<think>") and turn.endswith("</search>")
            obs = tokenizer.decode(parts[2 * h + 1][1])
            assert obs.startswith("\n\n<information> Doc 1<## Title: ") and obs.endswith(" </information>\n\n")
            assert obs.count("<## Title:") == packing.REAL_TOPK
            support = by_idx[hop["paragraph_support_idx"]]
            assert obs.startswith(f"\n\n<information> Doc 1<## Title: {support['title']} ##> "
                                  f"{support['paragraph_text'][:100]}")
            assert len(parts[2 * h + 1][1]) <= packing.REAL_OBS_LENGTH
        final = parts[-1][1]
        assert final[-1] == tokenizer.eos_token_id
        assert f"<answer> {record['answer']} </answer>" in tokenizer.decode(final[:-1])
    # the statistics describe these rows
    assert lengths["prompt"][0] == min(len(p) for p, _, _ in rows) and lengths["prompt"][2] == max(
        len(p) for p, _, _ in rows)
    obs_tokens = sum(len(r) - sum(m) for _, r, m in rows)
    assert lengths["observation_share"] == pytest.approx(obs_tokens / sum(len(r) for _, r, _ in rows))
    assert 300 <= lengths["prompt"][1] <= 360 and lengths["observation_share"] > 0.5


def test_folding_into_a_small_vocabulary_keeps_the_lengths(tokenizer):
    full, _ = packing.real_tokenizer_rows(tokenizer, 3, vocab=len(tokenizer), max_response=4096)
    folded, _ = packing.real_tokenizer_rows(tokenizer, 3, vocab=1024, max_response=4096)
    for (p, r, m), (fp, fr, fm) in zip(full, folded):
        assert (len(p), len(r), m) == (len(fp), len(fr), fm)
        assert all(3 <= t < 1024 for t in fp + fr)
        assert [3 + t % 1021 for t in p] == fp
    cut, _ = packing.real_tokenizer_rows(tokenizer, 3, vocab=len(tokenizer), max_response=200)
    assert [(p, r[:200], m[:200]) for p, r, m in full] == cut
