"""Load run on loopback: N concurrent askers for a fixed time while documents are ingested.

Starts ``freshlm-serve`` (the embedded defaults unless FRESHLM_* variables say otherwise) in a
fresh data directory, loads the demo news, then for ``--seconds`` runs ``--askers`` threads that
POST /ask back to back (questions from examples/demo_questions.json) while a feeder thread POSTs
new documents. Reports errors, throughput, ask latency p50/p95/max and documents ingested, as
JSON on stdout and a Markdown row to paste into docs/BENCHMARKS.md.

    python deploy/load_run.py --askers 8 --seconds 60
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--askers", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--feed-batch", type=int, default=4, help="documents per POST of the feeder")
    parser.add_argument("--feed-interval", type=float, default=2.0, help="seconds between feeder POSTs")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--env", action="append", default=[], help="FRESHLM_X=value for the server (repeatable)")
    args = parser.parse_args()

    extra = dict(item.split("=", 1) for item in args.env)
    data_dir = Path(tempfile.mkdtemp(prefix="freshlm-load-"))
    port = free_port()
    server = start_server(data_dir, port, extra)
    base = f"http://127.0.0.1:{port}"
    documents = json.loads((ROOT / "examples" / "demo_news.json").read_text())["documents"]
    questions = [q["question"] for q in json.loads((ROOT / "examples" / "demo_questions.json").read_text())]
    try:
        with httpx.Client(base_url=base, timeout=600) as client:
            wait_ready(client, server, data_dir)
            client.post("/documents", json={"documents": documents}).raise_for_status()
            while client.get("/documents", params={"status": "pending"}).json()["total"]:
                time.sleep(0.5)
            client.post("/ask", json={"question": questions[0], "max_new_tokens": args.max_new_tokens})  # warm-up

        latencies: list[float] = []
        errors: list[str] = []
        fed: list[str] = []
        strategies: dict[str, int] = {}
        versions: set = set()
        stop = threading.Event()
        lock = threading.Lock()

        def asker(index: int) -> None:
            with httpx.Client(base_url=base, timeout=600) as own:
                i = index
                while not stop.is_set():
                    question = questions[i % len(questions)]
                    i += 1
                    start = time.perf_counter()
                    try:
                        response = own.post("/ask", json={"question": question, "strategy": args.strategy,
                                                          "max_new_tokens": args.max_new_tokens})
                        elapsed = time.perf_counter() - start
                        with lock:
                            if response.status_code == 200:
                                latencies.append(elapsed)
                                body = response.json()
                                strategies[body["strategy"]] = strategies.get(body["strategy"], 0) + 1
                                versions.add(body["adapter_version"])
                            else:
                                errors.append(f"{response.status_code}: {response.text[:200]}")
                    except httpx.HTTPError as exc:
                        with lock:
                            errors.append(f"{exc.__class__.__name__}: {exc}")

        def feeder() -> None:
            n = 0
            with httpx.Client(base_url=base, timeout=600) as own:
                while not stop.is_set():
                    batch = []
                    for _ in range(args.feed_batch):
                        src = documents[n % len(documents)]
                        batch.append({"id": f"load-{n:05d}", "title": src.get("title"),
                                      "text": f"Update {n}: {src['text']}"})
                        n += 1
                    response = own.post("/documents", json={"documents": batch})
                    with lock:
                        if response.status_code == 202:
                            fed.extend(d["id"] for d in batch)
                        else:
                            errors.append(f"POST /documents {response.status_code}: {response.text[:200]}")
                    stop.wait(args.feed_interval)

        threads = [threading.Thread(target=asker, args=(i,)) for i in range(args.askers)]
        threads.append(threading.Thread(target=feeder))
        began = time.monotonic()
        for t in threads:
            t.start()
        time.sleep(args.seconds)
        stop.set()
        for t in threads:
            t.join()
        wall = time.monotonic() - began  # includes the last in-flight requests
        with httpx.Client(base_url=base, timeout=60) as client:
            ingested = sum(1 for i in fed if client.get(f"/documents/{i}").json()["status"] == "ingested")
            metrics = client.get("/metrics").text
        result = {
            "askers": args.askers, "seconds": args.seconds, "wall_seconds": round(wall, 1),
            "asks_ok": len(latencies), "errors": len(errors), "error_samples": errors[:5],
            "throughput_asks_per_s": round(len(latencies) / wall, 3),
            "ask_p50_s": round(percentile(latencies, 0.5), 3), "ask_p95_s": round(percentile(latencies, 0.95), 3),
            "ask_max_s": round(max(latencies), 3) if latencies else None,
            "ask_mean_s": round(statistics.mean(latencies), 3) if latencies else None,
            "documents_posted": len(fed), "documents_ingested_by_end": ingested,
            "strategies": strategies, "adapter_versions_seen": len(versions - {None}),
            "server_env": extra, "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        }
        print(json.dumps(result, indent=2))
        queue = [line for line in metrics.splitlines() if line.startswith("freshlm_queue_depth")]
        print(f"# {queue}", file=sys.stderr)
    finally:
        stop_server(server)


if __name__ == "__main__":
    main()
