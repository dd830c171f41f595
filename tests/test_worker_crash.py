"""Crash safety of the ingest worker: ``kill -9`` in the middle of 200 documents, restart, and
every document ends ingested with exactly one memory entry and at most one adapter update."""

import os
import signal
import subprocess
import sys
from collections import Counter

import redis
from sqlalchemy import func, select

from service.adapters import store as adapter_store
from service.db import DEFAULT_TENANT, DocumentRecord, open_database
from training.mac.runtime import bank_name
from training.memory import RedisMemoryBank
from tests.conftest import REPO_ROOT, wait_for

N = 200


def _start_worker(env: dict, log_path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "service.worker"], cwd=REPO_ROOT, env=env,
                            stdout=open(log_path, "ab"), stderr=subprocess.STDOUT)


def test_kill_9_mid_ingest_loses_nothing_and_applies_nothing_twice(
    make_client, tiny_model_dir, mac_artifact_dir, redis_url, redis_client, tmp_path
):
    data_dir = tmp_path / "var"
    settings = dict(base_model=str(tiny_model_dir), mac_artifact=str(mac_artifact_dir), updater="uniform",
                    adapter_max_drift=10.0)
    client = make_client(data_dir=data_dir, embedded_worker=False, **settings)
    docs = [{"id": f"doc-{i:03d}", "text": f"Report {i}: the harbour board of town {i} approved plan {i * 7} "
             f"on day {i % 28 + 1}, with {i * 3} votes in favour. " * 4} for i in range(N)]
    for start in range(0, N, 50):
        assert client.post("/documents", json={"documents": docs[start:start + 50]}).status_code == 202

    env = {**os.environ, "FRESHLM_DATA_DIR": str(data_dir), "FRESHLM_REDIS_URL": redis_url,
           "FRESHLM_WORKER_ID": "crash-test", "FRESHLM_WORKER_BATCH": "4", "FRESHLM_LOG_JSON": "false",
           "OMP_NUM_THREADS": "1",  # tiny models: one thread is fastest on a shared 2-core machine
           **{f"FRESHLM_{k.upper()}": str(v) for k, v in settings.items()}}
    db = open_database(f"sqlite:///{(data_dir / 'freshlm.db').resolve()}")
    sessions = db.read

    def ingested() -> int:
        with sessions() as session:
            return int(session.scalar(select(func.count()).select_from(DocumentRecord)
                                      .where(DocumentRecord.status == "ingested")))

    worker = _start_worker(env, tmp_path / "worker.log")
    try:
        wait_for(lambda: ingested() >= 30, timeout=300, what="the worker to ingest 30 documents")
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=30)
        at_kill = ingested()
        assert at_kill < N, "the worker finished before it was killed: the crash was not mid-ingest"
        worker = _start_worker(env, tmp_path / "worker.log")
        wait_for(lambda: ingested() == N, timeout=600, what="all documents to be ingested after the restart")
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)

    # SQL: every document ingested once, none failed
    with sessions() as session:
        rows = list(session.scalars(select(DocumentRecord)))
        assert len(rows) == N and {r.status for r in rows} == {"ingested"}
        assert all(r.memory_written and r.claim_token is None for r in rows)
        active = adapter_store.active_version(session, DEFAULT_TENANT)
        chain = adapter_store.lineage(session, DEFAULT_TENANT, active)
    # Redis: exactly one entry per document, nothing else under the bank's hash tag
    bank = RedisMemoryBank(redis.Redis.from_url(redis_url), bank=bank_name(mac_artifact_dir))
    assert len(bank) == N and sorted(bank.ids()) == sorted(d["id"] for d in docs)
    keys = [k.decode() for k in redis_client.scan_iter(match=f"freshlm:{{{bank.bank}}}:*")]
    entries = [k for k in keys if ":m:" in k]
    assert len(entries) == N  # one entry per document, besides the id set, the keys hash and the change log
    assert sorted(set(keys) - set(entries)) == sorted(f"freshlm:{{{bank.bank}}}:{name}" for name in ("ids", "keys", "log"))
    # adapter: the live version's lineage holds each document's update at most once, and every
    # document either is in it or says why its update was rejected
    absorbed = Counter(doc for version in chain for doc in version.documents)
    assert absorbed and max(absorbed.values()) == 1
    rejected = {r.id for r in rows if r.adapter_version is None}
    assert set(absorbed) | rejected == {d["id"] for d in docs} and not set(absorbed) & rejected
    assert all(r.adapter_note for r in rows if r.id in rejected)
    assert chain[-1].kind == "initial" and len(chain) == len(absorbed) + 1
    db.dispose()
