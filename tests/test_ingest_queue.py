"""The ingest queue's claims on SQLite and a real PostgreSQL server: leases, restarts, stale
workers, failures, and concurrent claimers that never get the same document (of any tenant)."""

import threading

import pytest
from sqlalchemy import select

from service.db import DEFAULT_TENANT, DocumentRecord, open_database, utcnow
from service.documents import claim_batch, fail_attempt, finish, get, queue_depth, release_claims
from service.migrate import upgrade_database
from service.tenants import create_tenant


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path):
    url = f"sqlite:///{tmp_path / 'q.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    db = open_database(url)
    upgrade_database(db.engine)
    yield db
    db.dispose()


def _add(db, n: int, tenant: str = DEFAULT_TENANT) -> list[str]:
    ids = [f"d{i:03d}" for i in range(n)]
    with db.write.begin() as session:
        for i in ids:
            session.add(DocumentRecord(tenant_id=tenant, id=i, text=f"text {i}", content_hash=i, status="pending",
                                       created_at=utcnow()))
    return ids


def _doc(db, doc_id: str) -> DocumentRecord:
    with db.read() as session:
        return get(session, DEFAULT_TENANT, doc_id)


def test_claim_then_finish_and_a_stale_token_cannot_finish(db):
    _add(db, 3)
    claim = claim_batch(db.write, "w1", limit=2, lease_seconds=60)
    assert [d.id for d in claim.documents] == ["d000", "d001"] and all(d.attempts == 1 for d in claim.documents)
    assert claim_batch(db.write, "w2", limit=5, lease_seconds=60).documents[0].id == "d002"  # only the free one
    with db.write.begin() as session:
        assert finish(session, _doc(db, "d000"), claim.token) is True
        assert finish(session, _doc(db, "d001"), "not-the-token") is False
        assert finish(session, _doc(db, "d000"), claim.token) is False  # already ingested
    with db.read() as session:
        assert get(session, DEFAULT_TENANT, "d000").status == "ingested"
        assert get(session, DEFAULT_TENANT, "d001").status == "pending"
        assert queue_depth(session) == 2


def test_a_restarted_worker_releases_its_own_claims(db):
    _add(db, 2)
    claim_batch(db.write, "w1", limit=2, lease_seconds=3600)
    assert claim_batch(db.write, "w1", limit=2, lease_seconds=3600).documents == []
    assert release_claims(db.write, "w1") == 2
    again = claim_batch(db.write, "w1", limit=2, lease_seconds=3600)
    assert len(again.documents) == 2 and {d.attempts for d in again.documents} == {2}


def test_an_expired_lease_is_taken_over_and_the_old_worker_cannot_finish(db):
    _add(db, 1)
    dead = claim_batch(db.write, "w1", limit=1, lease_seconds=0)  # expired at once
    alive = claim_batch(db.write, "w2", limit=1, lease_seconds=3600)
    assert [d.id for d in alive.documents] == ["d000"] and alive.documents[0].claimed_by == "w2"
    with db.write.begin() as session:
        assert finish(session, _doc(db, "d000"), dead.token) is False
        assert finish(session, _doc(db, "d000"), alive.token) is True


def test_failures_are_retried_then_marked_failed_with_the_reason(db):
    _add(db, 1)
    for attempt in range(1, 4):
        claim = claim_batch(db.write, "w1", limit=1, lease_seconds=60)
        assert claim.documents[0].attempts == attempt
        fail_attempt(db.write, claim.documents[0], claim.token, f"ValueError: bad {attempt}", max_attempts=3)
    with db.read() as session:
        doc = get(session, DEFAULT_TENANT, "d000")
        assert doc.status == "failed" and doc.failure_reason == "ValueError: bad 3"
    assert claim_batch(db.write, "w1", limit=1, lease_seconds=60).documents == []


def test_concurrent_claimers_never_share_a_document(db):
    with db.write.begin() as session:
        create_tenant(session, "acme", None)
    ids = [(t, i) for t in (DEFAULT_TENANT, "acme") for i in _add(db, 60, t)]  # the same ids in two tenants
    got: dict[str, list[tuple[str, str]]] = {}
    errors = []

    def claimer(name: str) -> None:
        try:
            mine = got.setdefault(name, [])
            while True:
                claim = claim_batch(db.write, name, limit=5, lease_seconds=3600)
                if not claim.documents:
                    return
                with db.write.begin() as session:
                    for doc in claim.documents:
                        assert finish(session, doc, claim.token)
                mine.extend((d.tenant_id, d.id) for d in claim.documents)
        except Exception as exc:  # surfaced below
            errors.append(repr(exc))

    threads = [threading.Thread(target=claimer, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    claimed = [i for mine in got.values() for i in mine]
    assert sorted(claimed) == sorted(ids)  # every document once, by exactly one claimer
    with db.read() as session:
        assert {d.attempts for d in session.scalars(select(DocumentRecord))} == {1}
