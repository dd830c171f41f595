"""One-off diagnostic (fifth MAC session): squad-seq val F1 when the memory of a paragraph is N of its own key/value slots, with the oracle paragraph.

    SQUAD=../shared/data/squad/dev-v1.1.json .venv/bin/python scripts/probes/kv_probe.py 40
"""
import json, os, sys, time
import torch
from transformers import DynamicCache
from training.models import load_causal_lm, ModelSettings, DEFAULT_BASE_MODEL
from training.qa_tuning import apply_qa_tuning
from training.mac.model import shared_head_ids, stop_token_ids
from training.token_batches import prompt_ids
from training.data.squad import load_squad_seq
from training.metrics import token_f1
from training.prompts import extract_answer

SQUAD = os.environ.get("SQUAD", "../shared/data/squad/dev-v1.1.json")  # SQuAD v1.1 dev JSON
QA_TUNING = os.environ.get("QA_TUNING", "artifacts/qa-format/smollm2-135m-instruct")

torch.set_num_threads(1)
settings = ModelSettings()
base, tok = load_causal_lm(DEFAULT_BASE_MODEL, settings)
base = apply_qa_tuning(base, QA_TUNING)
base.requires_grad_(False)
base.set_attn_implementation("eager")
ev = load_squad_seq(SQUAD, "val")
docs = {d.id: d.text for d in ev.documents}
qs = []
seen = {}
for q in ev.questions:
    if seen.get(q.doc_ids[0], 0) < 2:
        seen[q.doc_ids[0]] = seen.get(q.doc_ids[0], 0) + 1
        qs.append(q)
qs = qs[: int(sys.argv[1]) if len(sys.argv) > 1 else 60]
head = shared_head_ids(tok)
S = len(head)
stop = stop_token_ids(tok)
with torch.no_grad():
    hout = base(input_ids=torch.tensor([head]), use_cache=True)
head_kv = [(l.keys, l.values) for l in hout.past_key_values.layers]


@torch.no_grad()
def doc_memory(doc):
    rag = prompt_ids(tok, "Q?", [doc])
    tail = prompt_ids(tok, "Q?")[S:]
    assert rag[:S] == head and rag[-len(tail):] == tail, "segment split"
    seg = rag[S:len(rag) - len(tail)]
    cache = DynamicCache([(k.clone(), v.clone()) for k, v in head_kv], config=base.config)
    out = base(input_ids=torch.tensor([seg]), past_key_values=cache, use_cache=True, output_attentions=True,
               position_ids=torch.arange(S, S + len(seg))[None])
    kv = [(l.keys[:, :, S:], l.values[:, :, S:]) for l in out.past_key_values.layers]
    # attention received by each segment token from later segment tokens, per layer and kv head
    scores = []
    for att in out.attentions:  # [1, heads, T, S+T]
        a = att[0, :, :, S:]  # heads, T, T
        h = a.shape[0]; g = h // kv[0][0].shape[1]
        recv = a.sum(1) / torch.arange(a.shape[-1], 0, -1)  # mean over the queries that see it
        scores.append(recv.view(-1, g, recv.shape[-1]).sum(1))  # kv_heads, T
    return seg, kv, scores


def select(kv, scores, n, mode):
    T = kv[0][0].shape[2]
    if mode == "all" or n >= T:
        return kv
    out = []
    for (k, v), s in zip(kv, scores):
        if mode == "stride":
            idx = torch.linspace(0, T - 1, n).round().long()[None].expand(k.shape[1], -1)
        elif mode == "h2o":
            idx = torch.topk(s, n, dim=-1).indices.sort(-1).values
        elif mode == "h2o_recent":
            r = n // 4
            idx = torch.topk(s[:, : T - r], n - r, dim=-1).indices.sort(-1).values
            idx = torch.cat([idx, torch.arange(T - r, T)[None].expand(k.shape[1], -1)], 1)
        elif mode == "mean":
            bounds = torch.linspace(0, T, n + 1).long()
            out.append((torch.stack([k[:, :, a:b].mean(2) for a, b in zip(bounds[:-1], bounds[1:])], 2),
                        torch.stack([v[:, :, a:b].mean(2) for a, b in zip(bounds[:-1], bounds[1:])], 2)))
            continue
        gi = idx[None, :, :, None].expand(1, -1, -1, k.shape[-1])
        out.append((k.gather(2, gi), v.gather(2, gi)))
    return out


@torch.no_grad()
def answer(q, mem, T):
    ids = prompt_ids(tok, q.question)[S:]
    layers = [(torch.cat([hk, mk], 2), torch.cat([hv, mv], 2)) for (hk, hv), (mk, mv) in zip(head_kv, mem)] if mem else [(k.clone(), v.clone()) for k, v in head_kv]
    cache = DynamicCache(layers, config=base.config)
    P = layers[0][0].shape[2]
    pos = S + T
    out = base(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True,
               position_ids=torch.arange(pos, pos + len(ids))[None], attention_mask=torch.ones(1, P + len(ids), dtype=torch.long))
    gen = []
    pos += len(ids)
    mask_len = P + len(ids)
    for _ in range(24):
        nxt = int(out.logits[0, -1].argmax())
        if nxt in stop:
            break
        gen.append(nxt)
        mask_len += 1
        out = base(input_ids=torch.tensor([[nxt]]), past_key_values=out.past_key_values, use_cache=True,
                   position_ids=torch.tensor([[pos]]), attention_mask=torch.ones(1, mask_len, dtype=torch.long))
        pos += 1
    return extract_answer(tok.decode(gen, skip_special_tokens=True))


configs = [("none", 0), ("all", 0)] + [(m, n) for n in (16, 32, 64) for m in ("stride", "h2o", "h2o_recent", "mean")]
res = {c: [] for c in configs}
t0 = time.time()
mems = {}
for i, q in enumerate(qs):
    if q.doc_ids[0] not in mems:
        mems = {q.doc_ids[0]: doc_memory(docs[q.doc_ids[0]])}
    seg, kv, scores = mems[q.doc_ids[0]]
    for mode, n in configs:
        mem = None if mode == "none" else select(kv, scores, n, mode)
        pred = answer(q, mem, len(seg))
        res[(mode, n)].append(max(token_f1(pred, g) for g in q.answers))
    if i % 10 == 9:
        print(i + 1, f"{time.time()-t0:.0f}s", {f"{m}{n}": round(100 * sum(v) / len(v), 1) for (m, n), v in res.items()}, flush=True)
print("final", json.dumps({f"{m}{n}": round(100 * sum(v) / len(v), 1) for (m, n), v in res.items()}))
