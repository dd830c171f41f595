"""Loaders on small fixtures written by the tests: squad-seq splits, RealTimeQA, news stream, JSONL."""

import gzip
import json

import pytest

from training.data import (
    EvalSet, load_jsonl_dataset, load_news_stream, load_realtimeqa, load_squad_seq,
    split_articles, write_jsonl_dataset,
)
from training.data.html_text import strip_html
from training.data.jsonl import DatasetFormatError


def squad_fixture(path, n_articles=10, paragraphs=3):
    data = []
    for a in range(n_articles):
        paras = []
        for p in range(paragraphs):
            context = f"Article {a} paragraph {p}: the answer is token{a}x{p}."
            start = context.index("token")
            paras.append({"context": context, "qas": [
                {"id": f"q{a}-{p}-{k}", "question": f"What is the answer in {a} {p} ({k})?",
                 "answers": [{"text": f"token{a}x{p}", "answer_start": start}] * 2}
                for k in range(2)
            ]})
        data.append({"title": f"Article_{a}", "paragraphs": paras})
    path.write_text(json.dumps({"version": "1.1", "data": data}))
    return path


def test_article_split_is_deterministic_disjoint_and_complete():
    titles = [f"t{i}" for i in range(48)]
    a = split_articles(titles, seed=0)
    b = split_articles(list(reversed(titles)), seed=0)  # file order must not matter
    assert a == b
    sets = [set(a.train), set(a.val), set(a.test)]
    assert sum(len(s) for s in sets) == 48 and set.union(*sets) == set(titles)
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert (len(a.train), len(a.val), len(a.test)) == (28, 10, 10)
    assert split_articles(titles, seed=1) != a


def test_squad_seq_keeps_articles_within_one_split(tmp_path):
    path = squad_fixture(tmp_path / "squad.json")
    splits = {s: load_squad_seq(path, s, seed=3) for s in ("train", "val", "test")}
    articles = {s: {d.id.split("/")[0] for d in e.documents} for s, e in splits.items()}
    assert not (articles["train"] & articles["val"] or articles["train"] & articles["test"]
                or articles["val"] & articles["test"])
    assert sum(len(e.documents) for e in splits.values()) == 30
    test = splits["test"]
    assert set(test.meta["articles"]) == articles["test"]
    # every question points at a document of the same split, and has deduplicated gold answers
    ids = {d.id for d in test.documents}
    assert all(q.doc_ids[0] in ids and len(q.answers) == 1 for q in test.questions)
    # questions follow the stream order of their paragraphs
    order = [d.id for d in test.documents]
    positions = [order.index(q.doc_ids[0]) for q in test.questions]
    assert positions == sorted(positions)
    again = load_squad_seq(path, "test", seed=3)
    assert [d.id for d in again.documents] == order


def test_subset_keeps_only_questions_about_streamed_documents(tmp_path):
    evalset = load_squad_seq(squad_fixture(tmp_path / "squad.json"), "train")
    sub = evalset.subset(max_documents=4)
    kept = {d.id for d in sub.documents}
    assert len(sub.documents) == 4 and len(sub.questions) == 8
    assert all(set(q.doc_ids) <= kept for q in sub.questions)
    assert len(evalset.subset(4, max_questions=3).questions) == 3


def rtqa_record(qid, date, evidence, answer="1"):
    return {"question_id": qid, "question_date": date, "question_source": "THE WEEK",
            "question_url": "https://example.org/quiz",
            "question_sentence": "Which city <b>hosted</b> the summit?",
            "choices": ["Paris", "Lima", "Oslo", "Rome"], "answer": [answer], "evidence": evidence}


