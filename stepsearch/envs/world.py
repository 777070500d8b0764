"""A procedurally generated multi-hop world: a small knowledge base of made-up people, a passage corpus in the
retriever's format, and 2-4-hop questions in the seed parquet format (docs/method.md §4.3).

Everything is a pure function of `WorldConfig` (and its seed), so two calls give byte-identical files.

The knowledge base has `num_entities` people with distinctive invented names. Every person has exactly one
object for every relation (mother, mentor, rival, ...), and every fact becomes one short passage::

    {"id": "w0012", "title": "Zorbak", "text": "The mentor of Zorbak is Quelin."}

A k-hop question composes k relations, innermost first::

    "Who is the rival of the mentor of Zorbak?"   hops: (mentor of Zorbak -> Quelin), (rival of Quelin -> Tivad)

so the agent must search hop by hop, copying each intermediate name from the retrieved passage into its
next query. `search_keys` holds one group per hop and `support_docs` are exactly the corpus passages of the
hops (title + text), which is what the information gain G^t needs (docs/method.md §1.6).
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field

DATA_SOURCE = "synthetic_world"

# Short prompt: a tiny LM has a context of a few hundred tokens; the paper's Table 4 prompt alone is ~250.
DEMO_TEMPLATE = ("Answer the question by searching. Search with <search> query </search> and "
                 "answer with <answer> name </answer>. Question: {question}")

RELATIONS = ("mother", "mentor", "rival", "neighbor", "father", "teacher", "partner", "employer")
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr",
           "pl", "st", "tr", "qu", "sh", "th")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou")
_CODAS = ("", "", "n", "r", "l", "k", "x", "m", "th")


@dataclass(frozen=True)
class WorldConfig:
    """Size and shape of the world. All counts are exact; `seed` fixes every random choice."""

    seed: int = 0
    # number of people in the knowledge base; every person gets one passage per relation
    num_entities: int = 120
    # how many of RELATIONS the world uses (each person has one object per relation)
    num_relations: int = 4
    # hop count -> share of questions; hop counts must lie in 1..4
    hop_weights: tuple[tuple[int, float], ...] = ((2, 0.5), (3, 0.3), (4, 0.2))
    num_train: int = 800
    num_test: int = 100
    # false: every hop of a question follows the same relation ("the mentor of the mentor of X"), so a tiny LM can
    # read the relation off the question and the skill to learn is the hop-by-hop chaining; true: relations mix
    # ("the rival of the mentor of X"), which a 0.2M-parameter model does not learn in the demo's SFT budget
    mixed_relations: bool = False
    template: str = DEMO_TEMPLATE

    def __post_init__(self):
        if not 2 <= self.num_relations <= len(RELATIONS):
            raise ValueError(f"[world] num_relations ({self.num_relations}) must be in 2..{len(RELATIONS)}")
        if self.num_entities < 8:
            raise ValueError(f"[world] num_entities ({self.num_entities}) must be >= 8 so chains do not repeat")
        hops = [h for h, _ in self.hop_weights]
        if not hops or any(h not in (1, 2, 3, 4) for h in hops) or any(w <= 0 for _, w in self.hop_weights):
            raise ValueError(f"[world] hop_weights ({self.hop_weights}) must map hop counts in 1..4 to "
                             "positive weights, e.g. ((2, 0.5), (3, 0.3), (4, 0.2))")
        if self.num_train < 1 or self.num_test < 1:
            raise ValueError(f"[world] num_train ({self.num_train}) and num_test ({self.num_test}) must be >= 1")
        if "{question}" not in self.template:
            raise ValueError("[world] template must contain the placeholder {question}")


@dataclass(frozen=True)
class Fact:
    subject: str
    relation: str
    object: str
    doc_id: str

    @property
    def passage(self) -> dict:
        return {"id": self.doc_id, "title": self.subject, "text": fact_text(self.relation, self.subject, self.object)}


@dataclass(frozen=True)
class Question:
    """One k-hop chain: start entity, relations innermost first, and the entity reached after each hop."""

    start: str
    relations: tuple[str, ...]
    entities: tuple[str, ...]   # entities[i] = object of hop i; entities[-1] is the answer
    hop_doc_ids: tuple[str, ...]

    @property
    def text(self) -> str:
        return question_text(self.start, self.relations)

    @property
    def answer(self) -> str:
        return self.entities[-1]


@dataclass
class World:
    config: WorldConfig
    entities: list[str]
    relations: list[str]
    facts: dict[tuple[str, str], Fact] = field(default_factory=dict)   # (subject, relation) -> Fact
    train: list[Question] = field(default_factory=list)
    test: list[Question] = field(default_factory=list)

    def passages(self) -> list[dict]:
        """The corpus rows `{"id","title","text"}`, ordered by id."""
        return [f.passage for f in sorted(self.facts.values(), key=lambda f: f.doc_id)]

    def lookup(self, subject: str, relation: str) -> Fact:
        key = (subject, relation)
        if key not in self.facts:
            raise KeyError(f"no fact for relation {relation!r} of {subject!r}")
        return self.facts[key]


def fact_text(relation: str, subject: str, obj: str) -> str:
    return f"The {relation} of {subject} is {obj}."


def hop_query(relation: str, subject: str) -> str:
    """The canonical search query of one hop (what the scripted warm-start policy searches)."""
    return f"{relation} of {subject}"


def question_text(start: str, relations: tuple[str, ...]) -> str:
    """relations innermost first: ("mentor", "rival") -> "Who is the rival of the mentor of X?"."""
    chain = " of ".join(f"the {r}" for r in reversed(relations))
    return f"Who is {chain} of {start}?"


def make_names(rng: random.Random, n: int) -> list[str]:
    """n distinct invented names of 2-3 syllables; none is a prefix of another (clean string matching)."""
    names: set[str] = set()
    while len(names) < n:
        syllables = rng.choice((2, 2, 3))
        name = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)) + rng.choice(_CODAS)
        if 4 <= len(name) <= 10:
            names.add(name.capitalize())
    ordered = sorted(names)
    rng.shuffle(ordered)
    pruned = [a for a in ordered if not any(a != b and b.startswith(a) for b in ordered)]
    if len(pruned) < n:   # rare: a prefix clash removed names; draw more deterministically
        extra = make_names(random.Random(rng.random()), n - len(pruned) + 4)
        pruned += [e for e in extra if not any(e.startswith(b) or b.startswith(e) for b in pruned)]
    return pruned[:n]


def build_knowledge_base(cfg: WorldConfig, rng: random.Random) -> World:
    entities = make_names(rng, cfg.num_entities)
    relations = list(RELATIONS[: cfg.num_relations])
    world = World(config=cfg, entities=entities, relations=relations)
    facts = []
    for subject in entities:
        for relation in relations:
            obj = rng.choice([e for e in entities if e != subject])
            facts.append((subject, relation, obj))
    order = list(range(len(facts)))
    rng.shuffle(order)   # doc ids do not reveal the subject order
    for doc_index, k in enumerate(order):
        subject, relation, obj = facts[k]
        world.facts[(subject, relation)] = Fact(subject, relation, obj, f"w{doc_index:04d}")
    return world


def sample_chain(world: World, rng: random.Random, hops: int) -> Question | None:
    """A random chain of `hops` relation steps that visits distinct entities (None if it loops). With
    mixed_relations, consecutive hops use different relations; otherwise every hop uses one relation."""
    start = rng.choice(world.entities)
    relations, entities, doc_ids = [], [], []
    current, seen = start, {start}
    single = rng.choice(world.relations)
    for _ in range(hops):
        if not world.config.mixed_relations:
            relation = single
        else:
            relation = rng.choice([r for r in world.relations if not relations or r != relations[-1]])
        fact = world.lookup(current, relation)
        if fact.object in seen:
            return None
        relations.append(relation)
        entities.append(fact.object)
        doc_ids.append(fact.doc_id)
        seen.add(fact.object)
        current = fact.object
    return Question(start, tuple(relations), tuple(entities), tuple(doc_ids))


def sample_questions(world: World, rng: random.Random) -> None:
    """Fill world.train and world.test with distinct chains; no (start, relations) pair is in both splits."""
    cfg = world.config
    hop_values = [h for h, _ in cfg.hop_weights]
    hop_probs = [w for _, w in cfg.hop_weights]
    seen: set[tuple[str, tuple[str, ...]]] = set()
    wanted = cfg.num_test + cfg.num_train
    out: list[Question] = []
    attempts = 0
    while len(out) < wanted:
        attempts += 1
        if attempts > 200 * wanted:
            raise ValueError(f"[world] could only sample {len(out)} distinct questions of {wanted}; "
                             "raise num_entities or num_relations, or lower num_train/num_test")
        q = sample_chain(world, rng, rng.choices(hop_values, hop_probs)[0])
        if q is None or (q.start, q.relations) in seen:
            continue
        seen.add((q.start, q.relations))
        out.append(q)
    world.test, world.train = out[: cfg.num_test], out[cfg.num_test:]


def generate_world(cfg: WorldConfig) -> World:
    rng = random.Random(cfg.seed)
    world = build_knowledge_base(cfg, rng)
    sample_questions(world, rng)
    return world


def question_row(world: World, q: Question, split: str, index: int) -> dict:
    """One parquet row in the seed format (CONTRACTS.md "Dataset rows")."""
    hops = []
    subject = q.start
    for relation, obj in zip(q.relations, q.entities):
        hops.append((relation, subject, obj))
        subject = obj
    search_keys = [[hop_query(r, s), f"the {r} of {s}", f"Who is the {r} of {s}?"] for r, s, _ in hops]
    support_docs = [{"id": world.lookup(s, r).doc_id, "title": s, "text": fact_text(r, s, o)} for r, s, o in hops]
    decomposition = [{"question": f"Who is the {r} of {s}?", "answer": o} for r, s, o in hops]
    return {
        "id": f"{DATA_SOURCE}_{split}_{index}",
        "data_source": DATA_SOURCE,
        "prompt": [{"role": "user", "content": world.config.template.replace("{question}", q.text)}],
        "ability": "fact-reasoning",
        "reward_model": {"style": "rule", "ground_truth": {"target": [q.answer], "search_keys": search_keys}},
        "extra_info": {"split": split, "index": index, "support_docs": support_docs, "question": q.text,
                       "hops": len(q.relations), "decomposition": decomposition},
    }


def world_rows(world: World) -> dict[str, list[dict]]:
    return {"train": [question_row(world, q, "train", i) for i, q in enumerate(world.train)],
            "test": [question_row(world, q, "test", i) for i, q in enumerate(world.test)]}


def tokenizer_texts(world: World) -> list[str]:
    """Texts to train the demo tokenizer on: passages, questions, queries, the template and the doc format."""
    texts = [p["text"] for p in world.passages()]
    for q in world.train + world.test:
        texts.append(q.text)
    texts += [f"Doc {i}<## Title: {e} ##> " for i in (1, 2, 3) for e in world.entities]
    texts += [hop_query(r, e) for e in world.entities for r in world.relations]
    texts.append(world.config.template)
    return texts


def world_fingerprint(world: World) -> str:
    """sha256 of the corpus and both splits: equal fingerprints mean identical generated data."""
    blob = json.dumps({"corpus": world.passages(), **world_rows(world)}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def describe(world: World) -> dict:
    hops = {}
    for q in world.train + world.test:
        hops[len(q.relations)] = hops.get(len(q.relations), 0) + 1
    return {"config": asdict(world.config), "num_passages": len(world.facts), "num_train": len(world.train),
            "num_test": len(world.test), "questions_per_hop_count": {str(k): v for k, v in sorted(hops.items())},
            "fingerprint": world_fingerprint(world)}
