"""What MAC's memory costs as it grows: ingest time, bytes per entry, ask latency and peak RSS
with 100 / 1,000 / 8,000 documents in the bank, reading every entry or a top-k pre-selection.

    python -m training.mac.bench --articles ../shared/data/realtimeqa/2024-articles.jsonl.gz \
        --artifact var/artifacts/mac --qa-tuning artifacts/qa-format/smollm2-135m-instruct \
        --sizes 100,1000,8000 --out docs/results/mac-memory-scaling.json

Documents are the 2024 news stream in publication order. ``--max-ingest`` caps how many are really
amortized (ingest is ~1-3 s per article on a shared CPU); beyond it the bank is filled with
copies of the real entries under new ids, which costs the same to read (cost does not depend on
content) but makes top-k retrieval quality meaningless, so only costs are reported. The copies
share storage in this process (an 8,000-article bank of ~3 MB entries would not fit in RAM
here); ``bank_mb`` is what a real bank holds.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path

import torch
from tqdm import tqdm

from training.data.news_stream import load_news_stream
from training.mac.runtime import MacReadConfig, MacRuntime, load_mac_runtime
from training.memory import InMemoryMemoryBank
from training.memory.base import EncodedEntry
from training.eval.metrics import percentile
from training.models import DEFAULT_BASE_MODEL, ModelSettings, load_causal_lm
from training.eval.resources import peak_rss_mb, reset_peak_rss
from training.types import Question

log = logging.getLogger(__name__)

class SharedCopiesBank(InMemoryMemoryBank):
    """An in-process bank whose entries are stored without copying (copies share storage)."""

    def put(self, doc_id: str, memory: torch.Tensor, key: torch.Tensor | None = None) -> None:
        self._memory[doc_id] = EncodedEntry("float16", tuple(memory.shape), {"memory": memory})  # as encode_entry stores it
        if key is not None:
            self._keys[doc_id] = key
            self.index.add([doc_id], key.float().numpy()[None])


MODES = {
    "all": MacReadConfig(top_k=None),
    "top_k4": MacReadConfig(top_k=4),
    "top_k32": MacReadConfig(top_k=32),
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--articles", required=True, help="2024-articles.jsonl.gz")
    parser.add_argument("--artifact", required=True)
    parser.add_argument("--base-model", default=DEFAULT_BASE_MODEL)
    parser.add_argument("--qa-tuning", help="QA-format LoRA artifact merged into the base model (as in training)")
    parser.add_argument("--sizes", default="100,1000,8000")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--max-ingest", type=int, default=1000, help="documents really amortized")
    parser.add_argument("--questions", type=int, default=10, help="asks timed per size and mode")
    parser.add_argument("--all-max", type=int, default=100, help="skip reading every entry above this size")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    stream = load_news_stream(args.articles)
    base, tokenizer = load_causal_lm(args.base_model, ModelSettings())
    if args.qa_tuning:
        from training.qa_tuning import apply_qa_tuning

        base = apply_qa_tuning(base, args.qa_tuning)
    bank = InMemoryMemoryBank()
    runtime = load_mac_runtime(args.artifact, base, tokenizer, bank, MODES["top_k4"])

    real = stream.documents[: min(args.max_ingest, max(sizes))]
    ingest_seconds = []
    for doc in tqdm(real, desc="ingest"):
        started = time.perf_counter()
        runtime.memorize([doc.id], [doc.text])
        ingest_seconds.append(time.perf_counter() - started)
    entry_bytes = [bank.nbytes(i) for i in bank.ids()]
    real_ids = bank.ids()
    questions = [Question(f"bench{i}", f"What happened to {d.title or 'the company'}?", ("",))
                 for i, d in enumerate(real[: args.questions])]
    results = {"articles": args.articles, "artifact": args.artifact, "base_model": args.base_model,
               "machine": f"{platform.machine()} {torch.get_num_threads()} torch threads",
               "ingested_for_real": len(real),
               "ingest_seconds_per_doc_p50": round(percentile(ingest_seconds, 50), 4),
               "ingest_seconds_per_doc_mean": round(sum(ingest_seconds) / len(ingest_seconds), 4),
               "memory_bytes_per_doc_mean": round(sum(entry_bytes) / len(entry_bytes), 1),
               "memory_bytes_per_doc_max": max(entry_bytes), "sizes": {}}
    key_ids, keys = bank.keys()
    key_of = dict(zip(key_ids, keys.half())) if keys is not None else {}
    memories = {i: bank.get([i])[0].half() for i in real_ids}  # the bank's fp16, one entry at a time
    bank.clear()  # the copies above are all the sized banks need: do not hold the entries twice
    for size in sizes:
        sized = SharedCopiesBank()
        for n in range(size):  # real entries first, then copies of them under new ids (cost only)
            src = real_ids[n % len(real_ids)]
            sized.put(src if n < len(real_ids) else f"copy{n}/{src}", memories[src], key_of.get(src))
        bank_ids = sized.ids()
        row = {"bank_mb": round(sum(sized.nbytes(i) for i in bank_ids) / 2**20, 1)}
        for mode in args.modes.split(","):
            if mode == "all" and size > args.all_max:
                continue
            runner = MacRuntime(runtime.mac, base, tokenizer, sized, MODES[mode])
            reset_peak_rss()
            before = peak_rss_mb()  # right after the reset the high-water mark is the current RSS
            latencies = []
            for q in tqdm(questions, desc=f"{size} {mode}", leave=False):
                started = time.perf_counter()
                runner.answer(base, [q.question], max_new_tokens=16)
                latencies.append(time.perf_counter() - started)
            row[mode] = {"ask_seconds_p50": round(percentile(latencies, 50), 3),
                         "ask_seconds_p95": round(percentile(latencies, 95), 3),
                         "peak_rss_mb": round(peak_rss_mb(), 1),
                         "peak_rss_increase_mb": round(peak_rss_mb() - before, 1)}
            log.info("%d documents, %s: %s", size, mode, row[mode])
        results["sizes"][str(size)] = row
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    log.info("wrote %s", args.out)
    return results


if __name__ == "__main__":
    main()
