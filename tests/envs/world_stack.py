"""A small world behind the real retrieval stack (MiniLM Flat index + uvicorn server on loopback), plus an
untrained tiny model with the world's tokenizer. Shared by the slow tests of tests/envs and tests/eval."""
from __future__ import annotations

import os
from dataclasses import dataclass

from stepsearch.envs.make_world import write_world
from stepsearch.envs.warmstart import TinyModelConfig, build_demo_model, save_model_dir, world_texts
from stepsearch.envs.world import World, WorldConfig, generate_world
from stepsearch.search.testing import build_test_index, start_retrieval_server

CONFIG = WorldConfig(seed=5, num_entities=24, num_relations=3, num_train=48, num_test=12)


@dataclass
class WorldStack:
    world: World
    world_dir: str
    index_dir: str
    model_dir: str
    url: str


def start_world_stack(root: str):
    """(WorldStack, server handle); the caller stops the server."""
    world = generate_world(CONFIG)
    world_dir = os.path.join(root, "world")
    write_world(world, world_dir)
    index_dir = str(build_test_index(os.path.join(world_dir, "corpus.jsonl"), os.path.join(root, "index")))
    server = start_retrieval_server(index_dir)
    tokenizer, model = build_demo_model(world_texts(world_dir), TinyModelConfig(hidden_size=32, num_layers=1,
                                                                                  num_heads=2, seed=0))
    model_dir = save_model_dir(model, tokenizer, os.path.join(root, "model"))
    return WorldStack(world, world_dir, index_dir, model_dir, server.url), server
