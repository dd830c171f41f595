"""One-off diagnostic (fifth MAC session): squad-seq val F1 when only the bottom L layers carry memory (upper layers' slots zeroed),
i.e. what an ingest pass truncated to L layers would give.

    SQUAD=../shared/data/squad/dev-v1.1.json .venv/bin/python scripts/probes/depth_probe.py 30,20,15,10,6
"""
import sys

from mac_val_setup import ctx, docs, f1, mac, qs
from training.mac.method import MACMethod, MACMethodSettings

m = MACMethod(ctx, mac, MACMethodSettings(top_k=1))
for d in docs: m.ingest(d)
full = {i: t.clone() for i, t in zip(m.bank.ids(), m.bank.get(m.bank.ids()))}
key_of = dict(zip(*m.bank.keys()))
for L in [int(x) for x in sys.argv[1].split(",")]:
    for i, t in full.items():
        t2 = t.clone(); t2[L:] = 0
        m.bank.put(i, t2, key_of[i])
    print("layers with memory", L, "F1", round(f1(m.answer(qs)), 2), flush=True)
