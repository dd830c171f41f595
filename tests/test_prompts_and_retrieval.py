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


def _bm25s_scores(passages: list[str], query: str) -> dict[int, float]:
    import bm25s

    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(passages, stopwords="en", show_progress=False), show_progress=False)
    indices, scores = retriever.retrieve(bm25s.tokenize([query], stopwords="en", show_progress=False),
                                         k=len(passages), show_progress=False)
    return {int(i): float(s) for i, s in zip(indices[0], scores[0]) if s > 0}


def test_the_incremental_index_scores_like_bm25s_after_adds_and_removes():
    """The index is updated in place (never rebuilt for one document), with bm25s's scores."""
    import random

    rng = random.Random(0)
    words = ["bridge", "council", "kelp", "harbour", "museum", "library", "vote", "record", "storm", "ferry",
             "mayor", "budget", "river", "school", "festival", "robot", "owl", "scooter", "airline", "heat"]
    docs = [Document(f"d{i}", " ".join(rng.choice(words) for _ in range(rng.randint(3, 40)))) for i in range(60)]
    index = BM25Index(docs[:40], max_words=10)
    index.add(docs[40:])
    index.remove([f"d{i}" for i in range(0, 60, 3)])
    index.add([Document("d5", "kelp kelp harbour storm")])  # replaced in place
    live = {d.id: d for d in docs if int(d.id[1:]) % 3}
    live["d5"] = Document("d5", "kelp kelp harbour storm")
    fresh = BM25Index(list(live.values()), max_words=10)
    passages = [p for d in live.values() for p in split_passages(d, max_words=10)]
    for query in ["kelp harbour", "bridge bridge council vote", "owl robot festival", "nothing matches zzz"]:
        hits = index.search(query, k=len(passages))
        expected = _bm25s_scores([p.text for p in passages], query)
        assert sorted(h.score for h in hits) == pytest.approx(sorted(expected.values()), rel=1e-5)
        assert [(h.doc_id, h.text, round(h.score, 4)) for h in hits] == \
            [(h.doc_id, h.text, round(h.score, 4)) for h in fresh.search(query, k=len(passages))]
    assert len(index) == len(passages) and "d0" not in index and "d5" in index


def test_a_word_longer_than_the_passage_limit_is_cut():
    doc = Document("wall", "x" * 5000)
    passages = split_passages(doc, max_words=120, max_chars=2000)
    assert [len(p.text) for p in passages] == [2000, 2000, 1000]


def test_passages_are_cut_to_the_prompt_budget(tiny_model_dir):
    from training.models import load_causal_lm
    from training.pipeline import PromptTooLong, fit_passages, prompt_length

    _, tokenizer = load_causal_lm(str(tiny_model_dir))
    question, passages = "Who approved the bridge?", ["The council approved it. " * 20, "Second passage. " * 20]
    alone = prompt_length(tokenizer, question, None)
    whole = prompt_length(tokenizer, question, passages[:1])
    assert fit_passages(tokenizer, question, passages, 10_000) == passages  # everything fits
    assert fit_passages(tokenizer, question, passages, whole) == passages[:1]  # the first whole, no room left
    cut = fit_passages(tokenizer, question, passages, (alone + whole) // 2)
    assert len(cut) == 1 and passages[0].startswith(cut[0]) and len(cut[0]) < len(passages[0])
    assert prompt_length(tokenizer, question, cut) <= (alone + whole) // 2
    with pytest.raises(PromptTooLong):
        fit_passages(tokenizer, question, passages, alone - 1)
