"""The MAC training loop on tiny models: it runs, validates, exports the best and resumes exactly."""

from __future__ import annotations

import torch

from tests.mac_helpers import TINY_MAC, tiny_encoder, tiny_mac
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


CFG = TrainConfig(steps=6, docs_per_step=3, eval_every=3, checkpoint_every=2, val_docs=3, val_questions=2,
                  warmup_steps=2, lr=1e-2, backprop_fraction=0.5, entries_per_question=2, val_top_k=2)


def test_training_validates_exports_best_and_resumes_exactly(tmp_path):
    mac, base, tok = tiny_mac()
    best = []
    state = train_mac(mac, base, tok, _evalset("train"), _evalset("val"), CFG, progress=False,
                      on_best=lambda m, metrics: best.append(metrics))
    assert state["step"] == 6 and best and best[0]["step"] == 0
    vals = [h for h in state["history"] if "f1" in h]
    assert [h["step"] for h in vals] == [0, 3, 6] and all(h["loss"] > 0 for h in vals)
    # the memory probe (own vs another paragraph; rounded to 4 decimals, too coarse for 8 slots of
    # a random tiny model: test_validation_probe_reads_the_questions_own_paragraph checks it)
    assert all(h["nll_own"] > 0 and h["nll_other"] > 0 for h in vals)
    assert all(0 <= h["f1"] <= 100 and h["n"] == CFG.val_questions for h in vals)
    assert [h["step"] for h in state["history"] if "train_loss_ema" in h] == [3, 6]
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
    assert set(mac.trainable_tensors()) == {"amortizer.memory_tokens"}
    for name, tensor in mac.trainable_tensors().items():
        torch.testing.assert_close(resumed.trainable_tensors()[name], tensor, msg=name)
    fresh, _, _ = tiny_mac()  # training moved the memory tokens
    assert not torch.allclose(fresh.amortizer.memory_tokens, mac.amortizer.memory_tokens)

    save_mac(tmp_path / "art", resumed, base_model="tiny-llama", base_config=base.config, encoder="tiny",
             metrics={"val": state2["best"]})
    loaded, manifest = load_mac(tmp_path / "art", base.config, encoder=tiny_encoder())
    assert manifest.metrics["val"]["step"] == state2["best"]["step"]
    torch.testing.assert_close(loaded.amortizer.memory_tokens, resumed.amortizer.memory_tokens)


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


def test_validation_probe_reads_the_questions_own_paragraph():
    """``nll_own`` reads the question's paragraph, ``nll_other`` another one; with the paragraphs'
    full key/values as memory (no selection, no memory tokens) the two differ visibly."""
    from training.mac.model import prompt_head
    from training.mac.train import validate

    cfg = TINY_MAC.model_copy(update={"doc_slots": 1000, "memory_tokens": 0})
    mac, base, tok = tiny_mac(config=cfg)
    val = _evalset("val")
    metrics = validate(mac, base, tok, val.documents, val.questions, top_k=1, head=prompt_head(base, tok))
    assert metrics["n"] == len(val.questions) and len(metrics["samples"]) == 4
    assert metrics["loss"] == metrics["nll_own"] > 0 and metrics["nll_other"] > 0
    assert metrics["nll_own"] != metrics["nll_other"]
    assert 0 <= metrics["em"] <= metrics["f1"] <= 100
    assert mac.training  # validation puts the network back in training mode


def test_training_reads_quantized_rerotated_entries_and_still_reaches_the_memory_tokens():
    """``storage`` / ``rerotate`` in training: the loss sees the entries as the bank returns them and
    at their read positions; the gradient passes the quantizer (straight through) and the rotation."""
    from training.mac.model import prompt_head
    from training.mac.train import mac_loss

    mac, base, tok = tiny_mac()
    head = prompt_head(base, tok)
    texts = ["The council approved the new harbour bridge on Tuesday.",
             "In 2031 the city of Norvale opened 12 libraries and 3 museums."]
    args = (mac, base, tok, texts, ["Who approved the bridge?", "How many libraries?"], ["the council", "12"],
            [True, True], head, 2)
    plain = mac_loss(*args)
    mac.zero_grad()
    loss = mac_loss(*args, storage="int2", rerotate=True)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() != plain.item()
    assert mac.amortizer.memory_tokens.grad.abs().sum() > 0
