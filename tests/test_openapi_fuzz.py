"""Schemathesis against the live service's OpenAPI (acceptance 2 of issue 19): at least 2,000
generated requests (valid and invalid ones) with every component deployed (MAC artifact, adapter
updater, worker) and API keys on, plus, for every third request with a JSON body, the same request
with an oversized body, a NaN in it and bytes that are not UTF-8. No 5xx; every response as
documented; every error in the documented shape ``{detail, type, request_id}`` with the request id
of its ``X-Request-ID`` header, as strict JSON; no reply larger than 64 KB.

``FRESHLM_FUZZ_SCALE`` multiplies the number of generated requests (the CI run is the default, 1;
docs/BENCHMARKS.md gives a larger run's figures)."""

import json
import math
import os
import time
from collections import Counter

import httpx
import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance, not_a_server_error, response_schema_conformance, status_code_conformance,
)

from service.core.config import Settings
from tests.conftest import LiveServer, wait_ingested

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
SCALE = float(os.environ.get("FRESHLM_FUZZ_SCALE", "1"))
PER_OPERATION = {GenerationMode.POSITIVE: math.ceil(100 * SCALE), GenerationMode.NEGATIVE: math.ceil(50 * SCALE)}
MAX_REPLY = 64 * 1024
MAX_BODY = 64 * 1024
AUTH = {"Authorization": "Bearer fuzz-operator"}


def reply_problems(status: int, request_id: str | None, content: bytes) -> list[str]:
    """What is wrong with a reply by the acceptance's rules (empty: nothing); ``request_id``: its
    X-Request-ID header."""
    problems = []
    if status >= 500:
        problems.append(f"server error {status}")
    if len(content) > MAX_REPLY:
        problems.append(f"reply of {len(content)} bytes")
    if status >= 400:
        try:
            body = json.loads(content, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
        except ValueError as exc:
            return problems + [f"error reply is not strict JSON: {exc}"]
        if not isinstance(body, dict) or set(body) != {"detail", "type", "request_id"}:
            problems.append(f"error shape {sorted(body) if isinstance(body, dict) else type(body)}")
        elif not body["request_id"] or body["request_id"] != request_id:
            problems.append("request id missing or not the X-Request-ID header")
    return problems


def variants(body) -> dict[str, bytes]:
    """The acceptance's extra cases for a JSON body: too large, NaN in it, not UTF-8."""
    raw = json.dumps(body).encode()
    with_nan = json.dumps({**body, "top_k": float("nan")} if isinstance(body, dict) else [body, float("nan")]).encode()
    not_utf8 = raw.replace(b'"', b'"\xff', 1) if b'"' in raw else b"\xff" + raw
    return {"oversized": b'{"documents": "' + b"x" * MAX_BODY + b'"}', "nan": with_nan, "not_utf8": not_utf8}


@pytest.fixture
def live_url(tmp_path, redis_url, redis_client, tiny_model_dir, mac_artifact_dir):
    settings = Settings(_env_file=None, data_dir=tmp_path / "var", redis_url=redis_url, log_json=False,
                        base_model=str(tiny_model_dir), mac_artifact=str(mac_artifact_dir), updater="uniform",
                        admin_api_keys=["fuzz-operator"], max_body_bytes=MAX_BODY)
    with LiveServer(settings) as server:
        yield server.url


def test_no_server_error_over_2000_generated_requests(live_url):
    started = time.monotonic()
    with httpx.Client(base_url=live_url, headers=AUTH, timeout=120) as client:  # data, so reads and asks find some
        client.post("/documents", json={"documents": [
            {"id": "seed-1", "text": "The council approved the harbour bridge on Tuesday."},
            {"id": "seed-2", "text": "Norvale opened 12 libraries in 2031."}]})
        wait_ingested(client, ["seed-1", "seed-2"])
    schema = schemathesis.openapi.from_url(f"{live_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15
    calls, failures = [], []
    raw = httpx.Client(base_url=live_url, headers=AUTH, timeout=120)
    for operation in operations:
        for mode, examples in PER_OPERATION.items():
            sent = [0]

            @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck), phases=[hypothesis.Phase.generate])
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case):
                response = case.call(base_url=live_url, headers=AUTH, timeout=120)
                calls.append((operation.label, response.status_code))
                request_id = (response.headers.get("x-request-id") or [None])[0]  # schemathesis: lists of values
                for problem in reply_problems(response.status_code, request_id, response.content):
                    failures.append(f"{operation.label} [{mode.value}] -> {problem}")
                try:
                    case.validate_response(response, checks=CHECKS)
                except Exception as exc:  # collect them all, report at the end
                    failures.append(f"{operation.label} [{mode.value}] -> {response.status_code}: {exc}")
                sent[0] += 1
                if isinstance(case.body, (dict, list)) and sent[0] % 3 == 0:
                    for name, content in variants(case.body).items():
                        reply = raw.request(case.method, case.formatted_path, params=case.query, content=content,
                                            headers={"content-type": "application/json"})
                        calls.append((f"{operation.label} [{name}]", reply.status_code))
                        if not 400 <= reply.status_code < 500:
                            failures.append(f"{operation.label} [{name}] -> {reply.status_code}, not a 4xx")
                        failures.extend(f"{operation.label} [{name}] -> {p}"
                                        for p in reply_problems(reply.status_code, reply.headers.get("x-request-id"),
                                                                reply.content))

            try:
                run()
            except hypothesis.errors.Unsatisfiable:  # no invalid request exists (e.g. GET /healthz)
                assert mode is GenerationMode.NEGATIVE, operation.label
    raw.close()
    statuses = Counter(s for _, s in calls)
    print(f"schemathesis: {len(calls)} requests in {time.monotonic() - started:.0f} s", dict(statuses),
          dict(Counter(o for o, _ in calls)))
    assert failures == [], "\n".join(failures[:20])
    assert len(calls) >= 2000 * min(SCALE, 1), len(calls)
    assert all(status < 500 for _, status in calls)
    # the run reached the handlers, not only the validation layer, and the extra cases were refused
    assert {200, 202} <= set(statuses) and {413, 422} <= set(statuses)
