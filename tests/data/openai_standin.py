"""A small stand-in for an OpenAI-compatible chat server (POST /v1/chat/completions), for the key-generation tests.

It answers deterministically: for "Sub-question: X" in the last user message it proposes
  1. X itself, 2. X without its question word and "?", 3. a nonsense query that no source can answer,
  4. X again (a duplicate the parser must drop).
With model "flaky" the first request for each prompt fails with HTTP 503 (to exercise retries); with model
"slow" each answer takes 0.3 s. GET /stats returns the number of chat requests served and, per model, the
largest number of requests that were in flight at once.

Run: python -m uvicorn tests.data.openai_standin:app --host 127.0.0.1 --port PORT
"""
import re
import threading
import time

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

app = FastAPI()
STATE = {"requests": 0, "seen": set(), "in_flight": {}, "max_in_flight": {}}  # the last two per model
LOCK = threading.Lock()
NONSENSE = "zqxv plorbic wumpfle 98731"
QUESTION_WORD = re.compile(r"^(what|who|whom|which|where|when|how many|how|why|in which|in what)\s+", re.I)


class Message(BaseModel):
    role: str
    content: str


class ChatRequest(BaseModel):
    model: str
    messages: list[Message]
    temperature: float = 1.0
    max_tokens: int = 64
    seed: int | None = None


def proposals(sub_question: str) -> list[str]:
    keyword = QUESTION_WORD.sub("", sub_question).rstrip(" ?")
    return [sub_question, keyword, NONSENSE, sub_question]


@app.post("/v1/chat/completions")
def chat(req: ChatRequest):  # a sync handler: FastAPI runs it in a thread pool, so requests can overlap
    with LOCK:
        STATE["requests"] += 1
        now = STATE["in_flight"][req.model] = STATE["in_flight"].get(req.model, 0) + 1
        STATE["max_in_flight"][req.model] = max(STATE["max_in_flight"].get(req.model, 0), now)
    try:
        if req.model == "slow":
            time.sleep(0.3)
        return answer(req)
    finally:
        with LOCK:
            STATE["in_flight"][req.model] -= 1


def answer(req: ChatRequest) -> dict:
    text = req.messages[-1].content
    m = re.search(r"Sub-question: (.*)$", text, re.S)
    if not m:
        raise HTTPException(400, detail="no 'Sub-question:' in the last message")
    if req.model == "flaky" and text not in STATE["seen"]:
        STATE["seen"].add(text)
        raise HTTPException(503, detail="try again")
    lines = [f"{i + 1}. {q}" for i, q in enumerate(proposals(m.group(1).strip()))]
    return {"id": "chatcmpl-standin", "object": "chat.completion", "model": req.model,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "\n".join(lines)}}]}


@app.get("/stats")
def stats():
    return {"requests": STATE["requests"], "max_in_flight": STATE["max_in_flight"]}
