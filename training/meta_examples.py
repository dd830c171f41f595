"""Training examples for the meta-learning recipes: a paragraph with the questions asked about it."""

from __future__ import annotations

from training.data.evalset import EvalSet


def paragraph_examples(evalset: EvalSet) -> list[tuple[str, list[tuple[str, str]]]]:
    """(paragraph, [(question, first gold answer)]) for every paragraph that has questions."""
    by_doc: dict[str, list[tuple[str, str]]] = {}
    for q in evalset.questions:
        for doc_id in q.doc_ids:
            by_doc.setdefault(doc_id, []).append((q.question, q.answers[0]))
    return [(d.text, by_doc[d.id]) for d in evalset.documents if d.id in by_doc]
