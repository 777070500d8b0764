"""The server's torch thread count (issue 16, 0a): auto by default (every core this process may run on, or
$OMP_NUM_THREADS), 1 for the guarded pipeline, and exactly the number given with --torch_threads N."""
import os

import pytest

from stepsearch.search.server import parse_args
from stepsearch.search.server_config import ServerConfig
from stepsearch.search.service import torch_threads


def test_default_is_auto_and_uses_every_core(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cfg, _ = parse_args(["--index_dir", "x"])
    assert cfg.torch_threads == ServerConfig.__dataclass_fields__["torch_threads"].default == 0
    cores = len(os.sched_getaffinity(0))
    for mode in ("sorted", "exact", "fp16"):
        assert torch_threads(cfg, mode) == cores
    assert torch_threads(cfg, "guarded") == 1  # the pipeline's worker threads are its parallelism
    no_pipeline = ServerConfig(index_dir="x", guard_pipeline=False)
    assert torch_threads(no_pipeline, "guarded") == cores


def test_omp_num_threads_and_the_explicit_flag(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert torch_threads(ServerConfig(index_dir="x"), "sorted") == 3
    assert torch_threads(ServerConfig(index_dir="x"), "guarded") == 3
    cfg, _ = parse_args(["--index_dir", "x", "--torch_threads", "1"])  # the shared-cores case
    assert torch_threads(cfg, "sorted") == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "not-a-number")
    assert torch_threads(ServerConfig(index_dir="x"), "sorted") == len(os.sched_getaffinity(0))
    with pytest.raises(ValueError, match="--torch_threads must be >= 0"):
        ServerConfig(index_dir="x", torch_threads=-1)


def test_index_flags_have_one_default_source():
    from stepsearch.search.index import LoadOptions
    from stepsearch.search.rerank import DEFAULT_NPROBE, DEFAULT_RERANK_CANDIDATES

    cfg, _ = parse_args(["--index_dir", "x"])
    assert cfg.nprobe == LoadOptions().nprobe == DEFAULT_NPROBE
    assert cfg.rerank_candidates == LoadOptions().rerank_candidates == DEFAULT_RERANK_CANDIDATES
    cfg, _ = parse_args(["--index_dir", "x", "--nprobe", "8", "--rerank_candidates", "500"])
    assert (cfg.nprobe, cfg.rerank_candidates) == (8, 500)