def test_realtimeqa_strips_html_and_reads_answers(tmp_path):
    year = tmp_path / "2024"
    year.mkdir()
    shared = 'The summit was held in <a href="https://x.org">Lima</a>, Peru &amp; drew 40 leaders.'
    (year / "20240112_qa.jsonl").write_text("\n".join(json.dumps(r) for r in [
        rtqa_record("20240112_0", "2024/01/12", shared),
        rtqa_record("20240112_1", "2024/01/12", ""),  # no evidence: skipped
    ]))
    (year / "20240105_qa.jsonl").write_text(json.dumps(
        rtqa_record("20240105_0", "2024/01/05", "<p>Oslo&nbsp;won.</p><script>x()</script>", "2")))
    evalset = load_realtimeqa(year)
    assert [q.id for q in evalset.questions] == ["20240105_0", "20240112_0"]  # date order
    first, second = evalset.questions
    assert first.answers == ("Oslo",) and first.answer_index == 2 and first.date == "2024-01-05"
    assert second.question == "Which city hosted the summit?"
    assert second.choices == ("Paris", "Lima", "Oslo", "Rome") and second.answers == ("Lima",)
    doc = evalset.documents_by_id()[second.doc_ids[0]]
    assert doc.text == "The summit was held in Lima, Peru & drew 40 leaders."
    assert evalset.documents[0].text == "Oslo won."
    assert evalset.meta["skipped"]["no_evidence"] == 1


def test_strip_html_handles_blocks_and_entities():
    assert strip_html("<div>a</div><div>b&lt;c</div>") == "a b<c"


def test_news_stream_links_questions_to_articles(tmp_path):
    year = tmp_path / "2024"
    year.mkdir()
    (year / "20240105_qa.jsonl").write_text(json.dumps(rtqa_record("20240105_0", "2024/01/05", "")))
    articles = tmp_path / "articles.jsonl.gz"
    with gzip.open(articles, "wt") as f:
        for rec in [
            {"url": "u2", "title": "Later", "publish_date": "2024/01/04", "text": "Lima summit.",
             "question_ids": ["20240105_0"]},
            {"url": "u1", "title": "Earlier", "publish_date": "2024/01/02", "text": "Distractor.",
             "question_ids": []},
            {"url": "u3", "title": "Empty", "publish_date": "2024/01/03", "text": ""},
        ]:
            f.write(json.dumps(rec) + "\n")
    evalset = load_news_stream(articles, year)
    assert [d.id for d in evalset.documents] == ["u1", "u2"]  # sorted by date, empty text dropped
    assert evalset.documents[0].published_at == "2024-01-02"
    (q,) = evalset.questions  # linked even though the quiz record has no evidence paragraph
    assert q.doc_ids == ("u2",) and q.answers == ("Lima",)


def test_jsonl_round_trip_and_validation(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"type": "document", "id": "d1", "text": "Norvale opened 12 libraries.", "published_at": "2031-01-01"},
        {"type": "question", "id": "q1", "question": "How many libraries?", "answers": "12", "doc_ids": ["d1"]},
        {"type": "question", "id": "q2", "question": "Which town?", "answers": ["Norvale"],
         "doc_ids": ["d1"], "choices": ["Norvale", "Aurora"], "answer_index": 0},
    ]))
    evalset = load_jsonl_dataset(path)
    assert evalset.name == "mine" and len(evalset.documents) == 1
    assert evalset.questions[0].answers == ("12",)
    assert evalset.questions[1].choices == ("Norvale", "Aurora")
    copy = tmp_path / "copy.jsonl"
    write_jsonl_dataset(evalset, copy)
    again = load_jsonl_dataset(copy)
    assert again.documents == evalset.documents and again.questions == evalset.questions

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"type": "question", "id": "q", "question": "?", "answers": ["x"],
                               "doc_ids": ["missing"]}))
    with pytest.raises(DatasetFormatError, match="unknown documents"):
        load_jsonl_dataset(bad)
    bad.write_text(json.dumps({"type": "document", "text": "no id"}))
    with pytest.raises(DatasetFormatError, match="bad.jsonl:1"):
        load_jsonl_dataset(bad)


def test_evalset_questions_about():
    from training.types import Document, Question
    e = EvalSet("x", "y", [Document("a", "A"), Document("b", "B")],
                [Question("1", "?", ("A",), ("a",)), Question("2", "?", ("B",), ("a", "b")),
                 Question("3", "?", ("C",), ())])
    assert [q.id for q in e.questions_about({"a"})] == ["1"]
    assert [q.id for q in e.questions_about({"a", "b"})] == ["1", "2"]
