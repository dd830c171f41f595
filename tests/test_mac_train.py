"""The MAC training loop on tiny models: it runs, validates, exports the best and resumes exactly."""

from __future__ import annotations

import torch

from tests.mac_helpers import tiny_encoder, tiny_mac
from training.data.evalset import EvalSet
from training.mac.model import load_mac, save_mac
from training.mac.train import TrainConfig, train_mac
from training.types import Document, Question

FACTS = [
    ("The council approved the harbour bridge.", "Who approved the bridge?", "the council"),
    ("Norvale opened 12 libraries in 2031.", "How many libraries opened?", "12"),
    ("The Aurora Institute harvested kelp.", "What did the institute harvest?", "kelp"),
    ("The museum opened on Tuesday.", "When did the museum open?", "Tuesday"),
    ("Scientists counted 4,500 tonnes.", "How many tonnes?", "4,500"),
]


def _evalset(split: str) -> EvalSet:
    docs = [Document(f"{split}{i}", text) for i, (text, _, _) in enumerate(FACTS)]
    questions = [Question(f"q{split}{i}", q, (a,), (f"{split}{i}",)) for i, (_, q, a) in enumerate(FACTS)]
    return EvalSet("tiny", split, docs, questions)


CFG = TrainConfig(steps=6, docs_per_step=3, eval_every=3, checkpoint_every=2, val_docs=3,
                  val_questions=2, warmup_steps=2, lr=1e-3, hierarchical_prob=0.5)


def test_training_validates_exports_best_and_resumes_exactly(tmp_path):
    mac, base, tok = tiny_mac()
    best = []
    state = train_mac(mac, base, tok, _evalset("train"), _evalset("val"), CFG, progress=False,
                      on_best=lambda m, metrics: best.append(metrics))
    assert state["step"] == 6 and best and best[0]["step"] == 0
    vals = [h for h in state["history"] if "f1" in h]
    assert [h["step"] for h in vals] == [0, 3, 6] and all(h["loss"] > 0 for h in vals)
    # the memory probe: own vs another paragraph differ (the readout depends on the memory)
    assert all(h["nll_own"] > 0 and h["nll_other"] > 0 and h["nll_own"] != h["nll_other"] for h in vals)
    assert all(0 < h["prefix_doc_share"] < 1 for h in vals)
    assert state["best"] == best[-1]

    # interrupted after 4 steps (checkpoint at step 4), then resumed to 6: same weights as above
    ckpt = tmp_path / "mac.ckpt.pt"
    interrupted, base2, _ = tiny_mac()
    train_mac(interrupted, base2, tok, _evalset("train"), _evalset("val"),
              CFG, checkpoint=ckpt, progress=False, stop_at=4)
    resumed, _, _ = tiny_mac()  # same frozen encoder; trainable weights scrambled: they must come from the checkpoint
    with torch.no_grad():
        for p in resumed.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    state2 = train_mac(resumed, base, tok, _evalset("train"), _evalset("val"), CFG, checkpoint=ckpt,
                       progress=False)
    assert state2["step"] == 6
    for name, tensor in mac.trainable_tensors().items():
        torch.testing.assert_close(resumed.trainable_tensors()[name], tensor, msg=name)

    save_mac(tmp_path / "art", resumed, base_model="tiny-llama", base_config=base.config, encoder="tiny",
             metrics={"val": state2["best"]})
    loaded, manifest = load_mac(tmp_path / "art", base.config, encoder=tiny_encoder())
    assert manifest.metrics["val"]["step"] == state2["best"]["step"]


def test_reconstruction_weight_adds_its_probe_and_loss_to_the_log():
    mac, base, tok = tiny_mac()
    cfg = CFG.model_copy(update={"steps": 3, "reconstruction_weight": 1.0, "reconstruction_tokens": 8})
    state = train_mac(mac, base, tok, _evalset("train"), _evalset("val"), cfg, progress=False)
    last = state["history"][-1]
    assert last["recon_own"] > 0 and last["recon_other"] > 0 and last["recon_own"] != last["recon_other"]
    assert state["history"][-2]["train_recon_ema"] > 0


def test_a_spent_budget_resumes_to_the_checkpoint_without_training(tmp_path):
    ckpt = tmp_path / "mac.ckpt.pt"
    mac, base, tok = tiny_mac()
    train_mac(mac, base, tok, _evalset("train"), _evalset("val"), CFG, checkpoint=ckpt, progress=False, stop_at=2)
    resumed, _, _ = tiny_mac()
    state = train_mac(resumed, base, tok, _evalset("train"), _evalset("val"), CFG.model_copy(update={"max_minutes": 0}),
                      checkpoint=ckpt, progress=False)
    assert state["step"] == 2
    for name, tensor in mac.trainable_tensors().items():
        torch.testing.assert_close(resumed.trainable_tensors()[name], tensor, msg=name)


def test_prefix_document_share_is_zero_when_every_entry_is_the_same():
    from training.mac.train import prefix_document_share

    mac, _, _ = tiny_mac()
    with torch.no_grad():
        entries = [m for m, _ in mac.memorize([text for text, _, _ in FACTS])]
        assert prefix_document_share(mac, [entries[0]] * 3) == 0
        assert prefix_document_share(mac, entries) > 0


def test_capacity_probe_trains_and_validates_on_the_same_paragraphs():
    from training.mac.capacity_probe import capacity_probe

    mac, base, tok = tiny_mac()
    records = capacity_probe(mac, base, tok, _evalset("train"), 3, CFG.model_copy(update={"steps": 3, "reconstruction_weight": 1.0}))
    assert [r["step"] for r in records] == [0, 3]
    assert all(r["n"] == 3 and "recon_own" in r for r in records)  # val questions = the 3 trained paragraphs'
