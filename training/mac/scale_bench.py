"""Memory-scaling benchmark of the Redis bank: bytes per entry for each storage (exact and as Redis
holds them), and the time a question's memory read takes (top-k by key, then the k entries read and
decoded) with 1,000 to 100,000 entries in the bank, with the in-process key index against reading
every key per question (the bank before issue 16).

    redis-server --port 6390 --save '' --appendonly no --daemonize yes
    python -m training.mac.scale_bench --redis-url redis://localhost:6390/15 \\
        --sizes 1000,10000,100000 --out docs/results/mac-memory-scaling-issue16.json

Entries are synthetic: random values of a real entry's shape (SmolLM2: 30 layers x 3 KV heads x 64,
56 slots per 256-token chunk) and random unit keys (384-d, MiniLM's width); read costs do not depend
on the content. The reads run in a fresh process per bank size (``read_phase``), as an API
process reads a bank the worker wrote, so its RSS is the reader's alone. Wall-clock times are
inflated on a contended machine; ``*_cpu_seconds`` is the reader's CPU time (Redis's own work is
not in it). A bank of N entries holds N keys (ids, keys hash, change log: what a question's
top-k searches) but full-size entries only for a pool of ``--pool`` of them (100,000 fp16 entries
would be 129 GB of Redis); each question's key is the normalised sum of ``top_k`` pool keys, so its
top k are pool entries and every entry read is full size. Uses Redis database ``--redis-url`` and
flushes it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import redis
import torch

from training.eval.metrics import percentile
from training.eval.resources import peak_rss_mb
from training.mac.aggregator import select_top_k, stack_memories
from training.memory import STORAGES, RedisMemoryBank
from training.memory.base import KIVI_SPECS
from training.memory.kivi import kivi_bytes


def current_rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def exact_bytes(storage: str, shape: tuple[int, ...]) -> int:
    """Stored payload bytes of one entry (without its 768-byte key)."""
    n = int(np.prod(shape))
    if storage == "float16":
        return 2 * n
    if storage == "int8":
        return n + 2 * n // shape[-1]
    return kivi_bytes(shape, KIVI_SPECS[storage])


def unit_keys(n: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    keys = rng.standard_normal((n, dim), dtype=np.float32)
    return keys / np.linalg.norm(keys, axis=1, keepdims=True)


def fill_keys_only(client: redis.Redis, bank: RedisMemoryBank, ids: list[str], keys: np.ndarray) -> None:
    """Ids and keys of entries that are never read (the bank's layout, written in bulk)."""
    base = bank._base  # noqa: SLF001 -- the bench writes the bank's own layout, see redis_bank.py
    for start in range(0, len(ids), 2000):
        with client.pipeline(transaction=False) as pipe:
            part = ids[start : start + 2000]
            pipe.sadd(f"{base}:ids", *part)
            pipe.hset(f"{base}:keys", mapping={i: keys[start + j].astype(np.float16).tobytes()
                                               for j, i in enumerate(part)})
            for doc_id in part:
                pipe.xadd(f"{base}:log", {"op": "put", "id": doc_id}, maxlen=100_000, approximate=True)
            pipe.execute()


def read_phase(redis_url: str, storage: str, top_k: int, threads: int, queries: list[torch.Tensor],
               every_key: bool) -> dict:
    """One reader process's view of the bank (run in a fresh process, as an API process reads it):
    its RSS before the index loads, the load, the reads, and its RSS after them. The process that
    wrote the bank is not measured: in the service that is the worker."""
    torch.set_num_threads(threads)
    reader = RedisMemoryBank(redis.Redis.from_url(redis_url), bank="scale", storage=storage)
    reader.get(["pool-0"])  # connection and decoding paths warm before the baseline
    row: dict = {"process_rss_mb_before_index": round(current_rss_mb(), 1)}
    started = time.perf_counter()
    reader.sync_index()
    row["index_load_seconds"] = round(time.perf_counter() - started, 3)
    row["index_mb"] = round(reader.index.nbytes() / 2**20, 1)
    timings, cpu, search_cpu, full_size = [], [], [], 0
    for q in queries:
        started, started_cpu = time.perf_counter(), time.process_time()
        ids = reader.search(q, top_k)
        search_cpu.append(time.process_time() - started_cpu)
        entries = reader.get(ids)
        stack_memories([[e for e in entries if e is not None]], "cpu")
        timings.append(time.perf_counter() - started)
        cpu.append(time.process_time() - started_cpu)
        full_size += sum(i.startswith("pool-") for i in ids)
    row["indexed"] = {"read_seconds_p50": round(percentile(timings, 50), 4),
                      "read_seconds_p95": round(percentile(timings, 95), 4),
                      "read_cpu_seconds_p50": round(percentile(cpu, 50), 4),
                      "search_cpu_seconds_p50": round(percentile(search_cpu, 50), 5),
                      "entries_read_full_size": f"{full_size}/{top_k * len(queries)}"}
    row["process_rss_mb"] = round(current_rss_mb(), 1)
    row["process_peak_rss_mb"] = round(peak_rss_mb(), 1)
    if every_key:  # the bank before issue 16: every key read per question (after the RSS figures)
        timings, cpu = [], []
        for q in queries[:10]:
            started, started_cpu = time.perf_counter(), time.process_time()
            ids, keys = reader.keys()
            chosen = select_top_k(q, ids, keys, top_k)
            stack_memories([[e for e in reader.get(chosen) if e is not None]], "cpu")
            timings.append(time.perf_counter() - started)
            cpu.append(time.process_time() - started_cpu)
        row["every_key_per_question"] = {"read_seconds_p50": round(percentile(timings, 50), 4),
                                         "read_cpu_seconds_p50": round(percentile(cpu, 50), 4)}
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url", required=True, help="a Redis database this bench may flush")
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--storage", default="float16", choices=STORAGES, help="storage of the read timings")
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--questions", type=int, default=50)
    parser.add_argument("--pool", type=int, default=64, help="full-size entries stored")
    parser.add_argument("--all-keys-max", type=int, default=10000,
                        help="largest bank read the old way (every key per question)")
    parser.add_argument("--shape", default="30,2,3,56,64", help="entry shape: layers,2,kv_heads,slots,head_dim")
    parser.add_argument("--key-dim", type=int, default=384)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shape = tuple(int(s) for s in args.shape.split(","))
    rng = np.random.default_rng(0)
    client = redis.Redis.from_url(args.redis_url)
    client.flushdb()
    results: dict = {"command": "python -m training.mac.scale_bench " + " ".join(argv if argv is not None else sys.argv[1:]),
                     "machine": f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} torch thread(s)",
                     "redis": client.info("server")["redis_version"], "entry_shape": shape, "storage": {}, "sizes": {}}

    # bytes per entry, per storage: exact arithmetic against what Redis holds
    entry = torch.randn(shape)
    key = torch.from_numpy(unit_keys(1, args.key_dim, rng)[0])
    for storage in STORAGES:
        bank = RedisMemoryBank(client, bank=f"bytes-{storage}", storage=storage)
        bank.put("doc", entry, key=key)
        stored = bank.nbytes("doc")
        usage = client.memory_usage(f"freshlm:{{bytes-{storage}}}:m:doc", samples=0)
        restored = bank.get(["doc"])[0]
        results["storage"][storage] = {
            "exact_payload_bytes": exact_bytes(storage, shape), "stored_bytes_with_key": stored,
            "redis_memory_usage_bytes": usage, "share_of_float16": round(stored / (2 * entry.numel() + 768), 3),
            "relative_rms_error": round(float((restored - entry).pow(2).mean().sqrt() / entry.pow(2).mean().sqrt()), 4),
        }
        print(storage, results["storage"][storage], flush=True)
    client.flushdb()

    # reading at scale
    pool_keys = unit_keys(args.pool, args.key_dim, rng)
    for size in [int(s) for s in args.sizes.split(",")]:
        client.flushdb()
        bank = RedisMemoryBank(client, bank="scale", storage=args.storage)
        for i in range(args.pool):
            bank.put(f"pool-{i}", torch.randn(shape), key=torch.from_numpy(pool_keys[i]))
        others = [f"doc-{i}" for i in range(size - args.pool)]
        fill_keys_only(client, bank, others, unit_keys(len(others), args.key_dim, rng))
        queries = []
        for _ in range(args.questions):
            chosen = rng.choice(args.pool, args.top_k, replace=False)
            q = pool_keys[chosen].sum(0)
            queries.append(torch.from_numpy(q / np.linalg.norm(q)))
        redis_mb = round(client.info("memory")["used_memory"] / 2**20, 1)
        with get_context("spawn").Pool(1) as pool:  # the reader is a fresh process, as the API's is
            row = pool.apply(read_phase, (args.redis_url, args.storage, args.top_k, args.threads, queries,
                                          size <= args.all_keys_max))
        row = {"entries": size, "redis_used_memory_mb": redis_mb, **row}
        results["sizes"][str(size)] = row
        print(size, row, flush=True)
    client.flushdb()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
