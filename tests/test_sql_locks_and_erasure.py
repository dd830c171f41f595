"""SQLite reads never wait for a writer (finding 3), and deleted text leaves the database files, on
SQLite and on PostgreSQL (finding 12)."""

import secrets
import sqlite3
import threading
import time

import pytest

from tests.conftest import wait_ingested


def test_reads_and_healthz_answer_while_another_connection_holds_the_write_lock(make_client, tiny_model_dir, tmp_path):
    """Acceptance 3: a writer holds SQLite's write lock (``BEGIN IMMEDIATE`` + a write) until every
    read below has answered. Reads used to take the write lock too: each waited out the 30 s busy
    timeout and answered 503."""
    data_dir = tmp_path / "var"
    client = make_client(base_model=str(tiny_model_dir), data_dir=data_dir)
    client.post("/documents", json={"documents": [{"id": "r-1", "text": "The council approved the bridge."}]})
    wait_ingested(client, ["r-1"])
    writer = sqlite3.connect(data_dir / "freshlm.db", isolation_level=None, timeout=30)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("UPDATE documents SET attempts = attempts WHERE id = 'r-1'")
    elapsed = {}
    try:
        for name, call in [("healthz", lambda: client.get("/healthz")),
                           ("get", lambda: client.get("/documents/r-1")),
                           ("list", lambda: client.get("/documents")),
                           ("adapters", lambda: client.get("/adapters")),
                           ("ask", lambda: client.post("/ask", json={"question": "Who approved the bridge?",
                                                                      "max_new_tokens": 2}))]:
            start = time.perf_counter()
            response = call()
            elapsed[name] = round(time.perf_counter() - start, 3)
            assert response.status_code == 200, (name, response.text)
        assert writer.in_transaction  # all answered while the writer still held the lock
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    print("seconds per read under a held write lock:", elapsed)


def test_a_write_waits_for_the_lock_and_then_succeeds(make_client, tiny_model_dir, tmp_path):
    data_dir = tmp_path / "var"
    client = make_client(base_model=str(tiny_model_dir), data_dir=data_dir)
    writer = sqlite3.connect(data_dir / "freshlm.db", isolation_level=None, timeout=30, check_same_thread=False)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("UPDATE tenants SET name = name")
    threading.Timer(1.0, lambda: (writer.execute("COMMIT"), writer.close())).start()
    response = client.post("/documents", json={"documents": [{"id": "w-1", "text": "News."}]})
    assert response.status_code == 202


def _canary_docs():
    short = f"CANARY-{secrets.token_hex(8)}"
    long = f"CANARYLONG-{secrets.token_hex(8)} " + secrets.token_hex(6000)  # overflow pages / TOAST, incompressible
    return short, long.split()[0], [{"id": "secret-1", "text": f"The {short} report is confidential."},
                                    {"id": "secret-2", "text": long},
                                    {"id": "keep", "text": "Public news stays."}]


def _occurrences(files, needles) -> dict:
    found = {}
    for path in files:
        if path.is_file():
            data = path.read_bytes()
            found[path.name] = sum(data.count(n.encode()) for n in needles)
    return found


def test_deleted_text_leaves_the_sqlite_files(make_client, tiny_model_dir, tmp_path):
    data_dir = tmp_path / "var"
    client = make_client(base_model=str(tiny_model_dir), data_dir=data_dir)
    short, long, docs = _canary_docs()
    client.post("/documents", json={"documents": docs})
    wait_ingested(client, [d["id"] for d in docs])
    files = [data_dir / f"freshlm.db{suffix}" for suffix in ("", "-wal", "-shm")]
    assert sum(_occurrences(files, [short, long]).values()) > 0  # the test would see the text
    for doc_id in ("secret-1", "secret-2"):
        assert client.delete(f"/documents/{doc_id}").status_code == 200
    assert _occurrences(files, [short, long]) == {f.name: 0 for f in files if f.is_file()}
    assert client.get("/documents/keep").json()["text"] == "Public news stays."


def test_deleted_text_leaves_the_postgresql_table(make_client, tiny_model_dir, postgres_server, postgres_url):
    """After the delete (which vacuums the table) no row version of the table or of its TOAST table
    holds the text, dead ones included (read with pageinspect). The bytes of a pruned version can
    stay in the page's free space until it is reused: ``VACUUM FULL`` rewrites the files, after
    which the files hold no trace (deploy/README.md, "Erasure")."""
    if isinstance(postgres_server, str):
        pytest.skip("needs the test's own PostgreSQL server (its data files)")
    import psycopg

    client = make_client(base_model=str(tiny_model_dir), database_url=postgres_url)
    short, long, docs = _canary_docs()
    client.post("/documents", json={"documents": docs})
    wait_ingested(client, [d["id"] for d in docs])
    dsn = postgres_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pageinspect")
        toast = conn.execute("SELECT reltoastrelid::regclass::text FROM pg_class WHERE relname = 'documents'").fetchone()[0]

        def row_versions(needle: str) -> int:
            """Tuples (live or dead) of the table and its TOAST table whose bytes hold ``needle``."""
            return sum(conn.execute(
                "SELECT count(*) FROM generate_series(0, pg_relation_size(%s::regclass) / 8192 - 1) AS page, "
                "heap_page_items(get_raw_page(%s, page::int)) WHERE position(%s::bytea IN t_data) > 0",
                (rel, rel, needle.encode())).fetchone()[0] for rel in ("documents", toast))

        def file_bytes(needle: str) -> int:
            conn.execute("CHECKPOINT")  # dirty pages to the files
            files = conn.execute("SELECT pg_relation_filepath('documents'), pg_relation_filepath(%s::regclass)",
                                 (toast,)).fetchone()
            return sum(_occurrences([postgres_server.root / "data" / f for f in files], [needle]).values())

        assert row_versions(short) >= 1 and row_versions(long[:40]) >= 1  # the check would see them
        for doc_id in ("secret-1", "secret-2"):
            assert client.delete(f"/documents/{doc_id}").status_code == 200
        assert row_versions(short) == 0 and row_versions(long[:40]) == 0
        print("bytes left in the files after the delete's vacuum:", file_bytes(short) + file_bytes(long))
        conn.execute("VACUUM FULL documents")
        assert file_bytes(short) == 0 and file_bytes(long) == 0
        assert client.get("/documents/keep").json()["text"] == "Public news stays."
