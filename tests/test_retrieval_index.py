"""The retrieval index is kept current where documents change, never inside an answer (finding 14:
the first /ask after any change rebuilt it, 1.4 s for one new small document)."""

from sqlalchemy import event

from tests.conftest import wait_for, wait_ingested


def _statements_during(engine, call):
    seen = []
    listener = lambda conn, cursor, statement, *args: seen.append(statement)  # noqa: E731
    event.listen(engine, "before_cursor_execute", listener)
    try:
        result = call()
    finally:
        event.remove(engine, "before_cursor_execute", listener)
    return result, seen


def test_an_answer_never_reads_the_corpus_nor_builds_the_index(make_server, tiny_model_dir):
    server = make_server(base_model=str(tiny_model_dir))
    client, engine = server.client, server.app.state.runtime.db.engine
    docs = [{"id": f"i-{n}", "text": f"Bulletin {n}: the ferry to Islay leaves at {n + 6} o'clock."} for n in range(5)]
    client.post("/documents", json={"documents": docs})
    wait_ingested(client, [d["id"] for d in docs])
    question = {"question": "When does the ferry to Islay leave?", "strategy": "rag", "max_new_tokens": 2}
    body, statements = _statements_during(engine, lambda: client.post("/ask", json=question).json())
    assert len(body["documents"]) >= 1  # found at once: indexed when it was ingested
    assert not [s for s in statements if "documents.text" in s]  # the answer read no document from SQL
    print("retrieve_seconds of the first answer after ingest:", body["timings"]["retrieve_seconds"])
    # a delete leaves retrieval at once, a re-post comes back when it is ingested
    client.delete("/documents/i-1")
    again = client.post("/ask", json={**question, "question": "Bulletin 1 ferry 7 o'clock?"}).json()
    assert "i-1" not in {d["id"] for d in again["documents"]}


def test_documents_ingested_by_another_process_reach_the_index(make_server, tiny_model_dir, tmp_path):
    """With a separate worker the API's index catches up in the background (FRESHLM_INDEX_REFRESH_SECONDS)."""
    data_dir = tmp_path / "var"
    api = make_server(base_model=str(tiny_model_dir), data_dir=data_dir, embedded_worker=False,
                      index_refresh_seconds=0.2)
    worker = make_server(base_model=str(tiny_model_dir), data_dir=data_dir)  # its embedded worker ingests
    api.client.post("/documents", json={"documents": [{"id": "far", "text": "The Islay ferry leaves at 9."}]})
    wait_ingested(worker.client, ["far"])
    wait_for(lambda: api.app.state.index.passages("default") == 1, what="the API's index to catch up")
    body = api.client.post("/ask", json={"question": "When does the Islay ferry leave?", "strategy": "rag",
                                         "max_new_tokens": 2}).json()
    assert [d["id"] for d in body["documents"]] == ["far"]
