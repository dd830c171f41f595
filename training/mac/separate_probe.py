"""How to choose among a question's top-k entries read separately (``combine='separate'``), on a
validation stream: every candidate answer once, then the rule's F1 for each key weight and k.

Each question's top-k entries are read each alone (``MacRuntime.separate_candidates``, the
service's code), giving one candidate answer per entry with its mean token log-probability and
its entry's key cosine; a rule keeps the candidate with the highest ``mean_logprob + weight x
key_cosine`` among the first k. Decoding once and scoring every rule from the same candidates is
how issue 16 chose ``separate_key_weight`` and k on val (docs/mac.md, "Issue 16").

    python -m training.mac.separate_probe --dataset realtimeqa --data ../shared/data/realtimeqa/2023 \\
        --split 2023 --max-documents 100 --out var/results/separate-probe.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tqdm import tqdm

from training.eval.metrics import squad_scores
from training.mac.runtime import MacReadConfig, load_mac_runtime
from training.mac.val_probe import add_val_stream_arguments, load_val_stream
from training.memory import InMemoryMemoryBank
from training.memory.base import STORAGES

WEIGHTS = (0.0, 1.0, 2.0, 3.0, 5.0, 7.0, 10.0, 20.0, 50.0)


def rule_f1(records: list[dict], k: int, weight: float | None) -> float:
    """Mean F1 (x100) keeping, per question, the best of its first k candidates (``weight`` None:
    the first, i.e. top 1)."""
    total = 0.0
    for rec in records:
        cands = rec["candidates"][:k]
        best = cands[0] if weight is None else max(cands, key=lambda c: c["mean_logprob"] + weight * c["key_cosine"])
        total += best["f1"]
    return 100 * total / max(len(records), 1)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_val_stream_arguments(p)
    p.add_argument("--top-k", type=int, default=3, help="candidates per question (entries read)")
    p.add_argument("--storage", choices=STORAGES, default=MacReadConfig().storage)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=4, help="questions per batch (x top-k rows)")
    args = p.parse_args(argv)
    evalset, base, tokenizer, artifact = load_val_stream(args)
    config = MacReadConfig(top_k=args.top_k, storage=args.storage, combine="separate")
    runtime = load_mac_runtime(artifact, base, tokenizer, InMemoryMemoryBank(args.storage), config)
    for start in tqdm(range(0, len(evalset.documents), 8), desc="write"):
        docs = evalset.documents[start : start + 8]
        runtime.memorize([d.id for d in docs], [d.text for d in docs])
    questions = [q for q in evalset.questions if q.doc_ids]
    records = []
    for start in tqdm(range(0, len(questions), args.batch_size), desc="read"):
        batch = questions[start : start + args.batch_size]
        candidates, _ = runtime.separate_candidates(base, [q.question for q in batch],
                                                    max_new_tokens=args.max_new_tokens)
        for q, cands in zip(batch, candidates):
            records.append({"id": q.id, "gold_documents": list(q.doc_ids), "candidates": [
                {"answer": c.answer, "doc_id": c.doc_id, "mean_logprob": c.mean_logprob, "key_cosine": c.key_cosine,
                 "f1": squad_scores(c.answer, q.answers)["f1"]} for c in cands]})
    top1 = rule_f1(records, 1, None)
    rules = {f"k{k} w{w:g}": rule_f1(records, k, w) for k in range(2, args.top_k + 1) for w in WEIGHTS}
    oracle = 100 * sum(max(c["f1"] for c in r["candidates"]) for r in records) / max(len(records), 1)
    print(f"{len(records)} questions: top 1 {top1:.2f}, best of {args.top_k} (oracle) {oracle:.2f}")
    print("| rule | F1 | vs top 1 |\n|---|---:|---:|")
    for name, f1 in rules.items():
        print(f"| {name} | {f1:.2f} | {f1 - top1:+.2f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"dataset": args.dataset, "split": args.split, "storage": args.storage,
                                          "n_documents": len(evalset.documents), "n_questions": len(records),
                                          "artifact": str(artifact), "top1_f1": top1, "oracle_f1": oracle,
                                          "rules": rules, "records": records}, indent=1))


if __name__ == "__main__":
    main()
