"""One-off diagnostic (fifth MAC session): squad-seq val F1 when only the bottom L layers carry memory (upper layers' slots zeroed),
i.e. what an ingest pass truncated to L layers would give.

    SQUAD=../shared/data/squad/dev-v1.1.json .venv/bin/python scripts/probes/depth_probe.py 30,20,15,10,6
"""
import os, sys, time, torch
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
m = MACMethod(ctx, mac, MACMethodSettings(top_k=1))
for d in docs: m.ingest(d)
full = {i: t.clone() for i, t in zip(m.bank.ids(), m.bank.get(m.bank.ids()))}
key_of = dict(zip(*m.bank.keys()))
for L in [int(x) for x in sys.argv[1].split(",")]:
    for i, t in full.items():
        t2 = t.clone(); t2[L:] = 0
        m.bank.put(i, t2, key_of[i])
    preds = m.answer(qs)
    f1 = 100 * sum(squad_scores(p, q.answers)["f1"] for p, q in zip(preds, qs)) / len(qs)
    print("layers with memory", L, "F1", round(f1, 2), flush=True)
