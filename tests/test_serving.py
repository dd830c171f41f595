"""Serving through the ask scheduler, over HTTP against a live server: questions that decode in one
batch answer exactly as they do alone (mixed strategies, two adapter versions), a full queue is a
503 with Retry-After, a client that leaves frees its place, answers stream as server-sent events,
and the official ``openai`` client talks to the OpenAI-compatible endpoints."""

from __future__ import annotations

import json
import threading

import httpx
import openai
import pytest

from tests.conftest import wait_for, wait_ingested
from tests.test_adapters import _distinct_versions
from training.prompts import extract_answer

DOCS = [
    {"id": "s-1", "text": "The council of Norvale approved the Saltmarsh Bridge on Tuesday; it will cost 42 million crowns."},
    {"id": "s-2", "text": "Pelham Rovers beat Ashgrove United 3 to 1 in the Northern Cup final at Lindqvist Stadium."},
]


class Held:
    """Holds the model lock (what a decoding batch holds), so questions pile up in the queue."""

    def __init__(self, server) -> None:
        self.lock = server.app.state.answerer.adapters.lock
        self.acquired, self.release = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._hold)

    def _hold(self) -> None:
        with self.lock:
            self.acquired.set()
            self.release.wait(120)

    def __enter__(self) -> "Held":
        self.thread.start()
        self.acquired.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self.thread.join()


def ask_in_thread(url: str, body: dict, out: list, timeout: float = 120) -> threading.Thread:
    def run():
        try:
            with httpx.Client(base_url=url, timeout=timeout) as own:
                out.append(own.post("/ask", json=body))
        except httpx.TimeoutException as exc:
            out.append(exc)
    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_a_batch_of_mixed_strategies_and_two_versions_answers_as_each_alone(make_server, sharp_model_dir, tmp_path):
    data_dir = tmp_path / "var"
    server = make_server(base_model=str(sharp_model_dir), data_dir=data_dir, batch_wait_seconds=0)
    client, scheduler = server.client, server.app.state.scheduler
    v1, v2 = _distinct_versions(sharp_model_dir, data_dir, 2)
    client.post("/documents", json={"documents": DOCS})
    wait_ingested(client, ["s-1", "s-2"])
    asks = [  # (version active when asked, body)
        (v1, {"question": "How much will the Saltmarsh Bridge cost?", "strategy": "adapter+rag"}),
        (v2, {"question": "How much will the Saltmarsh Bridge cost?", "strategy": "adapter+rag"}),
        (v2, {"question": "Which team did Pelham Rovers beat?", "strategy": "adapter"}),
        (v1, {"question": "Which team did Pelham Rovers beat?", "strategy": "rag"}),
        (v1, {"question": "Where was the Northern Cup final played?", "strategy": "none"}),
    ]
    alone = []
    for version, body in asks:
        assert client.post(f"/adapters/{version}/activate").status_code == 200
        alone.append(client.post("/ask", json={**body, "max_new_tokens": 6}).json())
    assert all(a["timings"]["batch_size"] == 1 for a in alone)
    assert len({a["answer"] for a in alone}) >= 3, "answers must differ for this test to mean something"
    assert alone[0]["answer"] != alone[1]["answer"], "the two versions must answer differently"

    results: list = [[] for _ in asks]
    with Held(server):
        blocker: list = []
        threads = [ask_in_thread(server.url, {"question": "warm up", "strategy": "none", "max_new_tokens": 2}, blocker)]
        wait_for(lambda: scheduler.running == 1, 30, "the first question to be taken")
        for i, (version, body) in enumerate(asks):  # each pins the version active when it arrives
            assert client.post(f"/adapters/{version}/activate").status_code == 200
            threads.append(ask_in_thread(server.url, {**body, "max_new_tokens": 6}, results[i]))
            wait_for(lambda n=i + 1: scheduler.waiting == n, 30, f"question {i} to wait")
    for t in threads:
        t.join(timeout=120)
    together = [r[0].json() for r in results]
    assert [t["timings"]["batch_size"] for t in together] == [len(asks)] * len(asks)
    for solo, batched in zip(alone, together):
        assert batched["answer"] == solo["answer"]
        assert (batched["adapter_version"], batched["strategy"]) == (solo["adapter_version"], solo["strategy"])


