"""Worst-case /ask: the longest question the limits allow, ``top_k`` and ``max_new_tokens`` at their
caps, over the longest document the limits allow, against the service's own deadline.

Starts ``freshlm-serve`` (the embedded defaults unless ``--env`` says otherwise) in a fresh data
directory, reads its limits from ``/readyz`` (the open mode shows them), posts one document of
``FRESHLM_MAX_DOCUMENT_CHARS`` characters whose every passage matches the question (so retrieval
returns ``top_k`` full passages and the prompt is cut at ``FRESHLM_MAX_PROMPT_TOKENS``), and asks
``--repeat`` times with a question of ``FRESHLM_MAX_QUESTION_TOKENS`` tokens. The model may stop
before ``max_new_tokens``; ``--bound`` then also times the same call the service makes
(``training.pipeline.generate``, the QA-tuned base model, passages cut to the same prompt budget)
with every one of the ``max_new_tokens`` decoded. Prints the latencies, the deadline and the
machine's load as JSON, for docs/BENCHMARKS.md.

    python deploy/worst_case_ask.py --repeat 3 --bound
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import httpx
from load_run import ROOT, free_port, start_server, stop_server, wait_ready

WORDS = ("harbour bridge council budget vote mayor ferry museum library festival storm river school "
         "airline scooter robot owl kelp harvest record").split()


def longest_question(tokenizer, max_tokens: int, max_chars: int) -> str:
    """Words of the document, as many as fit the token and character limits."""
    words, n = [], 0
    while True:
        candidate = " ".join(words + [WORDS[n % len(WORDS)]]) + "?"
        if len(tokenizer(candidate, add_special_tokens=False)["input_ids"]) > max_tokens or len(candidate) > max_chars:
            return " ".join(words) + "?"
        words.append(WORDS[n % len(WORDS)])
        n += 1


def longest_document(max_chars: int) -> str:
    sentences, n = [], 0
    while sum(len(s) + 1 for s in sentences) < max_chars:
        sentences.append(f"Report {n}: the {WORDS[n % len(WORDS)]} and the {WORDS[(n * 7) % len(WORDS)]} "
                         f"of Norvale cost {n * 13 % 97} million crowns, the council said.")
        n += 1
    return " ".join(sentences)[:max_chars]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--bound", action="store_true", help="also time a full-length answer in this process")
    parser.add_argument("--env", action="append", default=[], help="FRESHLM_X=value for the server (repeatable)")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    sys.path.insert(0, str(ROOT))  # this checkout's training package, like the server it starts
    from training.models import ModelSettings, resolve_causal_lm_path

    extra = dict(item.split("=", 1) for item in args.env)
    data_dir = Path(tempfile.mkdtemp(prefix="freshlm-worst-"))
    port = free_port()
    server = start_server(data_dir, port, extra)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=900) as client:
            wait_ready(client, server, data_dir)
            ready = client.get("/readyz").json()
            limits, base_model = ready["configuration"]["limits"], ready["configuration"]["base_model"]
            tokenizer = AutoTokenizer.from_pretrained(resolve_causal_lm_path(base_model, ModelSettings().cache_dir))
            question = longest_question(tokenizer, limits["max_question_tokens"], limits["max_question_chars"])
            document = longest_document(limits["max_document_chars"])
            client.post("/documents", json={"documents": [{"id": "longest", "text": document}]}).raise_for_status()
            while client.get("/documents/longest").json()["status"] == "pending":
                time.sleep(0.5)
            client.post("/ask", json={"question": "Who said it?", "max_new_tokens": 2})  # warm-up
            body = {"question": question, "top_k": limits["max_top_k"], "max_new_tokens": limits["max_answer_tokens"]}
            runs, load_before = [], os.getloadavg()
            for _ in range(args.repeat):
                start = time.perf_counter()
                response = client.post("/ask", json=body)
                elapsed = time.perf_counter() - start
                reply = response.json()
                runs.append({"status": response.status_code, "seconds": round(elapsed, 2),
                             "passages": len(reply.get("documents", [])), "timings": reply.get("timings"),
                             "answer_chars": len(reply.get("answer", "")), "detail": reply.get("detail")})
            result = {
                "question_tokens": len(tokenizer(question, add_special_tokens=False)["input_ids"]),
                "question_chars": len(question), "document_chars": len(document), "top_k": body["top_k"],
                "max_new_tokens": body["max_new_tokens"], "max_prompt_tokens": limits["max_prompt_tokens"],
                "deadline_seconds": limits["ask_deadline_seconds"], "runs": runs,
                "max_seconds": max(r["seconds"] for r in runs),
                "within_deadline": all(r["status"] == 200 and r["seconds"] < limits["ask_deadline_seconds"] for r in runs),
                "load_average_before": [round(x, 2) for x in load_before],
                "load_average_after": [round(x, 2) for x in os.getloadavg()],
                "server_env": extra,
                "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
            }
    finally:
        stop_server(server)
    if args.bound:
        result["full_length_seconds"] = full_length_seconds(base_model, question, document, body, limits)
    print(json.dumps(result, indent=2))


def full_length_seconds(base_model: str, question: str, document: str, body: dict, limits: dict) -> float:
    """The service's generate call on the worst-case prompt, forced to decode every answer token."""
    from training.artifacts import shipped_artifact
    from training.models import load_causal_lm
    from training.pipeline import generate
    from training.qa_tuning import apply_qa_tuning
    from training.retrieval import BM25Index
    from training.types import Document

    model, tokenizer = load_causal_lm(base_model)
    tuning = shipped_artifact("qa-format", base_model)
    if tuning is not None:
        model = apply_qa_tuning(model, tuning)
    index = BM25Index([Document("longest", document)], max_chars=limits["rag_passage_chars"])
    passages = [p.text for p in index.search(question, k=body["top_k"])]
    start = time.perf_counter()
    generate(model, tokenizer, [question], [passages], body["max_new_tokens"],
             max_prompt_tokens=limits["max_prompt_tokens"], min_new_tokens=body["max_new_tokens"])
    return round(time.perf_counter() - start, 2)


if __name__ == "__main__":
    main()
