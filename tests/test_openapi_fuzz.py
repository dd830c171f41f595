"""Schemathesis against the live service's OpenAPI: no 5xx over at least 1,000 generated requests
(valid and invalid ones), with every component deployed (MAC artifact, adapter updater, worker),
and every status code, content type and body as documented."""

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

# operations without inputs yield one distinct request; the ones with inputs carry the volume
# no 5xx (the acceptance point), and every response is one the OpenAPI documents
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
PER_OPERATION = {GenerationMode.POSITIVE: 140, GenerationMode.NEGATIVE: 80}


@pytest.fixture
def live_url(tmp_path, redis_url, redis_client, tiny_model_dir, mac_artifact_dir):
    settings = Settings(_env_file=None, data_dir=tmp_path / "var", redis_url=redis_url, log_json=False,
                        base_model=str(tiny_model_dir), mac_artifact=str(mac_artifact_dir), updater="uniform")
    with LiveServer(settings) as server:
        yield server.url


def test_no_server_error_over_1000_generated_requests(live_url):
    import httpx

    with httpx.Client(base_url=live_url) as client:  # some data, so reads and asks find something
        client.post("/documents", json={"documents": [
            {"id": "seed-1", "text": "The council approved the harbour bridge on Tuesday."},
            {"id": "seed-2", "text": "Norvale opened 12 libraries in 2031."}]})
        wait_ingested(client, ["seed-1", "seed-2"])
    schema = schemathesis.openapi.from_url(f"{live_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    calls, failures = [], []
    for operation in operations:
        for mode, examples in PER_OPERATION.items():
            @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck), phases=[hypothesis.Phase.generate])
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case):
                response = case.call(base_url=live_url, timeout=120)
                calls.append((operation.label, response.status_code))
                try:
                    case.validate_response(response, checks=CHECKS)
                except Exception as exc:  # collect them all, report at the end
                    failures.append(f"{operation.label} [{mode.value}] -> {response.status_code}: {exc}")

            try:
                run()
            except hypothesis.errors.Unsatisfiable:  # no invalid request exists (e.g. GET /healthz)
                assert mode is GenerationMode.NEGATIVE, operation.label
    from collections import Counter

    print(f"schemathesis: {len(calls)} requests", dict(Counter(s for _, s in calls)), dict(Counter(o for o, _ in calls)))
    assert failures == [], "\n".join(failures[:20])
    assert len(calls) >= 1000, len(calls)
    assert all(status < 500 for _, status in calls)
    # the run reached the handlers, not only the validation layer
    assert {s for _, s in calls} & {200, 202} and 422 in {s for _, s in calls}
