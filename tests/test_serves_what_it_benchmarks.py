"""What is benchmarked is what is served: the same documents and questions through the harness's
method and through the live service over HTTP give the same answers (MAC memory, and the uniform
adapter updater), because both call the same code (``training.mac.runtime``, ``training.updates``,
``training.pipeline``)."""

from __future__ import annotations

import pytest

from tests.conftest import wait_ingested
from training.data.evalset import EvalSet
from training.eval.harness import ProtocolConfig, run_method
from training.methods import MethodConfig, MethodContext, build_method
from training.models import ModelSettings, load_causal_lm
from training.types import Document, Question

DOCS = [
    Document("s-1", "The council of Norvale approved the Saltmarsh Bridge on Tuesday; it will cost 42 million crowns."),
    Document("s-2", "Pelham Rovers beat Ashgrove United 3 to 1 in the Northern Cup final at Lindqvist Stadium."),
    Document("s-3", "Quorra Motors is recalling 27,000 electric scooters after battery fires in three cities."),
]
QUESTIONS = [
    Question("q1", "How much will the Saltmarsh Bridge cost?", ("42 million crowns",), ("s-1",)),
    Question("q2", "Which team did Pelham Rovers beat?", ("Ashgrove United",), ("s-2",)),
    Question("q3", "How many scooters is Quorra Motors recalling?", ("27,000",), ("s-3",)),
    Question("q4", "Where was the Northern Cup final played?", ("Lindqvist Stadium",), ("s-2",)),
]
MAX_NEW_TOKENS = 6


def harness_answers(model, tokenizer, name: str, config: MethodConfig) -> list[str]:
    run = run_method(build_method(name, MethodContext(model, tokenizer, config)),
                     EvalSet("equality", "test", DOCS, QUESTIONS),
                     ProtocolConfig(latency_samples=0, score_choices=False), progress=False)
    by_id = {r["id"]: r["prediction"] for r in run.predictions}
    return [by_id[q.id] for q in QUESTIONS]


def service_answers(client, strategy: str) -> list[dict]:
    posted = client.post("/documents", json={"documents": [{"id": d.id, "text": d.text} for d in DOCS]})
    assert posted.status_code == 202
    wait_ingested(client, [d.id for d in DOCS])
    return [client.post("/ask", json={"question": q.question, "strategy": strategy,
                                      "max_new_tokens": MAX_NEW_TOKENS}).json() for q in QUESTIONS]


def test_mac_answers_equal_through_the_harness_and_the_service(make_client, sharp_model_dir, mac_artifact_dir):
    tiny_model_dir = sharp_model_dir  # same config as the artifact's base: it loads
    model, tokenizer = load_causal_lm(str(tiny_model_dir), ModelSettings(base_model=str(tiny_model_dir), device="cpu"))
    config = MethodConfig(base_model=str(tiny_model_dir), mac_artifact=str(mac_artifact_dir),
                          max_new_tokens=MAX_NEW_TOKENS)
    expected = harness_answers(model, tokenizer, "mac", config)
    client = make_client(base_model=str(tiny_model_dir), mac_artifact=str(mac_artifact_dir))
    served = service_answers(client, "mac")
    assert all(s["strategy"] == "mac" and len(s["memory_documents"]) == 1 for s in served)
    assert [s["answer"] for s in served] == expected
    assert len(set(expected)) > 1  # not trivially equal


def test_uniform_updater_answers_equal_through_the_harness_and_the_service(make_client, sharp_model_dir):
    tiny_model_dir = sharp_model_dir
    model, tokenizer = load_causal_lm(str(tiny_model_dir), ModelSettings(base_model=str(tiny_model_dir), device="cpu"))
    lr = 0.05  # large enough that three steps change the tiny model's answers
    config = MethodConfig(base_model=str(tiny_model_dir), max_new_tokens=MAX_NEW_TOKENS, ft_lr=lr)
    untouched = harness_answers(model, tokenizer, "no_context", config)
    expected = harness_answers(model, tokenizer, "uniform_ft", config)
    assert expected != untouched  # the updates do change the answers
    client = make_client(base_model=str(tiny_model_dir), updater="uniform", adapter_lr=lr)
    served = service_answers(client, "adapter")
    assert len({s["adapter_version"] for s in served}) == 1 and served[0]["adapter_version"]
    versions = client.get("/adapters").json()["versions"]
    assert [v["kind"] for v in versions] == ["initial", "update", "update", "update"]  # one step per document
    assert [s["answer"] for s in served] == expected


@pytest.mark.real_model
def test_smollm2_mac_answers_equal_through_the_harness_and_the_service(make_client):
    """The shipped MAC artifact on SmolLM2 with the QA-format tuning: the service's defaults."""
    from service.core.config import Settings
    from service.runtime import load_base_model

    settings = Settings(_env_file=None)
    model, tokenizer = load_base_model(settings)
    config = MethodConfig(mac_artifact=str(settings.mac_artifact_path), max_new_tokens=MAX_NEW_TOKENS)
    expected = harness_answers(model, tokenizer, "mac", config)
    served = service_answers(make_client(), "mac")
    assert [s["answer"] for s in served] == expected
    assert sum("42 million" in a or "27,000" in a for a in expected) >= 1  # the real model reads its memory
