"""The ingest queue's claims on SQLite and a real PostgreSQL server: leases, restarts, stale
workers, failures, and concurrent claimers that never get the same document."""

import threading

import pytest
from sqlalchemy import select

from service.db import DocumentRecord, make_engine, session_factory, utcnow
from service.documents import claim_batch, fail_attempt, finish, queue_depth, release_claims
from service.migrate import upgrade_database


@pytest.fixture(params=["sqlite", "postgresql"])
def sessions(request, tmp_path):
    url = f"sqlite:///{tmp_path / 'q.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    engine = make_engine(url)
    upgrade_database(engine)
    yield session_factory(engine)
    engine.dispose()


def _add(sessions, n: int) -> list[str]:
    ids = [f"d{i:03d}" for i in range(n)]
    with sessions.begin() as session:
        for i in ids:
            session.add(DocumentRecord(id=i, text=f"text {i}", content_hash=i, status="pending", created_at=utcnow()))
    return ids


def test_claim_then_finish_and_a_stale_token_cannot_finish(sessions):
    _add(sessions, 3)
    claim = claim_batch(sessions, "w1", limit=2, lease_seconds=60)
    assert [d.id for d in claim.documents] == ["d000", "d001"] and all(d.attempts == 1 for d in claim.documents)
    assert claim_batch(sessions, "w2", limit=5, lease_seconds=60).documents[0].id == "d002"  # only the free one
    with sessions.begin() as session:
        assert finish(session, "d000", claim.token) is True
        assert finish(session, "d001", "not-the-token") is False
        assert finish(session, "d000", claim.token) is False  # already ingested
    with sessions() as session:
        assert session.get(DocumentRecord, "d000").status == "ingested"
        assert session.get(DocumentRecord, "d001").status == "pending"
        assert queue_depth(session) == 2


def test_a_restarted_worker_releases_its_own_claims(sessions):
    _add(sessions, 2)
    claim_batch(sessions, "w1", limit=2, lease_seconds=3600)
    assert claim_batch(sessions, "w1", limit=2, lease_seconds=3600).documents == []
    assert release_claims(sessions, "w1") == 2
    again = claim_batch(sessions, "w1", limit=2, lease_seconds=3600)
    assert len(again.documents) == 2 and {d.attempts for d in again.documents} == {2}


def test_an_expired_lease_is_taken_over_and_the_old_worker_cannot_finish(sessions):
    _add(sessions, 1)
    dead = claim_batch(sessions, "w1", limit=1, lease_seconds=0)  # expired at once
    alive = claim_batch(sessions, "w2", limit=1, lease_seconds=3600)
    assert [d.id for d in alive.documents] == ["d000"] and alive.documents[0].claimed_by == "w2"
    with sessions.begin() as session:
        assert finish(session, "d000", dead.token) is False
        assert finish(session, "d000", alive.token) is True


def test_failures_are_retried_then_marked_failed_with_the_reason(sessions):
    _add(sessions, 1)
    for attempt in range(1, 4):
        claim = claim_batch(sessions, "w1", limit=1, lease_seconds=60)
        assert claim.documents[0].attempts == attempt
        fail_attempt(sessions, "d000", claim.token, f"ValueError: bad {attempt}", max_attempts=3)
    with sessions() as session:
        doc = session.get(DocumentRecord, "d000")
        assert doc.status == "failed" and doc.failure_reason == "ValueError: bad 3"
    assert claim_batch(sessions, "w1", limit=1, lease_seconds=60).documents == []


def test_concurrent_claimers_never_share_a_document(sessions):
    ids = _add(sessions, 120)
    got: dict[str, list[str]] = {}
    errors = []

    def claimer(name: str) -> None:
        try:
            mine = got.setdefault(name, [])
            while True:
                claim = claim_batch(sessions, name, limit=5, lease_seconds=3600)
                if not claim.documents:
                    return
                with sessions.begin() as session:
                    for doc in claim.documents:
                        assert finish(session, doc.id, claim.token)
                mine.extend(d.id for d in claim.documents)
        except Exception as exc:  # surfaced below
            errors.append(repr(exc))

    threads = [threading.Thread(target=claimer, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    claimed = [i for mine in got.values() for i in mine]
    assert sorted(claimed) == ids  # every document once, by exactly one claimer
    with sessions() as session:
        assert {d.attempts for d in session.scalars(select(DocumentRecord))} == {1}
