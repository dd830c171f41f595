"""Dense and hybrid retrieval (``training.retrievers``): exact cosine top-k kept right through adds,
replacements and removes; reciprocal-rank fusion as defined; the harness methods ``rag_dense`` /
``rag_hybrid``; the service's ``FRESHLM_RETRIEVER``."""

import hashlib

import numpy as np
import pytest

from tests.conftest import wait_ingested
from training.methods import MethodConfig, MethodContext, build_method
from training.models import tiny_causal_lm
from training.retrieval import BM25Index, split_passages
from training.retrievers import RRF_K, DenseIndex, HybridIndex, encoder_embedder, make_retriever
from training.types import Document, Question


def bag_of_words(texts: list[str]) -> np.ndarray:
    """A deterministic test embedder: hashed word counts, L2-normalised (64 dimensions)."""
    out = np.zeros((len(texts), 64), dtype=np.float32)
    for row, text in enumerate(texts):
        for word in text.lower().replace(".", " ").replace("?", " ").split():
            out[row, int(hashlib.md5(word.encode()).hexdigest(), 16) % 64] += 1
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.maximum(norms, 1e-9)


DOCS = [
    Document("bridge", "The council approved the harbour bridge on Tuesday."),
    Document("kelp", "Scientists harvested a record amount of kelp near the cape."),
    Document("libraries", "In 2031 the city of Norvale opened 12 libraries and 3 museums."),
    Document("long", " ".join(f"w{i % 50} ferry" for i in range(200))),
]


def brute_force(docs: list[Document], query: str, k: int) -> list[tuple[str, str, float]]:
    passages = [p for d in docs for p in split_passages(d)]
    scores = bag_of_words([p.text for p in passages]) @ bag_of_words([query])[0]
    order = sorted(range(len(passages)), key=lambda i: -scores[i])[:k]
    return [(passages[i].doc_id, passages[i].text, round(float(scores[i]), 5)) for i in order]


def as_tuples(hits):
    return [(h.doc_id, h.text, round(h.score, 5)) for h in hits]


def test_dense_index_is_exact_cosine_top_k_through_adds_replacements_and_removes():
    index = DenseIndex(bag_of_words, DOCS)
    assert len(index) == sum(len(split_passages(d)) for d in DOCS)
    query = "record kelp harvest near the cape"
    assert index.search(query, k=1)[0].doc_id == "kelp"
    assert as_tuples(index.search(query, k=4)) == brute_force(DOCS, query, 4)
    index.remove(["kelp", "long"])
    replaced = Document("bridge", "A record kelp harvest was reported near the cape.")
    index.add([replaced, Document("new", "Ferries leave the cape at dawn.")], ["h1", "h2"])
    live = [DOCS[2], replaced, Document("new", "Ferries leave the cape at dawn.")]
    assert as_tuples(index.search(query, k=3)) == brute_force(live, query, 3)
    assert "kelp" not in index and index.documents()["bridge"] == "h1"
    assert len(index) == 3  # freed rows were reused, none leaks
    assert [h.doc_id for h in index.search(query, k=3, min_score_ratio=0.99)] == ["bridge"]
    assert DenseIndex(bag_of_words).search("anything") == []


def test_hybrid_index_fuses_the_two_rankings_by_reciprocal_rank():
    hybrid = HybridIndex(bag_of_words, DOCS)
    query = "Which city opened libraries and museums?"
    bm25 = BM25Index(DOCS).search(query, 100)
    dense = DenseIndex(bag_of_words, DOCS).search(query, 100)
    expected: dict[tuple[str, str], float] = {}
    for ranking in (bm25, dense):
        for rank, hit in enumerate(ranking, start=1):
            expected[(hit.doc_id, hit.text)] = expected.get((hit.doc_id, hit.text), 0) + 1 / (RRF_K + rank)
    hits = hybrid.search(query, k=3)
    assert hits[0].doc_id == "libraries" and hits[0].score == pytest.approx(2 / (RRF_K + 1))
    assert [h.score for h in hits] == pytest.approx(sorted(expected.values(), reverse=True)[:3])
    hybrid.remove(["libraries"])
    assert "libraries" not in {h.doc_id for h in hybrid.search(query, k=10)}
    assert len(hybrid) == len(hybrid.dense) == len(hybrid.bm25)


def test_make_retriever_needs_an_encoder_for_dense_and_knows_its_kinds():
    assert isinstance(make_retriever("bm25"), BM25Index)
    with pytest.raises(ValueError, match="encoder"):
        make_retriever("dense")
    with pytest.raises(ValueError, match="unknown retriever"):
        make_retriever("colbert", bag_of_words)


def test_encoder_embedder_gives_unit_vectors_and_finds_an_identical_text(one_torch_thread):
    from tests.mac_helpers import tiny_encoder

    embed = encoder_embedder(*tiny_encoder(), batch_size=2)
    vectors = embed([d.text for d in DOCS[:3]])
    assert vectors.shape == (3, 32) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    index = DenseIndex(embed, DOCS[:3])
    assert index.search(DOCS[1].text, k=1)[0].doc_id == "kelp"


@pytest.mark.parametrize("name", ["rag_dense", "rag_hybrid"])
def test_rag_dense_and_hybrid_methods_put_retrieved_passages_in_the_prompt(name, tiny_encoder_dir, one_torch_thread):
    model, tokenizer = tiny_causal_lm("llama")
    ctx = MethodContext(model, tokenizer, MethodConfig(max_new_tokens=3, rag_k=1, encoder=str(tiny_encoder_dir)))
    method = build_method(name, ctx)
    for doc in DOCS[:3]:
        method.ingest(doc)
    assert method.passages(Question("q", DOCS[2].text, ("12",))) == [DOCS[2].text]
    assert len(method.answer([Question("q", "How many libraries?", ("12",))])) == 1
    assert method.stored_bytes() == sum(len(d.text.encode()) for d in DOCS[:3])
    method.close()
    assert method.passages(Question("q", DOCS[2].text, ("12",))) is None


def test_the_service_retrieves_with_the_configured_dense_retriever(make_server, tiny_model_dir, tiny_encoder_dir):
    server = make_server(base_model=str(tiny_model_dir), retriever="dense", encoder=str(tiny_encoder_dir),
                         rag_min_score_ratio=0.0)
    docs = [{"id": d.id, "text": d.text} for d in DOCS[:3]]
    server.client.post("/documents", json={"documents": docs})
    wait_ingested(server.client, [d["id"] for d in docs])
    body = server.client.post("/ask", json={"question": DOCS[1].text, "strategy": "rag", "top_k": 2,
                                            "max_new_tokens": 2}).json()
    assert [d["id"] for d in body["documents"]][0] == "kelp" and len(body["documents"]) == 2
    assert body["documents"][0]["score"] == pytest.approx(1.0, abs=1e-4)  # the identical text: cosine 1
    server.client.delete("/documents/kelp")
    again = server.client.post("/ask", json={"question": DOCS[1].text, "strategy": "rag", "max_new_tokens": 2}).json()
    assert "kelp" not in {d["id"] for d in again["documents"]}
