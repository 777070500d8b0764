"""Retrieval service: corpus reader, index builder, FastAPI server (Search-R1 /retrieve contract), cache, client.

Entry points: `python -m stepsearch.search.build_index`, `python -m stepsearch.search.server`,
`launch_retrieval.sh`; the rollout talks to the server through `stepsearch.search.client.RetrievalClient`.
See docs/retrieval.md.
"""
