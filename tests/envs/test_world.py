"""The synthetic world: determinism, answers re-derived by walking the corpus text, exact support docs, the
parquet seed format read by the trainer's dataset class, and the scripted warm-start policy."""
import json
import re

import pandas as pd
import pytest

from stepsearch.envs.make_world import write_world
from stepsearch.envs.world import WorldConfig, generate_world, question_text, world_fingerprint, world_rows

SMALL = WorldConfig(seed=3, num_entities=30, num_relations=3, num_train=60, num_test=15)


@pytest.fixture(scope="module")
def world():
    return generate_world(SMALL)


def test_same_seed_same_world_other_seed_differs():
    a, b = generate_world(SMALL), generate_world(SMALL)
    assert world_fingerprint(a) == world_fingerprint(b)
    c = generate_world(WorldConfig(**{**SMALL.__dict__, "seed": 4}))
    assert world_fingerprint(c) != world_fingerprint(a)


def test_sizes_and_hops(world):
    assert len(world.passages()) == 30 * 3          # one passage per (person, relation)
    assert len(world.train) == 60 and len(world.test) == 15
    assert {len(q.relations) for q in world.train + world.test} <= {2, 3, 4}
    assert len(set(world.entities)) == 30
    # no name is a prefix of another, so a name found in text is unambiguous
    assert not any(a != b and b.startswith(a) for a in world.entities for b in world.entities)


def test_question_text_is_outermost_first():
    assert question_text("Zorbak", ("mentor", "rival")) == "Who is the rival of the mentor of Zorbak?"


def test_answers_follow_the_corpus_text(world):
    """Slow reference: walk the chain by regex over the corpus passages only, never through world.facts."""
    facts = {}
    for p in world.passages():
        m = re.fullmatch(r"The (\w+) of (\w+) is (\w+)\.", p["text"])
        assert m and m.group(2) == p["title"]
        facts[(m.group(2), m.group(1))] = (m.group(3), p)
    for split, rows in world_rows(world).items():
        for row in rows:
            question = row["extra_info"]["question"]
            start = re.search(r"of (\w+)\?$", question).group(1)
            relations = list(reversed(re.findall(r"the (\w+)", question)))
            entity, docs = start, []
            for r in relations:
                entity, passage = facts[(entity, r)]
                docs.append(passage)
            assert row["reward_model"]["ground_truth"]["target"] == [entity]
            assert row["extra_info"]["support_docs"] == docs          # exactly the corpus passages, in hop order
            keys = row["reward_model"]["ground_truth"]["search_keys"]
            assert len(keys) == len(relations) and keys[0][0] == f"{relations[0]} of {start}"
            assert row["data_source"] == "synthetic_world" and row["extra_info"]["split"] == split


def test_train_and_test_chains_are_disjoint(world):
    train = {(q.start, q.relations) for q in world.train}
    assert not any((q.start, q.relations) in train for q in world.test)


def test_bad_config_names_the_field():
    with pytest.raises(ValueError, match="num_relations"):
        WorldConfig(num_relations=1)
    with pytest.raises(ValueError, match="hop_weights"):
        WorldConfig(hop_weights=((5, 1.0),))
    with pytest.raises(ValueError, match="could only sample"):
        generate_world(WorldConfig(num_entities=8, num_relations=2, num_train=5000, num_test=10))


def test_files_load_with_the_trainer_dataset(tmp_path, world):
    from stepsearch.data.row_fields import search_row_fields
    from verl.utils.dataset import RLHFDataset
    from verl.utils.tiny_model import build_tokenizer

    paths = write_world(world, str(tmp_path))
    corpus = [json.loads(line) for line in open(paths["corpus.jsonl"])]
    assert corpus == world.passages() and set(corpus[0]) == {"id", "title", "text"}
    df = pd.read_parquet(paths["test.parquet"])
    assert list(df.columns) == ["id", "data_source", "prompt", "ability", "reward_model", "extra_info"]
    tok = build_tokenizer(["Who is the mother of Zorbak?"], vocab_size=300)
    ds = RLHFDataset(paths["test.parquet"], tok, max_prompt_length=512, batch_size=4, shuffle=False,
                     row_adapter=search_row_fields)
    item = ds[0]
    assert item["ground_truth"]["target"] == [world.test[0].answer]
    assert [d["text"] for d in item["support_docs"]] == [world.lookup(s, r).passage["text"] for s, r in
                                                          zip((world.test[0].start,) + world.test[0].entities[:-1],
                                                              world.test[0].relations)]
    assert json.load(open(paths["world.json"]))["fingerprint"] == world_fingerprint(world)


def test_relation_mixing_option(world):
    assert all(len(set(q.relations)) == 1 for q in world.train + world.test)       # default: one relation per chain
    mixed = generate_world(WorldConfig(**{**SMALL.__dict__, "mixed_relations": True}))
    assert all(a != b for q in mixed.train for a, b in zip(q.relations, q.relations[1:]))
    assert any(len(set(q.relations)) > 1 for q in mixed.train)


def test_build_cli_hop_weights(tmp_path):
    from stepsearch.envs.make_world import main, parse_hop_weights

    assert parse_hop_weights("2:0.5,3:0.3,4:0.2") == ((2, 0.5), (3, 0.3), (4, 0.2))
    with pytest.raises(ValueError, match="hop_weights"):
        parse_hop_weights("two")
    main(["--out", str(tmp_path), "--hop_weights", "2:1", "--num_entities", "20", "--num_train", "30",
          "--num_test", "10"])
    assert json.load(open(tmp_path / "world.json"))["questions_per_hop_count"] == {"2": 40}