def test_a_full_queue_is_503_with_retry_after_and_a_client_that_leaves_frees_its_place(make_server, tiny_model_dir):
    server = make_server(base_model=str(tiny_model_dir), max_batch_asks=1, max_waiting_asks=1)
    scheduler = server.app.state.scheduler
    question = {"question": "Who approved the bridge?", "max_new_tokens": 2}
    first, leaving, later = [], [], []
    with Held(server):
        threads = [ask_in_thread(server.url, question, first)]
        wait_for(lambda: scheduler.running == 1, 30, "the first question to be taken")
        threads.append(ask_in_thread(server.url, question, leaving, timeout=2))  # gives up after 2 s
        wait_for(lambda: scheduler.waiting == 1, 30, "the second question to wait")
        full = server.client.post("/ask", json=question)
        assert full.status_code == 503 and full.json()["type"] == "unavailable"
        assert int(full.headers["retry-after"]) >= 1
        threads[1].join(timeout=30)
        assert isinstance(leaving[0], httpx.TimeoutException)
        wait_for(lambda: scheduler.waiting == 0, 30, "the gone client's question to leave the queue")
        threads.append(ask_in_thread(server.url, question, later))  # its place is free again
        wait_for(lambda: scheduler.waiting == 1, 30, "a new question to take the freed place")
    for t in threads:
        t.join(timeout=60)
    assert first[0].status_code == 200 and later[0].status_code == 200
    assert "freshlm_requests_cancelled_total 1.0" in server.client.get("/metrics").text


def sse_events(response: httpx.Response) -> list[tuple[str, dict]]:
    events, kind = [], None
    for line in response.iter_lines():
        if line.startswith("event: "):
            kind = line[len("event: "):]
        elif line.startswith("data: "):
            events.append((kind, json.loads(line[len("data: "):])))
    return events


def test_ask_streams_tokens_then_the_answer_with_provenance(make_server, sharp_model_dir):
    server = make_server(base_model=str(sharp_model_dir))
    client = server.client
    client.post("/documents", json={"documents": DOCS})
    wait_ingested(client, ["s-1", "s-2"])
    body = {"question": "How much will the Saltmarsh Bridge cost?", "strategy": "rag", "max_new_tokens": 8}
    whole = client.post("/ask", json=body).json()
    with client.stream("POST", "/ask", json={**body, "stream": True}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    kinds = [k for k, _ in events]
    assert kinds[-1] == "done" and set(kinds[:-1]) == {"token"} and len(kinds) > 2
    done = events[-1][1]
    assert done["answer"] == whole["answer"] == extract_answer("".join(e["text"] for k, e in events[:-1]))
    assert done["strategy"] == "rag" and done["documents"][0]["id"] == "s-1" and done["adapter_version"] is None
    assert {"queue_seconds", "first_token_seconds", "generate_seconds"} <= set(done["timings"])
    bad = client.post("/ask", json={**body, "stream": True, "strategy": "mac"})  # refused before the stream
    assert bad.status_code == 400 and bad.json()["type"] == "bad_request"
    metrics = client.get("/metrics").text
    for name in ("freshlm_time_to_first_token_seconds_count", "freshlm_request_queue_time_seconds_count",
                 "freshlm_num_requests_running", "freshlm_num_requests_waiting", "freshlm_generation_tokens_total",
                 "freshlm_generation_tokens_per_second"):
        assert name in metrics


def test_the_openai_client_gets_a_completion_a_stream_and_the_models(make_server, sharp_model_dir):
    server = make_server(base_model=str(sharp_model_dir), api_keys=["user-key"])
    headers = {"Authorization": "Bearer user-key"}
    server.client.post("/documents", json={"documents": DOCS}, headers=headers)
    wait_ingested(httpx.Client(base_url=server.url, headers=headers, timeout=60), ["s-1", "s-2"])
    question = "Which team did Pelham Rovers beat?"
    expected = server.client.post("/ask", headers=headers, json={"question": question, "strategy": "rag",
                                                                 "max_new_tokens": 8}).json()
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="user-key", max_retries=0)
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": question}]

    completion = client.chat.completions.create(model="freshlm:rag", messages=messages, max_tokens=8)
    assert completion.choices[0].message.content == expected["answer"]
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.model_extra["freshlm"]["documents"][0]["id"] == "s-2"

    chunks = list(client.chat.completions.create(model="freshlm", messages=messages, max_tokens=8, stream=True,
                                                 extra_body={"strategy": "rag"}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert extract_answer(text) == expected["answer"]
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].model_extra["freshlm"]["strategy"] == "rag"

    ids = [m.id for m in client.models.list()]
    assert ids[0] == "freshlm" and "freshlm:rag" in ids and "freshlm:mac" not in ids
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="gpt-4o", messages=messages)


