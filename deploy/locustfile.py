"""Locust users for the serving benchmark (``deploy/load_run.py`` runs them headless on loopback).

``Asker``: POSTs ``/ask`` back to back (no think time) with the demo questions in turn, strategy
``BENCH_STRATEGY`` (``rag``), ``max_new_tokens`` ``BENCH_MAX_NEW_TOKENS`` (16). With
``BENCH_STREAM=1`` it asks for server-sent events and reports two extra entries: ``ttft`` (time to
the first token event) and ``/ask stream`` (time to the final event). ``Feeder``: one user that
POSTs a new document every ``BENCH_FEED_SECONDS`` (ingested by the server's worker meanwhile).

    locust -f deploy/locustfile.py --headless -u 9 -r 9 -t 60s --host http://127.0.0.1:8000
"""

from __future__ import annotations

import itertools
import json
import os
import time
import uuid
from pathlib import Path

from locust import HttpUser, constant, events, task

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = [q["question"] for q in json.loads((ROOT / "examples" / "demo_questions.json").read_text())]
DOCUMENTS = json.loads((ROOT / "examples" / "demo_news.json").read_text())["documents"]
STRATEGY = os.environ.get("BENCH_STRATEGY", "rag")
MAX_NEW_TOKENS = int(os.environ.get("BENCH_MAX_NEW_TOKENS", "16"))
STREAM = os.environ.get("BENCH_STREAM") == "1"
_offsets = itertools.count()


class Asker(HttpUser):
    wait_time = constant(0)
    weight = 100

    def on_start(self) -> None:
        self.turn = itertools.count(next(_offsets) * 3)

    def body(self) -> dict:
        return {"question": QUESTIONS[next(self.turn) % len(QUESTIONS)], "strategy": STRATEGY,
                "max_new_tokens": MAX_NEW_TOKENS}

    @task
    def ask(self) -> None:
        if not STREAM:
            self.client.post("/ask", json=self.body(), name="/ask")
            return
        start = time.perf_counter()
        first = None
        with self.client.post("/ask", json={**self.body(), "stream": True}, stream=True, catch_response=True,
                              name="/ask stream headers") as response:
            done = False
            for line in response.iter_lines(decode_unicode=True):
                if line.startswith("event: token") and first is None:
                    first = time.perf_counter() - start
                elif line.startswith("event: done"):
                    done = True
                elif line.startswith("event: error"):
                    response.failure("error event")
                    return
            total = time.perf_counter() - start
        if not done:
            return
        for name, seconds in (("ttft", first if first is not None else total), ("/ask stream", total)):
            events.request.fire(request_type="SSE", name=name, response_time=seconds * 1000, response_length=0,
                                exception=None, context={})


class Feeder(HttpUser):
    fixed_count = 1
    wait_time = constant(float(os.environ.get("BENCH_FEED_SECONDS", "5")))

    @task
    def post_document(self) -> None:
        source = DOCUMENTS[int(time.time()) % len(DOCUMENTS)]
        document = {"id": f"feed-{uuid.uuid4().hex[:12]}", "text": f"Update: {source['text']}"}
        self.client.post("/documents", json={"documents": [document]}, name="/documents")
