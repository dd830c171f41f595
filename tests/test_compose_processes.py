"""docker-compose.yml's topology as plain processes on a real PostgreSQL and a real redis-server:
``python -m service.migrate`` (the one-shot), two API processes (``freshlm-serve``) and one
worker (``freshlm-worker``). Documents posted to one API are answered by the other; both stop
cleanly on SIGTERM."""

from __future__ import annotations

import httpx

from tests.conftest import _free_port, wait_for
from tests.test_deploy import Topology, topology_env

USER = {"Authorization": "Bearer user-key"}
ADMIN = {"Authorization": "Bearer op-key"}
DOCS = [{"id": f"news-{i}", "text": f"Bulletin {i}: the ferry from Norvale to Saltmarsh carried {200 + i} "
         f"passengers on day {i}, and the harbour master {name} signed the log."}
        for i, name in enumerate(["Ida Brandt", "Oskar Lind", "Mira Holm", "Ravi Sen", "Lea Wolff", "Tomas Berg"])]


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def start_topology(tmp_path, postgres_url, redis_url, tiny_model_dir, mac_artifact_dir) -> Topology:
    top = Topology(tmp_path, topology_env(tmp_path, postgres_url, redis_url, tiny_model_dir, mac_artifact_dir))
    migrate = top.run("migrate", ["-m", "service.migrate"])
    assert migrate.returncode == 0 and "database schema at revision" in top.log("migrate"), top.log("migrate")
    top.start("worker", ["-m", "service.worker"])
    top.start_api("api-1", _free_port())
    top.start_api("api-2", _free_port())
    for name, url in top.urls.items():
        wait_for(lambda: _ready(url) or top.procs[name].poll() is not None, timeout=180, what=f"{name} to be ready")
        assert top.procs[name].poll() is None, top.log(name)
    return top


def test_compose_topology_as_processes(tmp_path, postgres_url, redis_url, redis_client, tiny_model_dir,
                                       mac_artifact_dir):
    top = start_topology(tmp_path, postgres_url, redis_url, tiny_model_dir, mac_artifact_dir)
    try:
        one, two = (httpx.Client(base_url=top.urls[n], headers=USER, timeout=120) for n in ("api-1", "api-2"))
        assert one.post("/documents", json={"documents": DOCS}).status_code == 202
        wait_for(lambda: all(two.get(f"/documents/{d['id']}").json()["status"] == "ingested" for d in DOCS),
                 what="the worker process to ingest")
        ready = two.get("/readyz").json()
        assert ready["checks"]["worker"] == "external: run freshlm-worker" and ready["checks"]["schema"] == "ok"
        mac_id = ready["artifacts"]["mac"]["serving"]
        assert ready["artifacts"]["mac"]["loaded"] == mac_id
        answer = wait_for(lambda: (b := two.post("/ask", json={"question": "Which log did Ravi Sen sign?",
                                                                "strategy": "mac+rag", "max_new_tokens": 4}).json())
                          ["documents"] and b, what="the second API's index to catch up")
        assert answer["strategy"] == "mac+rag" and answer["documents"][0]["id"] == "news-3"
        assert len(answer["memory_documents"]) == 1
        assert one.get("/artifacts").json()["pointers"][0]["serving"] == mac_id
    finally:
        codes = top.stop()
    assert_clean_stop(top, codes)


def assert_clean_stop(top: Topology, codes: dict) -> None:
    """The worker exits 0 on SIGTERM; uvicorn shuts down (``Finished server process``) and then
    re-raises the signal, so an API's status is -15 after a clean shutdown."""
    assert codes["worker"] == 0, top.log("worker")[-2000:]
    for name in top.urls:
        assert codes[name] in (0, -15) and "Finished server process" in top.log(name), top.log(name)[-2000:]