def test_questions_reading_memory_batch_together_and_each_reads_its_own_entries(make_server, sharp_model_dir,
                                                                                 mac_artifact_dir):
    server = make_server(base_model=str(sharp_model_dir), mac_artifact=str(mac_artifact_dir), batch_wait_seconds=0)
    client, scheduler = server.client, server.app.state.scheduler
    client.post("/documents", json={"documents": DOCS})
    wait_ingested(client, ["s-1", "s-2"])
    asks = [{"question": "How much will the Saltmarsh Bridge cost?", "strategy": "mac"},
            {"question": "Which team did Pelham Rovers beat?", "strategy": "mac+rag"},
            {"question": "Where was the Northern Cup final played?", "strategy": "mac"}]
    alone = [client.post("/ask", json={**body, "max_new_tokens": 6}).json() for body in asks]
    assert len({a["answer"] for a in alone}) >= 2 and all(a["memory_documents"] for a in alone)
    results: list = [[] for _ in asks]
    with Held(server):
        threads = [ask_in_thread(server.url, {"question": "warm up", "strategy": "none", "max_new_tokens": 2}, [])]
        wait_for(lambda: scheduler.running == 1, 30, "the first question to be taken")
        for i, body in enumerate(asks):
            threads.append(ask_in_thread(server.url, {**body, "max_new_tokens": 6}, results[i]))
        wait_for(lambda: scheduler.waiting == len(asks), 30, "the questions to wait")
    for t in threads:
        t.join(timeout=120)
    together = [r[0].json() for r in results]
    assert [t["timings"]["batch_size"] for t in together] == [len(asks)] * len(asks)
    for solo, batched in zip(alone, together):
        assert (batched["answer"], batched["memory_documents"], batched["strategy"]) == \
            (solo["answer"], solo["memory_documents"], solo["strategy"])


def test_a_batch_never_holds_more_versions_than_stay_loaded(make_server, sharp_model_dir, tmp_path):
    data_dir = tmp_path / "var"
    server = make_server(base_model=str(sharp_model_dir), data_dir=data_dir, adapters_loaded=1, batch_wait_seconds=0)
    client, scheduler = server.client, server.app.state.scheduler
    v1, v2 = _distinct_versions(sharp_model_dir, data_dir, 2)
    body = {"question": "How much will the Saltmarsh Bridge cost?", "strategy": "adapter", "max_new_tokens": 6}
    alone = {}
    for version in (v1, v2):
        assert client.post(f"/adapters/{version}/activate").status_code == 200
        alone[version] = client.post("/ask", json=body).json()["answer"]
    assert alone[v1] != alone[v2]
    order = [v1, v2, v1]
    results: list = [[] for _ in order]
    with Held(server):
        threads = [ask_in_thread(server.url, {"question": "warm up", "strategy": "none", "max_new_tokens": 2}, [])]
        wait_for(lambda: scheduler.running == 1, 30, "the first question to be taken")
        for i, version in enumerate(order):
            assert client.post(f"/adapters/{version}/activate").status_code == 200
            threads.append(ask_in_thread(server.url, body, results[i]))
            wait_for(lambda n=i + 1: scheduler.waiting == n, 30, f"question {i} to wait")
    for t in threads:
        t.join(timeout=120)
    got = [r[0].json() for r in results]
    assert [g["timings"]["batch_size"] for g in got] == [2, 1, 2]  # v1's two questions together, v2 apart
    assert [(g["adapter_version"], g["answer"]) for g in got] == [(v, alone[v]) for v in order]


def test_a_question_that_arrives_while_another_decodes_joins_it_at_the_next_step(make_server, sharp_model_dir):
    """Continuous batching through the service: B arrives while A streams its answer, joins A's
    running rows (both report 2 questions decoded together) and both answer as they do alone. The
    model lock is taken between two of A's steps so that B is waiting when the next step comes; if A
    was already done by then (a loaded machine), the attempt is repeated."""
    server = make_server(base_model=str(sharp_model_dir), batch_wait_seconds=0, max_answer_tokens=64)
    client, scheduler = server.client, server.app.state.scheduler
    a = {"question": "Who approved the harbour bridge and when will it open?", "strategy": "none",
         "max_new_tokens": 64}
    b = {"question": "Which team won?", "strategy": "none", "max_new_tokens": 8}
    alone_a, alone_b = (client.post("/ask", json=body).json() for body in (a, b))
    joined = 0
    for _ in range(3):
        got_b: list = []
        with client.stream("POST", "/ask", json={**a, "stream": True}) as response:
            lines = response.iter_lines()
            next(line for line in lines if line.startswith("event: token"))
            with Held(server):  # A's next step waits for the lock
                thread = ask_in_thread(server.url, b, got_b)
                # B waits behind A's next step, or (A already done) was claimed and waits for the lock
                wait_for(lambda: scheduler.waiting == 1 or (scheduler.running == 1 and not scheduler._rows), 30,
                         "B to reach the scheduler")
            done = [json.loads(line[len("data: "):]) for line in lines if line.startswith("data: ")][-1]
        thread.join(timeout=60)
        answer_b = got_b[0].json()
        assert (done["answer"], answer_b["answer"]) == (alone_a["answer"], alone_b["answer"])
        if done["timings"]["batch_size"] == 2:
            assert answer_b["timings"]["batch_size"] == 2
            joined += 1
            break
    assert joined, "B never arrived while A was still decoding"
