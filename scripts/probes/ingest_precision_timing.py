"""One-off diagnostic (sixth MAC session): ingest seconds per squad-seq test paragraph of ``mac``
(one base-model pass) and ``uniform_ft`` (one LoRA Adam step) at the same precision, fp32 and
under CPU bf16 autocast, so the ratio the issue bounds is read at equal precision.

    SQUAD=../shared/data/squad/dev-v1.1.json .venv/bin/python scripts/probes/ingest_precision_timing.py
"""
import json
import os
import time

import torch

from training.data.squad import load_squad_seq
from training.mac.method import MACMethod, MACMethodSettings
from training.mac.model import load_mac
from training.methods import MethodConfig, MethodContext, build_method
from training.models import DEFAULT_BASE_MODEL, ModelSettings, load_causal_lm
from training.qa_tuning import apply_qa_tuning

torch.set_num_threads(1)
SQUAD = os.environ.get("SQUAD", "../shared/data/squad/dev-v1.1.json")  # SQuAD v1.1 dev JSON
base, tok = load_causal_lm(DEFAULT_BASE_MODEL, ModelSettings())
base = apply_qa_tuning(base, os.environ.get("QA_TUNING", "artifacts/qa-format/smollm2-135m-instruct"))
mac, _ = load_mac(os.environ.get("MAC_ARTIFACT", "var/artifacts/mac-kv"), base.config)
docs = load_squad_seq(SQUAD, "test").documents[:24]
ctx = MethodContext(base, tok, MethodConfig())


def seconds_per_doc(method, bf16: bool) -> float:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        method.ingest(docs[0])  # warm-up (first-call allocations)
        started = time.perf_counter()
        for doc in docs[1:]:
            method.ingest(doc)
    return (time.perf_counter() - started) / (len(docs) - 1)


results = {}
for bf16 in (False, True):
    precision = "bf16 autocast" if bf16 else "fp32"
    results[precision] = {"mac": round(seconds_per_doc(MACMethod(ctx, mac, MACMethodSettings(top_k=1)), bf16), 3)}
    uniform = build_method("uniform_ft", ctx)
    results[precision]["uniform_ft"] = round(seconds_per_doc(uniform, bf16), 3)
    uniform.close()
    results[precision]["ratio"] = round(results[precision]["uniform_ft"] / results[precision]["mac"], 2)
    print(precision, results[precision], flush=True)
print(json.dumps(results))
