"""How much each way of storing MAC entries costs in answer likelihood, on a validation stream.

F1 on a few hundred questions moves by +-2 between storages that differ little; the gold answer's
NLL with the question's *own* entry read back from storage (``train.validate``'s ``nll_own``, no
retrieval, no generation) separates them with a paired standard error of ~0.01-0.03 nats. This is
how issue 16 chose ``k3v2`` on val before measuring F1 on test (docs/mac.md, "Issue 16").

Storages are bank storages (``float16``, ``int4``, ``k3v2``, ...) or KIVI specs written
``k<key bits>v<value bits>[-g<key group>/<value group>][-clip]`` (``k3v2-g32/32-clip``);
``--doc-slots`` writes the entries with other slot counts (one base-model pass per document and
count). Every figure is a paired difference against the first storage of the first slot count.

    python -m training.mac.storage_probe --dataset squad-seq --data ../shared/data/squad/dev-v1.1.json \\
        --split val --max-documents 64 --storages float16,int4,int2,k4v2,k3v2 --out var/results/probe.json
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

import torch
from tqdm import tqdm

from training.mac.aggregator import stack_memories
from training.mac.model import answer_nll, qa_batch
from training.mac.runtime import load_mac_runtime
from training.mac.val_probe import add_val_stream_arguments, load_val_stream
from training.memory import InMemoryMemoryBank, decode_entry, encode_entry
from training.memory.base import STORAGES
from training.memory.kivi import GROUP, KiviSpec, dequantize_kv, kivi_bytes, quantize_kv

SPEC = re.compile(r"k(\d)v(\d)(?:-g(\d+)/(\d+))?(-clip)?")


def store_and_read(spec: str):
    """``(entry -> entry as read back, chunk shape -> bytes)`` of a storage name or a KIVI spec."""
    if spec in STORAGES:
        return (lambda entry: decode_entry(encode_entry(entry, spec)),
                lambda shape: encode_entry(torch.zeros(shape), spec).nbytes())
    match = SPEC.fullmatch(spec)
    if match is None:
        raise ValueError(f"{spec!r}: a storage ({', '.join(STORAGES)}) or k<bits>v<bits>[-g<key>/<value>][-clip]")
    key_bits, value_bits, key_group, value_group, clip = match.groups()
    kivi = KiviSpec(int(key_bits), int(value_bits), int(key_group or GROUP), int(value_group or GROUP), bool(clip))
    return (lambda entry: dequantize_kv(*quantize_kv(entry, kivi), tuple(entry.shape), kivi),
            lambda shape: kivi_bytes(shape, kivi))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_val_stream_arguments(p)
    p.add_argument("--storages", required=True, help="comma-separated storages / KIVI specs (see above)")
    p.add_argument("--doc-slots", default="", help="comma-separated document slots per chunk (default: the artifact's)")
    p.add_argument("--slot-scores", default="h2o",
                   help="comma-separated slot choices: h2o (heavy hitters), kvzip (context reconstruction); see Amortizer")
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args(argv)
    storages = [s.strip() for s in args.storages.split(",") if s.strip()]
    codecs = {spec: store_and_read(spec) for spec in storages}  # bad specs fail before any model loads
    evalset, base, tokenizer, artifact = load_val_stream(args)
    runtime = load_mac_runtime(artifact, base, tokenizer, InMemoryMemoryBank())
    mac, head = runtime.mac, runtime.head
    questions = [q for q in evalset.questions if q.doc_ids]
    start = mac.start(head)
    batches = [questions[i : i + args.batch_size] for i in range(0, len(questions), args.batch_size)]
    tokens = [qa_batch(tokenizer, [q.question for q in b], [q.answers[0] for q in b], device=base.device, head=head)
              for b in batches]
    rows: dict[str, dict] = {}
    settings = [(slots, scores) for scores in args.slot_scores.split(",")
                for slots in [int(s) for s in args.doc_slots.split(",") if s.strip()] or [None]]
    for slots, scores in settings:
        with torch.no_grad():
            entries = {d.id: mac.memorize(base, tokenizer, head, [d.text], slots, scores)[0][0].cpu().float()
                       for d in tqdm(evalset.documents, desc=f"write (slots {slots or 'artifact'}, {scores})")}
        kept = slots or mac.config.doc_slots
        layers, _, kv_heads, _, head_dim = next(iter(entries.values())).shape
        chunk = (layers, 2, kv_heads, kept + mac.config.memory_tokens, head_dim)  # one full chunk
        for spec, (read_back, nbytes) in codecs.items():
            stored = {doc_id: read_back(entry) for doc_id, entry in entries.items()}  # once per document
            nll: list[float] = []
            with torch.no_grad():
                for batch, (ids, mask, labels) in zip(tqdm(batches, desc=spec), tokens):
                    memory, memory_mask = stack_memories([[stored[q.doc_ids[0]]] for q in batch], base.device)
                    nll += answer_nll(base, memory, ids, mask, labels, head=head, memory_mask=memory_mask,
                                      start=start).tolist()
            rows[f"{spec} s{kept} {scores}"] = {
                "storage": spec, "doc_slots": kept, "slot_scores": scores,
                "bytes_per_chunk": nbytes(chunk), "nll": statistics.mean(nll), "nlls": nll}
    reference = next(iter(rows.values()))["nlls"]
    print(f"| storage | doc slots | slot scores | bytes / chunk | answer NLL | vs {next(iter(rows))} |\n"
          "|---|---:|---|---:|---:|---:|")
    for name, row in rows.items():
        diff = [a - b for a, b in zip(row["nlls"], reference)]
        row["paired_diff"] = statistics.mean(diff)
        row["paired_se"] = statistics.stdev(diff) / len(diff) ** 0.5 if len(diff) > 1 else 0.0
        print(f"| `{row['storage']}` | {row['doc_slots']} | {row['slot_scores']} | {row['bytes_per_chunk']:,} | "
              f"{row['nll']:.4f} | "
              f"{row['paired_diff']:+.4f} +- {row['paired_se']:.4f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"dataset": args.dataset, "split": args.split, "n_documents":
                                          len(evalset.documents), "n_questions": len(questions),
                                          "artifact": str(artifact), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
