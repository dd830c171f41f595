"""The README walkthrough with the real SmolLM2 model: ingest the demo news, ask about it."""

import json
import re
import string

import pytest

from tests.conftest import REPO_ROOT, wait_ingested


def normalize(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


@pytest.mark.real_model
def test_demo_news_questions_are_answered_by_the_real_model(make_client):
    documents = json.loads((REPO_ROOT / "examples" / "demo_news.json").read_text())["documents"]
    questions = json.loads((REPO_ROOT / "examples" / "demo_questions.json").read_text())
    client = make_client()  # the embedded defaults: SmolLM2-135M-Instruct
    assert client.post("/documents", json={"documents": documents}).status_code == 202
    assert {r["status"] for r in wait_ingested(client, [d["id"] for d in documents])} == {"ingested"}
    readme_questions = {q["question"]: q for q in questions[:3]}
    for question, item in readme_questions.items():
        body = client.post("/ask", json={"question": question}).json()
        assert body["documents"][0]["id"] in item["doc_ids"], body
        assert any(normalize(gold) in normalize(body["answer"]) for gold in item["answers"]), body
