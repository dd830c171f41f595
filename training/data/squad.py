"""SQuAD v1.1 as a document stream ("squad-seq"): paragraphs are documents, split by article.

Splitting by article (not by paragraph or question) keeps every article's paragraphs in one split,
so nothing learned from a training article leaks into validation or test.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from training.data.evalset import EvalSet
from training.types import Document, Question

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SquadSplits:
    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]

    def of(self, split: str) -> tuple[str, ...]:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
        return getattr(self, split)


def split_articles(
    titles: list[str], seed: int = 0, val_fraction: float = 0.2, test_fraction: float = 0.2
) -> SquadSplits:
    """Deterministic article split: sort the titles (file order must not matter), shuffle with
    ``seed``, then cut test, val and train in that order."""
    ordered = sorted(set(titles))
    random.Random(seed).shuffle(ordered)
    n_test = max(1, round(len(ordered) * test_fraction)) if len(ordered) >= 3 else 0
    n_val = max(1, round(len(ordered) * val_fraction)) if len(ordered) >= 3 else 0
    test, val, train = ordered[:n_test], ordered[n_test : n_test + n_val], ordered[n_test + n_val :]
    return SquadSplits(tuple(train), tuple(val), tuple(test))


def load_squad_seq(
    path: str | Path, split: str = "test", seed: int = 0, shuffle_paragraphs: bool = True
) -> EvalSet:
    """One split of a SQuAD v1.1 JSON file as an ``EvalSet``.

    The stream is the split's paragraphs, shuffled with ``seed`` (so a prefix of the stream spans
    several articles) unless ``shuffle_paragraphs`` is false. Each question keeps all its gold
    answers (dev has three) and points at its paragraph.
    """
    data = json.loads(Path(path).read_text(encoding="utf-8"))["data"]
    splits = split_articles([a["title"] for a in data], seed=seed)
    wanted = set(splits.of(split))
    documents: list[Document] = []
    questions_by_doc: dict[str, list[Question]] = {}
    for article in data:
        if article["title"] not in wanted:
            continue
        title = article["title"].replace("_", " ")
        for p_idx, paragraph in enumerate(article["paragraphs"]):
            doc_id = f"{article['title']}/{p_idx}"
            documents.append(Document(doc_id, paragraph["context"], title=title, source="squad"))
            questions_by_doc[doc_id] = [
                Question(
                    id=qa["id"],
                    question=qa["question"],
                    answers=tuple(dict.fromkeys(a["text"] for a in qa["answers"])),
                    doc_ids=(doc_id,),
                )
                for qa in paragraph["qas"]
            ]
    if shuffle_paragraphs:
        random.Random(seed).shuffle(documents)
    questions = [q for d in documents for q in questions_by_doc[d.id]]
    return EvalSet(
        "squad-seq", split, documents, questions,
        meta={"seed": seed, "articles": sorted(wanted), "source": str(path)},
    )
