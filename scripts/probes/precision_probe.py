"""One-off diagnostic (fifth MAC session): squad-seq val F1 (64 paragraphs, 120 questions, top 1)
when the memory is written under bf16 autocast (a 2.9x faster forward pass on CPUs with AVX-512
BF16) and when its slots are stored as int8 with one scale per slot vector (half the bytes of fp16).

    SQUAD=../shared/data/squad/dev-v1.1.json .venv/bin/python scripts/probes/precision_probe.py
"""
import time

import torch

from mac_val_setup import ctx, docs, f1, mac, qs
from training.mac.method import MACMethod, MACMethodSettings


def int8_round_trip(entry: torch.Tensor) -> torch.Tensor:
    scale = entry.abs().amax(-1, keepdim=True).clamp(min=1e-8) / 127
    return (entry / scale).round().clamp(-127, 127) * scale


def run(name: str, bf16: bool = False, int8: bool = False) -> None:
    method = MACMethod(ctx, mac, MACMethodSettings(top_k=1))
    started = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for d in docs:
            method.ingest(d)
    ingest = (time.perf_counter() - started) / len(docs)
    if int8:
        ids = method.bank.ids()
        key_of = dict(zip(*method.bank.keys()))
        for i, entry in zip(ids, method.bank.get(ids)):
            method.bank.put(i, int8_round_trip(entry), key_of[i])
    print(f"{name}: F1 {f1(method.answer(qs)):.2f}, ingest {ingest:.3f} s/doc", flush=True)


run("fp32 ingest, fp16 storage")
run("bf16 ingest, fp16 storage", bf16=True)
run("fp32 ingest, int8 storage", int8=True)
