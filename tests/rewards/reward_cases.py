"""Real wiki-18 passages (data/samples/wiki18_sample_1000.jsonl) and a seeded generator of randomized reward cases."""
import random
from functools import lru_cache
from pathlib import Path

from stepsearch.search.corpus import iter_passages

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "samples" / "wiki18_sample_1000.jsonl"


@lru_cache(maxsize=1)
def wiki_passages() -> tuple[dict, ...]:
    """[{"id", "title", "text"}] of the 1000 bundled passages, read by the retriever's own corpus reader."""
    return tuple({"id": p.id, "title": p.title, "text": p.text} for p in iter_passages(SAMPLE))


def random_doc_text(rng: random.Random, golds: list[str]) -> str:
    """A retrieved body text: mostly a random passage, sometimes a gold passage, a gold fragment or junk."""
    passages = wiki_passages()
    u = rng.random()
    if u < 0.6:
        return rng.choice(passages)["text"]
    if u < 0.75:
        return rng.choice(golds)
    if u < 0.9:                                             # a fragment of a gold doc, upper-cased words kept
        words = rng.choice(golds).split()
        a = rng.randrange(len(words))
        return " ".join(words[a:a + rng.randint(1, 30)])
    return rng.choice(["", "!!! ... ---", "a an the", "x y z", "Doc 2", "Ünïcödé wörds — “quoted” 1999"])


def random_case(rng: random.Random, max_golds: int = 4, max_rounds: int = 3, max_docs: int = 3):
    """(rounds of retrieved texts, gold texts) for one randomized trajectory."""
    passages = wiki_passages()
    golds = [p["text"] for p in rng.sample(passages, rng.randint(1, max_golds))]
    rounds = [[random_doc_text(rng, golds) for _ in range(rng.randint(1, max_docs))]
              for _ in range(rng.randint(1, max_rounds))]
    return rounds, golds
