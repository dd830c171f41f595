"""The README's first command, as a new user runs it: a fresh clone, default (relative) settings,
no redis-server or PostgreSQL on PATH. It must start, ingest the demo news, answer, and stop cleanly.

The clone reuses this test run's virtualenv (``FRESHLM_VENV``), so setup is a no-op and the test
takes seconds, not a reinstall; ``scripts/serve.sh`` then serves the clone's own code.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _path_without(binaries: tuple[str, ...]) -> str:
    """PATH minus every directory that holds one of ``binaries``."""
    keep = [d for d in os.environ.get("PATH", "").split(os.pathsep)
            if d and not any((Path(d) / b).exists() for b in binaries)]
    return os.pathsep.join(keep)


@pytest.mark.real_model
def test_readme_first_command_from_a_fresh_clone_without_redis_on_path(tmp_path):
    clone = tmp_path / "freshlm"
    subprocess.run(["git", "clone", "--quiet", str(REPO_ROOT), str(clone)], check=True)
    venv = Path(sys.prefix)
    fingerprint = hashlib.sha256((clone / "pyproject.toml").read_bytes()
                                 + (clone / "scripts" / "setup.sh").read_bytes()).hexdigest()
    stamps = {p.read_text().strip() for p in venv.glob(".freshlm-setup*")}
    if fingerprint not in stamps:  # setup would reinstall the shared venv from the clone: never do that
        pytest.fail("this venv was set up from another pyproject.toml / setup.sh than the committed ones: "
                    "commit them and run scripts/setup.sh dev again")

    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHLM_")}
    env.update(PATH=_path_without(("redis-server", "postgres", "initdb")), FRESHLM_VENV=str(venv),
               FRESHLM_PORT=str(port), FRESHLM_LOG_JSON="false")
    if os.environ.get("FRESHLM_CACHE_DIR"):
        env["FRESHLM_CACHE_DIR"] = os.environ["FRESHLM_CACHE_DIR"]
    assert shutil.which("redis-server", path=env["PATH"]) is None
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(["scripts/serve.sh"], cwd=clone, env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            deadline = time.monotonic() + 600
            while True:
                assert server.poll() is None, f"serve.sh exited: {(tmp_path / 'serve.log').read_text()[-3000:]}"
                try:
                    ready = client.get("/readyz")
                    if ready.status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "the service did not become ready"
                time.sleep(0.5)
            configured = ready.json()["configuration"]
            assert configured["qa_tuning"] and configured["mac_artifact"], configured  # the shipped defaults
            assert configured["serving"]["cpu_packed_linears"] > 0, configured  # fp32 on a CPU: packed for oneDNN
            news = json.loads((clone / "examples" / "demo_news.json").read_text())
            posted = client.post("/documents", json=news)
            assert posted.status_code == 202
            ids = [d["id"] for d in news["documents"]]
            deadline = time.monotonic() + 600
            while any(client.get(f"/documents/{i}").json()["status"] == "pending" for i in ids):
                assert time.monotonic() < deadline, "the demo news were not ingested"
                time.sleep(0.5)
            answer = client.post("/ask", json={"question": "How much will the Saltmarsh Bridge cost?"}).json()
            assert "42 million" in answer["answer"], answer
        data_dir = clone / "var"  # the default, relative to where the service was started
        assert (data_dir / "freshlm.db").is_file() and any((data_dir / "redis").glob("appendonly*"))
    finally:
        os.killpg(server.pid, signal.SIGINT)  # Ctrl-C in the terminal that runs it
        code = server.wait(timeout=120)
        log.close()
    assert code == 0, (tmp_path / "serve.log").read_text()[-3000:]
    assert not (clone / "var" / "redis" / "redis.sock").exists()  # the embedded redis-server stopped too
