"""The embedded Redis is supervised (finding 13): killed, it is restarted and reaped (no zombie
child), /healthz recovers, and the worker refills the memory bank from SQL."""

import os
import signal
from pathlib import Path

from tests.conftest import wait_for, wait_ingested

DOCS = [{"id": f"r-{i}", "text": f"Report {i}: the harbour board approved plan {i}."} for i in range(3)]


def _zombie(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "State:\tZ" in status.read_text()


def test_a_killed_embedded_redis_is_restarted_and_the_bank_refilled(make_server, tiny_model_dir, mac_artifact_dir,
                                                                    tmp_path):
    server = make_server(base_model=str(tiny_model_dir), mac_artifact=str(mac_artifact_dir), redis_url=None,
                         data_dir=tmp_path / "var")
    client, runtime = server.client, server.app.state.runtime
    client.post("/documents", json={"documents": DOCS})
    wait_ingested(client, [d["id"] for d in DOCS])
    bank = runtime.mac_for("default").bank
    assert len(bank) == 3
    old = runtime.embedded_redis.process.pid
    runtime.redis.flushall()  # whatever the append-only file brings back, the bank must be refilled
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: runtime.embedded_redis.process.pid != old, timeout=60, what="the redis-server restart")
    assert not _zombie(old) and not Path(f"/proc/{old}").exists()  # reaped
    wait_for(lambda: client.get("/healthz").status_code == 200, timeout=60, what="/healthz to recover")
    wait_for(lambda: len(bank) == 3, timeout=120, what="the worker to refill the memory bank")
    body = client.post("/ask", json={"question": "Which plan did the harbour board approve?", "strategy": "mac",
                                     "max_new_tokens": 2}).json()
    assert body["strategy"] == "mac" and body["memory_documents"]
    assert runtime.embedded_redis.restarts == 1
