"""One-off diagnostic (fifth MAC session): squad-seq val F1 (64 paragraphs, 120 questions, top 1)
when the memory is written under bf16 autocast (a 2.9x faster forward pass on CPUs with AVX-512
BF16) and when its slots are stored as int8 with one scale per slot vector (half the bytes of fp16).

    SQUAD=../shared/data/squad/dev-v1.1.json .venv/bin/python scripts/probes/precision_probe.py
"""
import os, time, torch
torch.set_num_threads(1)
from training.models import load_causal_lm, ModelSettings, DEFAULT_BASE_MODEL
from training.qa_tuning import apply_qa_tuning
from training.mac.method import MACMethod, MACMethodSettings
from training.mac.model import load_mac
from training.methods import MethodConfig, MethodContext
from training.data.squad import load_squad_seq
from training.metrics import squad_scores

SQUAD = os.environ.get("SQUAD", "../shared/data/squad/dev-v1.1.json")  # SQuAD v1.1 dev JSON
QA_TUNING = os.environ.get("QA_TUNING", "artifacts/qa-format/smollm2-135m-instruct")
base, tok = load_causal_lm(DEFAULT_BASE_MODEL, ModelSettings())
base = apply_qa_tuning(base, QA_TUNING)
mac, _ = load_mac(os.environ.get("MAC_ARTIFACT", "var/artifacts/mac-kv"), base.config)
ev = load_squad_seq(SQUAD, "val")
docs = ev.documents[:64]
qs = ev.questions_about({d.id for d in docs})[:120]
ctx = MethodContext(base, tok, MethodConfig(max_new_tokens=24, batch_size=8))


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
    preds = method.answer(qs)
    f1 = 100 * sum(squad_scores(p, q.answers)["f1"] for p, q in zip(preds, qs)) / len(qs)
    print(f"{name}: F1 {f1:.2f}, ingest {ingest:.3f} s/doc", flush=True)


run("fp32 ingest, fp16 storage")
run("bf16 ingest, fp16 storage", bf16=True)
run("fp32 ingest, int8 storage", int8=True)
