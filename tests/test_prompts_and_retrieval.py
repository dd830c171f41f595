import pytest

from training.prompts import extract_answer, qa_messages
from training.retrieval import BM25Index, split_passages
from training.types import Document


@pytest.mark.parametrize(
    "generated, expected",
    [
        ("Paris.", "Paris"),
        ("Answer: 42 million crowns.\nMore text", "42 million crowns"),
        ("The answer is: 18", "18"),
        ("the answer is 18", "18"),
        ("\n\n  Short answer - Ilse Brandvold", "Ilse Brandvold"),
        ("A dog barked.", "A dog barked"),
        ("", ""),
    ],
)
def test_extract_answer(generated, expected):
    assert extract_answer(generated) == expected


def test_qa_messages_put_passages_in_context():
    with_context = qa_messages("Who?", ["First passage.", "Second passage."])
    assert with_context[0]["role"] == "system"
    assert "[1] First passage." in with_context[1]["content"] and "[2] Second" in with_context[1]["content"]
    assert "Context" not in qa_messages("Who?")[1]["content"]


def test_bm25_ranks_the_matching_document_first():
    docs = [
        Document("bridge", "The council approved the harbour bridge."),
        Document("kelp", "Scientists harvested a record amount of kelp near the cape."),
        Document("kelp-2", "Kelp farming is growing."),
    ]
    index = BM25Index(docs)
    hits = index.search("record kelp harvest", k=3)
    assert hits[0].doc_id == "kelp" and all(h.score > 0 for h in hits)
    assert [h.doc_id for h in index.search("record kelp harvest", k=3, min_score_ratio=0.9)] == ["kelp"]
    assert index.search("the of and", k=3) == []  # stopwords only
    assert BM25Index([]).search("anything") == []


def test_long_documents_split_into_overlapping_passages():
    doc = Document("long", " ".join(f"w{i}" for i in range(300)))
    passages = split_passages(doc, max_words=120, overlap=30)
    assert len(passages) == 3 and all(p.doc_id == "long" for p in passages)
    assert passages[1].text.split()[0] == "w90"
    assert passages[-1].text.split()[-1] == "w299"
