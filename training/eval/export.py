"""Export the documents (and, unless ``--documents-only``, the questions) of one or more harness
streams to our JSONL format (``training.data.jsonl``), exactly as ``python -m training.eval`` builds
them: same loader, same ``--max-documents`` / ``--max-questions`` subset and seed. Why: the retrain
job reads a JSONL export (``--jsonl``), and measuring a retrained artifact on a stream means
retraining on that stream's documents.

    python -m training.eval.export --documents-only --out var/retrain/val-docs.jsonl \\
        --stream squad-seq:../shared/data/squad/dev-v1.1.json:val:64:120 \\
        --stream realtimeqa:../shared/data/realtimeqa/2023:2023:100:100

A stream is ``DATASET:PATH:SPLIT[:MAX_DOCUMENTS[:MAX_QUESTIONS]]``. With several streams, ids are
prefixed with the dataset name (``squad-seq/...``) so that two datasets' ids never collide; a
document that is still there twice is an error.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from training.data import EvalSet, write_jsonl_dataset
from training.eval.cli import DATASETS, load_dataset
from training.types import Document, Question


def parse_stream(spec: str) -> tuple[str, str, str, int | None, int | None]:
    """``DATASET:PATH:SPLIT[:MAX_DOCUMENTS[:MAX_QUESTIONS]]`` -> its parts (PATH may not hold ':')."""
    parts = spec.split(":")
    if len(parts) < 3 or len(parts) > 5 or parts[0] not in DATASETS:
        raise ValueError(f"--stream {spec!r}: expected DATASET:PATH:SPLIT[:MAX_DOCUMENTS[:MAX_QUESTIONS]] "
                         f"with DATASET one of {', '.join(DATASETS)}")
    limits = [int(x) if x else None for x in parts[3:]] + [None, None]
    return parts[0], parts[1], parts[2], limits[0], limits[1]


def _prefixed(evalset: EvalSet, prefix: str) -> EvalSet:
    docs = [replace(d, id=f"{prefix}/{d.id}") for d in evalset.documents]
    questions = [replace(q, id=f"{prefix}/{q.id}", doc_ids=tuple(f"{prefix}/{i}" for i in q.doc_ids))
                 for q in evalset.questions]
    return EvalSet(evalset.name, evalset.split, docs, questions, dict(evalset.meta))


def export(streams: list[str], seed: int = 0, documents_only: bool = False) -> EvalSet:
    """One ``EvalSet`` holding every stream's subset, in the order given."""
    docs: list[Document] = []
    questions: list[Question] = []
    for spec in streams:
        kind, path, split, max_documents, max_questions = parse_stream(spec)
        part = load_dataset(kind, path, split, seed).subset(max_documents, max_questions, seed=seed)
        if len(streams) > 1:
            part = _prefixed(part, kind)
        docs += part.documents
        questions += [] if documents_only else part.questions
    seen: set[str] = set()
    for d in docs:
        if d.id in seen:
            raise ValueError(f"document {d.id!r} is in the export twice (the same stream given twice?)")
        seen.add(d.id)
    return EvalSet("export", "all", docs, questions)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.eval.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--stream", action="append", required=True,
                   help="DATASET:PATH:SPLIT[:MAX_DOCUMENTS[:MAX_QUESTIONS]] (repeatable)")
    p.add_argument("--documents-only", action="store_true", help="no question lines (no labels in the export)")
    p.add_argument("--seed", type=int, default=0, help="the harness's --seed (squad-seq split, question sample)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    try:
        evalset = export(args.stream, args.seed, args.documents_only)
    except ValueError as exc:
        print(f"export: {exc}", file=sys.stderr)
        return 2
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_jsonl_dataset(evalset, args.out)
    print(f"{len(evalset.documents)} documents, {len(evalset.questions)} questions -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
