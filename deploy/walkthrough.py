"""The README walkthrough, run for real: start ``freshlm-serve`` on its embedded defaults in a fresh
data directory, post the demo news, ask every demo question and print each answer with whether it
contains a gold answer, then ``/readyz`` and the first question through each deployed component. The README's walkthrough is pasted from this output, so
it shows what the defaults answer today. With ``--strategies`` every question is asked through each
of them in turn instead (answers right and client-side ask p50 per strategy, from one server).

    python deploy/walkthrough.py [--env FRESHLM_STRATEGY=rag ...] [--strategies adapter,mac,rag]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from load_run import ROOT, free_port, start_server, stop_server, wait_ready


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--env", action="append", default=[], help="FRESHLM_X=value for the server (repeatable)")
    parser.add_argument("--strategies", default=None,
                        help="comma-separated: ask every question through each in turn and compare them")
    args = parser.parse_args()
    news = json.loads((ROOT / "examples" / "demo_news.json").read_text())
    questions = json.loads((ROOT / "examples" / "demo_questions.json").read_text())
    data_dir = Path(tempfile.mkdtemp(prefix="freshlm-walkthrough-"))
    port = free_port()
    server = start_server(data_dir, port, dict(item.split("=", 1) for item in args.env))
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300) as client:
            wait_ready(client, server, data_dir)
            client.post("/documents", json=news).raise_for_status()
            ids = [d["id"] for d in news["documents"]]
            while any(client.get(f"/documents/{i}").json()["status"] == "pending" for i in ids):
                time.sleep(0.5)
            if args.strategies:
                compare(client, questions, args.strategies.split(","))
                return
            right = 0
            for item in questions:
                reply = client.post("/ask", json={"question": item["question"]}).json()
                ok = is_right(reply["answer"], item)
                right += ok
                print(json.dumps({"question": item["question"], "answer": reply["answer"], "right": ok,
                                  "strategy": reply["strategy"], "documents": [d["id"] for d in reply["documents"]],
                                  "memory_documents": reply["memory_documents"]}))
            print(json.dumps({"right": right, "of": len(questions)}))
            ready = client.get("/readyz").json()
            print(json.dumps(ready))
            # the first question once more through each deployed component alone and all of them together
            strategies = ready["strategies"] + (["+".join(ready["strategies"])] if len(ready["strategies"]) > 1 else [])
            for strategy in strategies:
                print(json.dumps(client.post("/ask", json={"question": questions[0]["question"],
                                                           "strategy": strategy}).json()))
    finally:
        stop_server(server)


def is_right(answer: str, item: dict) -> bool:
    """The answer contains one of the demo question's gold answers (case aside)."""
    return any(gold.lower() in answer.lower() for gold in item["answers"])


def compare(client: httpx.Client, questions: list[dict], strategies: list[str]) -> None:
    """Each question through each strategy in turn (so load drifts alike for all): one line per
    answer, then per strategy the answers right and the client-side ask p50 / max in seconds."""
    seconds: dict[str, list[float]] = {s: [] for s in strategies}
    right = dict.fromkeys(strategies, 0)
    for item in questions:
        for strategy in strategies:
            start = time.perf_counter()
            reply = client.post("/ask", json={"question": item["question"], "strategy": strategy})
            seconds[strategy].append(time.perf_counter() - start)
            reply.raise_for_status()
            body = reply.json()
            ok = is_right(body["answer"], item)
            right[strategy] += ok
            print(json.dumps({"question": item["question"], "strategy": strategy, "answer": body["answer"], "right": ok,
                              "used": body["strategy"], "memory_documents": body["memory_documents"],
                              "update_documents": body.get("update_documents", [])}))
    print(json.dumps({s: {"right": right[s], "of": len(questions), "ask_p50_s": round(statistics.median(seconds[s]), 3),
                          "ask_max_s": round(max(seconds[s]), 3)} for s in strategies}))


if __name__ == "__main__":
    main()
