"""Shared fixtures: real redis-server and PostgreSQL processes, tiny saved models and artifacts,
a live HTTP server."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
import torch
import uvicorn

from service.core.config import Settings
from service.main import create_app
from service.redis_server import start_embedded_redis
from service.server import server_config
from tests.postgres_server import start_postgres
import training.methods.builtin  # noqa: F401  (registers every built-in method)
from training.models import tiny_causal_lm

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> Iterator[str]:
    """A real Redis: FRESHLM_TEST_REDIS_URL if set, else a private redis-server for this run."""
    url = os.environ.get("FRESHLM_TEST_REDIS_URL")
    if url:
        yield url
        return
    server = start_embedded_redis(tmp_path_factory.mktemp("redis"), persist=False)
    yield server.url
    server.stop()


@pytest.fixture
def redis_client(redis_url) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory):
    """A real PostgreSQL server for this run (FRESHLM_TEST_POSTGRES_URL: use that server instead)."""
    url = os.environ.get("FRESHLM_TEST_POSTGRES_URL")
    if url:
        yield url
        return
    server = start_postgres()
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres_server, request) -> str:
    """A new, empty database on the test server."""
    if isinstance(postgres_server, str):
        return postgres_server
    name = "t_" + "".join(c if c.isalnum() else "_" for c in request.node.name.lower())[:40] + f"_{time.monotonic_ns() % 10**9}"
    return postgres_server.create_database(name)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama-style model saved like any local checkpoint, usable as base_model."""
    path = tmp_path_factory.mktemp("tiny-llama")
    model, tokenizer = tiny_causal_lm("llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """Runs the app under uvicorn on a loopback port in a background thread, with the server
    settings ``freshlm-serve`` uses (``service.server``)."""

    def __init__(self, settings: Settings) -> None:
        self.port = _free_port()
        self.app = create_app(settings)
        config = server_config(self.app, settings, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the FreshLM server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture
def make_server(tmp_path, redis_url, redis_client) -> Iterator:
    """Start a live server with the given settings overrides; ``.client`` is an httpx client to it
    and ``.app`` the app (its state: runtime, index, answerer)."""
    stack: list[LiveServer] = []

    def factory(**overrides) -> LiveServer:
        settings = Settings(
            _env_file=None,
            **{"data_dir": tmp_path / "var", "redis_url": redis_url, "log_json": False, **overrides},
        )
        server = LiveServer(settings).__enter__()
        server.client = httpx.Client(base_url=server.url, timeout=300)
        stack.append(server)
        return server

    yield factory
    for server in stack:
        server.client.close()
        server.__exit__(None, None, None)


@pytest.fixture
def make_client(make_server):
    """Start a live server with the given settings overrides and return an httpx client to it."""
    return lambda **overrides: make_server(**overrides).client


@pytest.fixture
def client(make_client, tiny_model_dir) -> httpx.Client:
    return make_client(base_model=str(tiny_model_dir))


def wait_for(predicate, timeout: float = 120.0, what: str = "condition"):
    """Poll ``predicate`` until it returns something truthy (a deadline, not a timing assert)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def wait_ingested(client: httpx.Client, ids: list[str], timeout: float = 120.0) -> list[dict]:
    """Wait until every document left 'pending'; returns their records."""
    def done():
        records = [client.get(f"/documents/{i}").json() for i in ids]
        return records if all(r["status"] != "pending" for r in records) else None
    return wait_for(done, timeout, f"documents {ids[:3]}... to be ingested")


@pytest.fixture(scope="session")
def sharp_model_dir(tmp_path_factory):
    """The tiny random Llama with its weights scaled up: peaked next-token distributions, so greedy
    answers differ from question to question (at scale 1 every answer is empty) and any difference
    between two code paths shows."""
    import torch

    from training.models import tiny_causal_lm

    path = tmp_path_factory.mktemp("sharp-llama")
    model, tokenizer = tiny_causal_lm("llama")
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def mac_artifact_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A MAC artifact for the tiny Llama, written by the MAC code's own ``save_mac``."""
    from tests.mac_helpers import TINY_MAC, tiny_encoder
    from training.mac.model import MAC, save_mac
    from training.models import ModelSettings, load_causal_lm

    root = tmp_path_factory.mktemp("mac")
    base, _ = load_causal_lm(str(tiny_model_dir), ModelSettings(base_model=str(tiny_model_dir), device="cpu"))
    encoder, enc_tok = tiny_encoder()
    torch.manual_seed(0)
    mac = MAC(TINY_MAC, encoder, enc_tok, base.config)
    mac.amortizer.init_memory_tokens(base)
    encoder.save_pretrained(root / "encoder")
    enc_tok.save_pretrained(root / "encoder")
    save_mac(root / "artifact", mac, base_model=str(tiny_model_dir), base_config=base.config,
             encoder=str(root / "encoder"))
    return root / "artifact"


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory) -> Path:
    """A tiny random BERT-style sentence encoder saved like any local one (``FRESHLM_ENCODER``)."""
    from tests.mac_helpers import tiny_encoder

    path = tmp_path_factory.mktemp("tiny-encoder")
    encoder, tokenizer = tiny_encoder()
    encoder.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Tiny models run faster on one thread, and much faster on a shared, busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
