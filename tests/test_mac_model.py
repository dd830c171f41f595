"""MAC end to end on tiny models: gradients, backprop dropout, artifacts, exact deletion."""

from __future__ import annotations

import pytest
import torch

from tests.mac_helpers import TINY_MAC, tiny_encoder, tiny_mac
from training.artifacts import ArtifactError
from training.mac.aggregator import iter_bank_entries
from training.mac.model import answer_nll, answer_questions, load_mac, qa_batch, save_mac
from training.mac.train import mac_loss
from training.memory_bank import InMemoryMemoryBank
from training.models import tiny_causal_lm

DOCS = [
    "The council approved the new harbour bridge on Tuesday.",
    "In 2031 the city of Norvale opened 12 libraries and 3 museums.",
    "Scientists at the Aurora Institute reported a record harvest of 4,500 tonnes of kelp.",
]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_gradients_reach_mac_networks_and_base_stays_frozen(kind):
    mac, base, tok = tiny_mac(kind)
    mac.train()
    loss, _ = mac_loss(mac, base, tok, DOCS, ["Who approved the bridge?"] * 3, ["the council"] * 3,
                       backprop_mask=[True, True, True])
    loss.backward()
    for name, module in [("amortizer", mac.amortizer), ("aggregator", mac.aggregator), ("prefix", mac.prefix)]:
        grads = [p.grad for p in module.parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads), name
        assert sum(g.abs().sum() for g in grads) > 0, name
    assert all(p.grad is None and not p.requires_grad for p in base.parameters())
    assert all(p.grad is None for p in mac.amortizer.encoder.parameters())  # frozen encoder


def test_backprop_dropout_only_differentiates_the_kept_documents():
    mac, base, tok = tiny_mac()
    seen = []
    hook = mac.amortizer.blocks[0].register_forward_hook(lambda m, a, out: seen.append(out.requires_grad))
    loss, _ = mac_loss(mac, base, tok, DOCS, ["Who?"] * 3, ["the council"] * 3, backprop_mask=[True, False, False])
    hook.remove()
    assert seen == [True, False, True]  # documents with grad, documents without, then the questions
    loss.backward()
    assert mac.amortizer.queries.grad is not None


def test_reconstruction_loss_trains_the_writer_and_depends_on_the_entry():
    from training.mac.train import TrainConfig, reconstruction_nll

    mac, base, tok = tiny_mac()
    mac.train()
    loss, parts = mac_loss(mac, base, tok, DOCS, ["Who?"] * 3, ["x"] * 3, [True, False, True],
                           cfg=TrainConfig(reconstruction_weight=0.5, reconstruction_tokens=8))
    assert set(parts) == {"qa", "recon"} and parts["recon"] > 0
    assert loss.item() == pytest.approx(parts["qa"] + 0.5 * parts["recon"], rel=1e-5)
    loss.backward()
    assert mac.amortizer.queries.grad.abs().sum() > 0 and mac.prefix.net[0].weight.grad.abs().sum() > 0
    with torch.no_grad():
        entries = [m for m, _ in mac.memorize(DOCS)]
        own = reconstruction_nll(mac, base, tok, DOCS, entries, 8)
        other = reconstruction_nll(mac, base, tok, DOCS, entries[1:] + entries[:1], 8)
    assert own.shape == (3,) and not torch.allclose(own, other)


def test_encoder_top_layers_can_train():
    base, tok = tiny_causal_lm()
    encoder, enc_tok = tiny_encoder()
    from training.mac.model import MAC

    mac = MAC(TINY_MAC.model_copy(update={"train_encoder_layers": 1}), encoder, enc_tok, base.config)
    trainable = {n for n, p in mac.amortizer.encoder.named_parameters() if p.requires_grad}
    assert trainable and all(".layer.1." in n for n in trainable)
    mac.train()
    assert mac.amortizer.encoder.training
    mac_loss(mac, base, tok, DOCS, ["Who?"] * 3, ["x"] * 3, [True] * 3)[0].backward()
    assert all(p.grad is not None for n, p in mac.amortizer.encoder.named_parameters() if n in trainable)


def test_a_few_steps_fit_a_fixed_batch():
    mac, base, tok = tiny_mac()
    opt = torch.optim.Adam([p for p in mac.parameters() if p.requires_grad], lr=3e-2)
    questions = ["Who approved the bridge?", "How many libraries?", "What was harvested?"]
    answers = ["the council", "12", "kelp"]
    losses = []
    for _ in range(15):
        loss, _ = mac_loss(mac, base, tok, DOCS, questions, answers, [True] * 3)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    # a random tiny base is near-uniform and barely steerable; still the NLL must clearly drop
    assert losses[-1] < losses[0] - 0.4


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_artifact_round_trip_and_base_mismatch(tmp_path, kind):
    mac, base, tok = tiny_mac(kind)
    save_mac(tmp_path / "mac", mac, base_model=f"tiny-{kind}", base_config=base.config, encoder="tiny",
             metrics={"f1": 1.0})
    loaded, manifest = load_mac(tmp_path / "mac", base.config, encoder=tiny_encoder())
    assert manifest.kind == "mac" and manifest.config["mac"]["n_tokens"] == TINY_MAC.n_tokens
    with torch.no_grad():
        entries = [m for m, _ in mac.memorize(DOCS)]
        entries2 = [m for m, _ in loaded.memorize(DOCS)]
        q, _ = mac.encode_questions(["Who approved the bridge?"])
        q2, _ = loaded.encode_questions(["Who approved the bridge?"])
        for (k1, v1), (k2, v2) in zip(mac.prefix_for(q, entries), loaded.prefix_for(q2, entries2)):
            torch.testing.assert_close(k1, k2)
            torch.testing.assert_close(v1, v2)
    other, _ = tiny_causal_lm(kind, hidden_size=32)
    with pytest.raises(ArtifactError, match="base model"):
        load_mac(tmp_path / "mac", other.config, encoder=tiny_encoder())


def test_deleting_an_entry_removes_its_influence_exactly():
    """After deleting a document, the answer distribution for a question only it supports
    changes, and equals the one of a bank that never held the document."""
    mac, base, tok = tiny_mac()
    mac.eval()
    question, answer = "Who approved the new harbour bridge?", "the council"
    full, without = InMemoryMemoryBank(), InMemoryMemoryBank()
    with torch.no_grad():
        for i, (memory, key) in enumerate(mac.memorize(DOCS)):
            full.put(f"d{i}", memory, key)
            if i != 0:
                without.put(f"d{i}", memory, key)

        def answer_logprob(bank):
            q, _ = mac.encode_questions([question])
            prefix = mac.prefix_for(q, iter_bank_entries(bank, bank.ids()))
            ids, mask, labels = qa_batch(tok, [question], [answer])
            return answer_nll(base, prefix, ids, mask, labels)

        before = answer_logprob(full)
        assert full.delete("d0") and "d0" not in full
        after = answer_logprob(full)
        assert abs(before.item() - after.item()) > 1e-4
        torch.testing.assert_close(after, answer_logprob(without))
        # generation runs on the bank after deletion too (top-k over the remaining keys)
        answers = answer_questions(mac, base, tok, [question],
                                   lambda i, key: iter_bank_entries(full, full.ids()), max_new_tokens=3)
        assert len(answers) == 1
