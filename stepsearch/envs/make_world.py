"""Write a synthetic world to disk: `corpus.jsonl` (retriever format), `train.parquet` / `test.parquet` (seed
format) and `world.json` (config, sizes, fingerprint).

    python -m stepsearch.envs.make_world --out runs/world --seed 0 [--num_entities 60 --num_train 1000 --num_test 100] \
        [--hop_weights 2:0.5,3:0.3,4:0.2]
"""
from __future__ import annotations

import argparse
import os

import pandas as pd

from stepsearch.data.io import atomic_path, write_json_atomic, write_jsonl_atomic
from stepsearch.envs.world import World, WorldConfig, describe, generate_world, world_rows


def write_parquet_atomic(path: str, rows: list[dict]) -> None:
    with atomic_path(path, suffix=".parquet") as tmp:
        pd.DataFrame(rows).to_parquet(tmp, index=False)


def write_world(world: World, out_dir: str) -> dict[str, str]:
    """Write the world's files under out_dir; returns {name: path}."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {name: os.path.join(out_dir, name) for name in ("corpus.jsonl", "train.parquet", "test.parquet",
                                                             "world.json")}
    write_jsonl_atomic(paths["corpus.jsonl"], world.passages())
    rows = world_rows(world)
    write_parquet_atomic(paths["train.parquet"], rows["train"])
    write_parquet_atomic(paths["test.parquet"], rows["test"])
    write_json_atomic(paths["world.json"], {**describe(world), "entities": world.entities,
                                            "relations": world.relations})
    return paths


def parse_hop_weights(text: str) -> tuple[tuple[int, float], ...]:
    """"2:0.5,3:0.3,4:0.2" -> ((2, 0.5), (3, 0.3), (4, 0.2)); WorldConfig validates the values."""
    try:
        pairs = [item.split(":") for item in text.split(",") if item.strip()]
        return tuple((int(h), float(w)) for h, w in pairs)
    except ValueError as e:
        raise ValueError(f"[world] --hop_weights {text!r} must look like 2:0.5,3:0.3,4:0.2") from e


def main(argv: list[str] | None = None) -> dict[str, str]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=WorldConfig.seed)
    p.add_argument("--num_entities", type=int, default=WorldConfig.num_entities)
    p.add_argument("--num_relations", type=int, default=WorldConfig.num_relations)
    p.add_argument("--num_train", type=int, default=WorldConfig.num_train)
    p.add_argument("--num_test", type=int, default=WorldConfig.num_test)
    p.add_argument("--hop_weights", default=",".join(f"{h}:{w}" for h, w in WorldConfig.hop_weights),
                   help="hop count:share pairs, e.g. 2:1 (2-hop questions only) or 2:0.5,3:0.3,4:0.2")
    p.add_argument("--mixed_relations", action="store_true", help="mix relations within a question (harder)")
    a = p.parse_args(argv)
    cfg = WorldConfig(seed=a.seed, num_entities=a.num_entities, num_relations=a.num_relations,
                      num_train=a.num_train, num_test=a.num_test, hop_weights=parse_hop_weights(a.hop_weights),
                      mixed_relations=a.mixed_relations)
    world = generate_world(cfg)
    paths = write_world(world, a.out)
    info = describe(world)
    print(f"world seed={cfg.seed}: {info['num_passages']} passages, {info['num_train']} train / "
          f"{info['num_test']} test questions, hops {info['questions_per_hop_count']}, "
          f"fingerprint {info['fingerprint'][:12]} -> {a.out}")
    return paths


if __name__ == "__main__":
    main()
