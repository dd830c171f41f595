"""Serving benchmark on loopback: a headless locust run (``deploy/locustfile.py``) against
``freshlm-serve``, with a feeder posting documents, measuring issue 17's acceptance ratios in one
run:

1. throughput with 8 askers / with 1 asker (batching on), and 8 askers batching on / off
   (``FRESHLM_MAX_BATCH_ASKS=1``);
2. a lone asker: ``POST /ask`` latency / a direct call of ``training.pipeline.generate`` on the same
   question and passages in this process (alternating, per strategy), and whether the answers match;
3. streaming: time to first token p50 with 8 askers / the full-answer p50 of the unbatched run.

Each server starts in a fresh data directory (embedded defaults, real SmolLM2 on the CPU; MAC off
so the feeder's documents cost the worker only indexing), gets the demo news and an unmeasured warm-up phase of
``--askers`` (``--warmup-seconds``), then the phases run.
JSON on stdout (and ``--out``).

    python deploy/load_run.py --seconds 60 --out docs/results/serving-bench.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the direct generation calls run this checkout's code, like the servers


# what every benchmark server runs with besides the embedded defaults: MAC off (the feeder's documents
# then cost the worker only indexing) and a deadline no load phase reaches
SERVER_ENV = {"FRESHLM_MAC_ARTIFACT": "none", "FRESHLM_ASK_DEADLINE_SECONDS": "900"}


def demo_documents() -> list[dict]:
    return json.loads((ROOT / "examples" / "demo_news.json").read_text())["documents"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(data_dir: Path, port: int, extra_env: dict[str, str]) -> subprocess.Popen:
    env = {**os.environ, "FRESHLM_DATA_DIR": str(data_dir), "FRESHLM_PORT": str(port), **extra_env}
    log = open(data_dir / "server.log", "ab")
    return subprocess.Popen([sys.executable, "-c", "from service.main import run; run()"], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)


def wait_ready(client: httpx.Client, server: subprocess.Popen, data_dir: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if client.get("/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"server did not become ready; see {data_dir / 'server.log'}")
        time.sleep(0.5)


def stop_server(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.kill()


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def serve(extra_env: dict[str, str], documents: list[dict]) -> tuple[subprocess.Popen, str, Path]:
    """A ready server with the demo documents ingested."""
    data_dir = Path(tempfile.mkdtemp(prefix="freshlm-bench-"))
    port = free_port()
    server = start_server(data_dir, port, extra_env)
    base = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=base, timeout=600) as client:
        wait_ready(client, server, data_dir)
        client.post("/documents", json={"documents": documents}).raise_for_status()
        while client.get("/documents", params={"status": "pending"}).json()["total"]:
            time.sleep(0.5)
    return server, base, data_dir


def run_locust(base: str, askers: int, seconds: float, env: dict[str, str], out_dir: Path, name: str) -> dict:
    """One headless locust run: ``askers`` Asker users and one Feeder; the stats CSV as a dict."""
    prefix = out_dir / name
    load_before = load_average()
    command = [sys.executable, "-m", "locust", "-f", str(ROOT / "deploy" / "locustfile.py"), "--headless",
               "-u", str(askers + 1), "-r", str(askers + 1), "-t", f"{int(seconds)}s", "--stop-timeout", "90",
               "--host", base, "--csv", str(prefix), "--only-summary", "--loglevel", "WARNING"]
    subprocess.run(command, env={**os.environ, **env}, cwd=ROOT, check=False, stdout=subprocess.DEVNULL,
                   stderr=open(out_dir / f"{name}.log", "w"))
    rows = {}
    with open(f"{prefix}_stats.csv") as f:
        for row in csv.DictReader(f):
            rows[row["Name"]] = {"count": int(row["Request Count"]), "failures": int(row["Failure Count"]),
                                 "p50_s": float(row["50%"]) / 1000, "p95_s": float(row["95%"]) / 1000,
                                 "per_s": round(float(row["Requests/s"]), 4)}
    return {"askers": askers, "seconds": seconds, "load_average_before": load_before,
            "load_average_after": load_average(), "stats": rows}


def lone_asker_vs_direct(base: str, questions: list[str], strategies: list[str], max_new_tokens: int,
                         budget_seconds: float) -> dict:
    """Alternate ``POST /ask`` (client-side latency) with a direct ``training.pipeline.generate``
    call on the same question and the passages the answer used, in this process (the same model,
    QA tuning, precision and prefix cache as the server's defaults: both reuse the prompts' key/values from the
    second round of questions on); nothing else asks meanwhile."""
    from service.core.allocator import keep_freed_memory
    from service.core.config import Settings
    from service.runtime import load_base_model
    from training.pipeline import generate
    from training.precision import autocast
    from training.prefix_cache import PrefixCache

    settings = Settings(_env_file=None)  # FRESHLM_* as the servers got them
    if settings.keep_freed_memory:  # the server's allocator settings (service.core.allocator)
        keep_freed_memory()
    model, tokenizer = load_base_model(settings)
    config = settings.scheduler_config(model.device)
    cache = PrefixCache(config.prefix_cache)
    out: dict[str, dict] = {}
    per_strategy = budget_seconds / len(strategies)
    with httpx.Client(base_url=base, timeout=600) as client:
        for strategy in strategies:
            asks, directs, same = [], [], 0
            began = time.monotonic()
            for i in range(len(questions) * 4):
                if i >= 3 and time.monotonic() - began > per_strategy:
                    break
                question = questions[i % len(questions)]
                start = time.perf_counter()
                body = client.post("/ask", json={"question": question, "strategy": strategy,
                                                 "max_new_tokens": max_new_tokens}).raise_for_status().json()
                ask_seconds = time.perf_counter() - start
                passages = [d["passage"] for d in body["documents"]] or None
                start = time.perf_counter()
                with autocast(model.device, config.bf16):  # the server's precision (FRESHLM_CPU_BF16)
                    ((answer, *_),) = generate(model, tokenizer, [question], [passages], max_new_tokens,
                                               prefix_cache=cache)
                directs.append(time.perf_counter() - start)
                asks.append(ask_seconds)
                same += answer == body["answer"]
            ratios = [a / d for a, d in zip(asks, directs)]
            out[strategy] = {"pairs": len(asks), "ask_p50_s": round(statistics.median(asks), 3),
                             "direct_p50_s": round(statistics.median(directs), 3),
                             "ratio_of_p50": round(statistics.median(asks) / statistics.median(directs), 3),
                             "median_pair_ratio": round(statistics.median(ratios), 3), "same_answers": same}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="length of each locust phase")
    parser.add_argument("--askers", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--strategy", default="rag", help="strategy of the locust askers")
    parser.add_argument("--direct-strategies", default="rag,none", help="strategies of the lone-asker comparison")
    parser.add_argument("--direct-seconds", type=float, default=90.0, help="time budget of the lone-asker comparison")
    parser.add_argument("--feed-seconds", type=float, default=5.0, help="seconds between the feeder's documents")
    parser.add_argument("--warmup-seconds", type=float, default=60.0,
                        help="unmeasured locust phase of --askers on each server before its measured ones (0: none)")
    parser.add_argument("--env", action="append", default=[], help="FRESHLM_X=value for both servers (repeatable)")
    parser.add_argument("--out", type=Path, help="write the JSON here too")
    args = parser.parse_args()

    documents = demo_documents()
    questions = [q["question"] for q in json.loads((ROOT / "examples" / "demo_questions.json").read_text())]
    common = {**SERVER_ENV, **dict(item.split("=", 1) for item in args.env)}
    bench_env = {"BENCH_STRATEGY": args.strategy, "BENCH_MAX_NEW_TOKENS": str(args.max_new_tokens),
                 "BENCH_FEED_SECONDS": str(args.feed_seconds)}
    os.environ.update(common)  # the direct calls load the model as the servers do
    out_dir = Path(tempfile.mkdtemp(prefix="freshlm-locust-"))
    began = time.monotonic()
    result: dict = {"command": " ".join(sys.argv), "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                    f"Python {platform.python_version()}, torch threads {torch.get_num_threads()}",
                    "server_env": common, "locust_csv": str(out_dir)}

    def checkpoint() -> None:  # a run stopped midway keeps the phases it finished
        if args.out:
            args.out.write_text(json.dumps(result, indent=2) + "\n")

    def first_call(base: str) -> None:  # loads what the model's first call loads
        with httpx.Client(base_url=base, timeout=600) as client:
            client.post("/ask", json={"question": questions[0], "strategy": args.strategy, "max_new_tokens": 4})

    def warm_up(base: str, name: str) -> None:
        """A fresh server runs slower for its first minutes (caches, allocator): measured phases start warm."""
        if args.warmup_seconds > 0:
            result[f"warmup_{name}"] = run_locust(base, args.askers, args.warmup_seconds, bench_env, out_dir,
                                                  f"warmup-{name}")

    server, base, _ = serve({**common, "FRESHLM_MAX_BATCH_ASKS": str(args.askers)}, documents)
    try:
        first_call(base)
        # the lone-asker comparison first: both sides' prefix caches start from the same questions
        result["lone_asker_vs_direct"] = lone_asker_vs_direct(base, questions, args.direct_strategies.split(","),
                                                              args.max_new_tokens, args.direct_seconds)
        checkpoint()
        warm_up(base, "batching_on")
        result["batching_on_1_asker"] = run_locust(base, 1, args.seconds, bench_env, out_dir, "on-1")
        checkpoint()
        result["batching_on_8_askers"] = run_locust(base, args.askers, args.seconds, bench_env, out_dir, "on-8")
        checkpoint()
        result["batching_on_8_askers_streaming"] = run_locust(base, args.askers, args.seconds,
                                                              {**bench_env, "BENCH_STREAM": "1"}, out_dir, "on-8-stream")
        checkpoint()
        with httpx.Client(base_url=base, timeout=60) as client:
            result["metrics_batching_on"] = [line for line in client.get("/metrics").text.splitlines()
                                             if line.startswith(("freshlm_batch_size_sum", "freshlm_batch_size_count",
                                                                 "freshlm_time_to_first_token_seconds_sum",
                                                                 "freshlm_time_to_first_token_seconds_count",
                                                                 "freshlm_generation_tokens_total",
                                                                 "freshlm_prefix_cache_queries_total",
                                                                 "freshlm_prefix_cache_hits_total"))]
    finally:
        stop_server(server)
    server, base, _ = serve({**common, "FRESHLM_MAX_BATCH_ASKS": "1"}, documents)
    try:
        first_call(base)
        warm_up(base, "batching_off")
        result["batching_off_8_askers"] = run_locust(base, args.askers, args.seconds, bench_env, out_dir, "off-8")
    finally:
        stop_server(server)

    def entry(phase: str, name: str) -> dict | None:  # None: no request of that kind finished in the phase
        return result[phase]["stats"].get(name)

    def ratio(a: float | None, b: float | None, digits: int = 2) -> float | None:
        return round(a / b, digits) if a and b else None

    one, eight = entry("batching_on_1_asker", "/ask"), entry("batching_on_8_askers", "/ask")
    off, ttft = entry("batching_off_8_askers", "/ask"), entry("batching_on_8_askers_streaming", "ttft")
    result["acceptance"] = {
        "1_throughput_8_over_1": ratio(eight and eight["per_s"], one and one["per_s"]),
        "1_throughput_on_over_off_8": ratio(eight and eight["per_s"], off and off["per_s"]),
        "2_ask_over_direct_p50": {s: v["ratio_of_p50"] for s, v in result["lone_asker_vs_direct"].items()},
        "3_ttft_p50_over_unbatched_full_p50": ratio(ttft and ttft["p50_s"], off and off["p50_s"], 3),
    }
    result["wall_seconds"] = round(time.monotonic() - began, 1)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
