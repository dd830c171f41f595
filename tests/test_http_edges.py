"""The service's HTTP edges (issue 19, findings 5, 6, 7, 10, 11 and 13): request ids on every error,
keys announced the standard way, no reflected Host header, connection limits tested with raw
sockets, probes that answer HEAD and keep their failure details for admins."""

import socket
import time

import pytest

from service.adapters import store
from service.db import DEFAULT_TENANT, open_database


def test_an_unexpected_error_is_a_500_with_the_request_id(make_server, tiny_model_dir, tmp_path):
    """A real failure: an adapter version whose weights file is corrupt breaks the answer."""
    data_dir = tmp_path / "var"
    server = make_server(base_model=str(tiny_model_dir), data_dir=data_dir)
    version = "0123456789abcdef0123"
    (data_dir / "adapters" / version).mkdir(parents=True)
    (data_dir / "adapters" / version / store.WEIGHTS).write_bytes(b"not a safetensors file")
    (data_dir / "adapters" / version / store.CONFIG).write_text('{"rank": 2}')
    db = open_database(f"sqlite:///{data_dir / 'freshlm.db'}")
    with db.write.begin() as session:
        store.record_version(session, DEFAULT_TENANT, version, parent=None, kind="update", documents=[], metrics={})
    db.dispose()
    assert server.client.post(f"/adapters/{version}/activate").status_code == 200
    response = server.client.post("/ask", json={"question": "q?", "strategy": "adapter", "max_new_tokens": 2},
                                  headers={"X-Request-ID": "trace-500"})
    assert response.status_code == 500
    assert response.json() == {"detail": response.json()["detail"], "type": "internal_error", "request_id": "trace-500"}
    assert response.headers["x-request-id"] == "trace-500"
    assert "/" not in response.json()["detail"]  # the class name, never a path or a message


def test_401_says_how_to_authenticate_and_the_schema_declares_it(make_client, tiny_model_dir):
    client = make_client(base_model=str(tiny_model_dir), api_keys=["user-key"])
    denied = client.get("/documents")
    assert denied.status_code == 401 and denied.headers["www-authenticate"].startswith("Bearer")
    schema = client.get("/openapi.json").json()
    schemes = schema["components"]["securitySchemes"]
    assert {s["type"] for s in schemes.values()} == {"http", "apiKey"}
    assert schema["paths"]["/documents"]["post"]["security"]
    assert "security" not in schema["paths"]["/healthz"]["get"]  # the probes stay open


def test_the_host_header_is_never_reflected(client):
    evil = {"Host": "evil.example"}
    response = client.post("/documents", json={"documents": [{"id": "h-1", "text": "News."}]}, headers=evil)
    assert response.status_code == 202 and "evil" not in response.text
    assert response.json()["documents"][0]["status_url"] == "/documents/h-1"
    slash = client.get("/documents/", headers=evil)
    assert "evil" not in slash.headers.get("location", "") and slash.status_code == 404


def test_rebuilding_the_adapter_without_an_updater_is_a_400(client):
    """Finding 5 (fixed on main before issue 19): nothing would run, so nothing is accepted."""
    response = client.post("/adapters/rebuild")
    assert response.status_code == 400 and "FRESHLM_UPDATER" in response.json()["detail"]


# --- finding 11: connection limits, with raw sockets ---------------------------------------------------


@pytest.fixture
def edge_server(make_server, tiny_model_dir):
    return make_server(base_model=str(tiny_model_dir), header_timeout_seconds=1, keep_alive_seconds=1,
                       max_header_bytes=4096)


def _connect(server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=15)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (or 15 s of silence: the socket timeout)."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return data + b"<still open>"
        if not chunk:
            return data
        data += chunk


def test_headers_that_trickle_in_get_408_and_the_connection_is_closed(edge_server):
    with _connect(edge_server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        started = time.monotonic()
        for _ in range(10):  # one byte every 0.3 s: slower than the 1 s deadline for the whole head
            time.sleep(0.3)
            try:
                sock.sendall(b"a")
            except OSError:
                break
        reply = _read_all(sock)
    print(f"slow headers: closed after {time.monotonic() - started:.1f} s")
    assert reply.startswith(b"HTTP/1.1 408") and not reply.endswith(b"<still open>")


def test_a_connection_that_sends_nothing_is_closed(edge_server):
    with _connect(edge_server) as sock:
        reply = _read_all(sock)
    assert not reply.endswith(b"<still open>")


def test_an_oversized_header_is_refused_with_431(edge_server):
    with _connect(edge_server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 1_000_000 + b"\r\n\r\n")
        reply = _read_all(sock)
    assert reply.startswith(b"HTTP/1.1 431") and not reply.endswith(b"<still open>")


def test_an_idle_kept_alive_connection_is_closed_and_normal_requests_work(edge_server):
    body = b'{"documents": [{"id": "k-1", "text": "' + b"y" * 50_000 + b'"}]}'  # a body larger than the head limit
    with _connect(edge_server) as sock:
        sock.sendall(b"POST /documents HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        reply = _read_all(sock)  # answered, then closed once the keep-alive second passes
    assert reply.startswith(b"HTTP/1.1 202") and not reply.endswith(b"<still open>")


# --- finding 13: probes ------------------------------------------------------------------------------------


def test_probes_answer_head(client):
    assert client.head("/healthz").status_code == 200 and client.head("/readyz").status_code == 200


def test_open_probes_do_not_show_why_a_check_fails_except_to_an_admin(make_client, tiny_model_dir, tmp_path):
    from service.redis_server import start_embedded_redis

    redis = start_embedded_redis(tmp_path / "gone", persist=False)
    client = make_client(base_model=str(tiny_model_dir), redis_url=redis.url, api_keys=["u"], admin_api_keys=["a"])
    redis.stop()
    anonymous = client.get("/healthz")
    assert anonymous.status_code == 503 and anonymous.json()["checks"]["redis"].startswith("error")
    assert str(tmp_path) not in anonymous.text and "Error" not in anonymous.text
    ready = client.get("/readyz")
    assert ready.status_code == 503 and str(tmp_path) not in ready.text and "configuration" not in ready.json()
    user = client.get("/readyz", headers={"X-API-Key": "u"})
    assert str(tmp_path) not in user.text
    admin = client.get("/healthz", headers={"X-API-Key": "a"})
    assert "redis.sock" in admin.json()["checks"]["redis"]  # the operator sees why
    assert "configuration" in client.get("/readyz", headers={"X-API-Key": "a"}).json()
