"""Training examples for the meta-learning recipes: paragraphs with the questions asked about them,
drawn as the streams the inner loop learns in sequence."""

from __future__ import annotations

import random

from training.data.evalset import EvalSet

Paragraph = tuple[str, list[tuple[str, str]]]  # (text, [(question, first gold answer)])


def paragraph_examples(evalset: EvalSet) -> list[Paragraph]:
    """(paragraph, [(question, first gold answer)]) for every paragraph that has questions."""
    by_doc: dict[str, list[tuple[str, str]]] = {}
    for q in evalset.questions:
        for doc_id in q.doc_ids:
            by_doc.setdefault(doc_id, []).append((q.question, q.answers[0]))
    return [(d.text, by_doc[d.id]) for d in evalset.documents if d.id in by_doc]


def stream_example(paragraphs: list[Paragraph], documents: int, questions_per_doc: int,
                   rng: random.Random) -> list[Paragraph]:
    """A training stream: ``documents`` random paragraphs in the order drawn (the squad-seq streams
    are shuffled across articles too), each with ``questions_per_doc`` of its questions."""
    picked = [paragraphs[rng.randrange(len(paragraphs))] for _ in range(documents)]
    return [(text, rng.sample(qas, min(questions_per_doc, len(qas)))) for text, qas in picked]


def held_out_streams(paragraphs: list[Paragraph], documents: int, questions_per_doc: int) -> list[list[Paragraph]]:
    """Validation streams: consecutive groups of ``documents`` paragraphs with their first
    questions, the same at every evaluation (at least one stream, shorter if there are few)."""
    groups = [paragraphs[i : i + documents] for i in range(0, len(paragraphs) - documents + 1, documents)]
    groups = groups or [paragraphs[:documents]]
    return [[(text, qas[:questions_per_doc]) for text, qas in group] for group in groups]
