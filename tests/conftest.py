"""Shared test set-up. Session fixtures for real services (redis_url, wiki_index_dir, retrieval_url) live in
tests/fixtures_search.py and are registered here."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

pytest_plugins = ["tests.fixtures_search"]
