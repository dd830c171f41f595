"""One-off diagnostic (seventh MAC session): squad-seq val F1 (64 paragraphs, 120 questions, top 1)
and ingest seconds per paragraph when the memory is written by a pruned pass: the bottom
``prune_after_layer`` layers see every token, only the ``prune_keep`` most-attended tokens go on.

    SQUAD=../shared/data/squad/dev-v1.1.json MAC_ARTIFACT=var/artifacts/mac-kv-init \
        .venv/bin/python scripts/probes/pruning_probe.py 2:48 4:64 none
"""
import sys
import time

from mac_val_setup import ctx, docs, f1, mac, qs
from training.mac.method import MACMethod, MACMethodSettings

base_config = mac.amortizer.config
for setting in sys.argv[1:]:
    after, keep = (None, 64) if setting == "none" else map(int, setting.split(":"))
    mac.amortizer.config = base_config.model_copy(update={"prune_after_layer": after, "prune_keep": keep})
    method = MACMethod(ctx, mac, MACMethodSettings(top_k=1))
    method.ingest(docs[0])  # warm-up
    started = time.perf_counter()
    for d in docs:
        method.ingest(d)
    ingest = (time.perf_counter() - started) / len(docs)
    print(f"{setting}: F1 {f1(method.answer(qs)):.2f}, ingest {ingest:.3f} s/doc", flush=True)
