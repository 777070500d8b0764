"""RetrievalClient.session(): one pooled AsyncClient for many calls, with the client's timeout, retries and errors."""
import asyncio

import pytest

from stepsearch.search.client import RetrievalClient, RetrievalError
from tests.search.test_client import QUERIES, flaky_server  # noqa: F401  (fixture)


def test_session_answers_as_retrieve(retrieval_url):
    client = RetrievalClient(retrieval_url, batch_size=3, max_concurrency=2)
    whole = client.retrieve(QUERIES, topk=2)

    async def run():
        async with client.session(max_connections=4) as session:
            http = session._http
            many = await session.retrieve(QUERIES, topk=2)
            ones = await asyncio.gather(*(session.retrieve_one(q, topk=2) for q in QUERIES))
            same_pool = session._http is http and not http.is_closed  # one AsyncClient for every call
        return many, ones, same_pool, http.is_closed, session
    many, ones, same_pool, closed_after, session = asyncio.run(run())
    assert many == whole and ones == whole and same_pool and closed_after
    with pytest.raises(RuntimeError, match="outside `async with client.session"):
        asyncio.run(session.retrieve_one("q", topk=1))


def test_session_retries_5xx_then_raises(flaky_server):  # noqa: F811
    url, state = flaky_server
    client = RetrievalClient(url, max_retries=3, backoff_s=0.01)

    async def one():
        async with client.session() as session:
            return await session.retrieve_one("a", topk=1)
    assert asyncio.run(one())[0]["document"]["id"] == "1" and state["calls"] == 3  # two 503s, then 200
    state["calls"], state["fail_first"] = 0, 100
    with pytest.raises(RetrievalError, match="failed after 4 tries: HTTP 503"):
        asyncio.run(one())
    assert state["calls"] == 4


def test_session_timeout_and_bad_arguments(flaky_server):  # noqa: F811
    url, _ = flaky_server

    async def slow():
        async with RetrievalClient(url + "/slow", max_retries=1, backoff_s=0.01, timeout_s=0.3).session() as s:
            return await s.retrieve_one("a", topk=1)
    with pytest.raises(RetrievalError, match="failed after 2 tries: ReadTimeout"):
        asyncio.run(slow())

    async def bad():
        async with RetrievalClient(url).session() as s:
            await s.retrieve_one(["a"], topk=1)
    with pytest.raises(TypeError, match="one query string"):
        asyncio.run(bad())
