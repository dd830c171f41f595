"""CaMeLS on tiny random models: the weighting model, its artifact, and the meta-training recipe."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from training.artifacts import ArtifactError
from training.camels.train import CamelsTrainConfig, build_proxy, camels_objective, evaluate, main
from training.camels.weighting_model import (
    WeightingModelConfig,
    build_weighting_model,
    load_weighting_model,
    save_weighting_model,
)
from training.inner_loop import InnerLoopConfig
from training.lora import LoraSpec
from training.models import ModelSettings, load_causal_lm, tiny_causal_lm
from training.token_batches import document_batch, qa_batch
from training.updates import UpdateConfig

from tests.meta_fixtures import write_tiny_base_model, write_tiny_squad

DOC = "In 2031 the city of Norvale opened 12 libraries and 3 museums."


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_weights_start_uniform_nonnegative_one_per_token():
    base, tok = tiny_causal_lm("llama", num_layers=3)
    model = build_weighting_model(base, WeightingModelConfig(num_layers=2))
    batch = document_batch(tok, [DOC, "short text"])
    weights = model(batch.input_ids, batch.attention_mask)
    assert weights.shape == batch.input_ids.shape
    real = weights[batch.attention_mask.bool()]
    torch.testing.assert_close(real, torch.full_like(real, math.log(2) / 3))  # zero-init last layer
    assert (weights[~batch.attention_mask.bool()] == 0).all()  # padding gets no weight
    assert not model.backbone.get_input_embeddings().weight.requires_grad
    assert len(model.backbone.layers) == 2


def test_one_outer_step_makes_the_weights_token_dependent():
    base, tok = tiny_causal_lm("llama")
    config = CamelsTrainConfig(squad="unused", update=UpdateConfig(
        optimizer="sgd", lr=0.5, lora=LoraSpec(rank=4, targets=["q_proj", "v_proj", "down_proj"])))
    proxy, params0 = build_proxy(base, config)
    model = build_weighting_model(base, WeightingModelConfig(num_layers=1))
    doc = document_batch(tok, [DOC])
    qa = qa_batch(tok, ["How many libraries?"], ["12"])
    probe = document_batch(tok, ["The council approved the bridge."])
    trainable = [p for p in model.parameters() if p.requires_grad]
    loss, stats = camels_objective(proxy, params0, model, [doc], qa, probe, InnerLoopConfig(lr=0.5), 0.1)
    loss.backward(inputs=trainable)
    assert model.head[2].weight.grad.abs().max() > 0  # the meta-gradient reaches the zero-init layer
    assert stats["kl"] > 0
    torch.optim.Adam(trainable, lr=1e-2).step()
    with torch.no_grad():
        weights = model(doc.input_ids, doc.attention_mask)[0, 1:]
    assert weights.std() > 1e-4


def test_artifact_round_trip_and_refuses_another_base_model(tmp_path):
    base, tok = tiny_causal_lm("llama")
    model = build_weighting_model(base, WeightingModelConfig(num_layers=1))
    torch.nn.init.normal_(model.head[2].weight)
    for name, p in model.named_parameters():  # a trained LoRA: B away from zero
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    save_weighting_model(tmp_path / "w", model, base_model_id="tiny-llama", base_config=base.config)
    stored = load_file(tmp_path / "w" / "weights.safetensors")
    # only what was trained: the head and the backbone's LoRA, never a copy of the base's blocks
    assert stored and all(k.startswith("head.") or "lora_" in k for k in stored)
    loaded = load_weighting_model(tmp_path / "w", base)
    batch = document_batch(tok, [DOC])
    torch.testing.assert_close(loaded(batch.input_ids), model(batch.input_ids))
    other, _ = tiny_causal_lm("llama", hidden_size=32)
    with pytest.raises(ArtifactError, match="trained for base model"):
        load_weighting_model(tmp_path / "w", other)


def test_recipe_trains_saves_and_resumes(tmp_path):
    squad = write_tiny_squad(tmp_path / "squad.json")
    base_dir = write_tiny_base_model(tmp_path / "base")
    out = tmp_path / "camels"
    common = ["--squad", str(squad), "--out", str(out), "--base-model", str(base_dir), "--device", "cpu",
              "--update", '{"optimizer": "adam", "lr": 0.01, "lora": {"rank": 2, "targets": ["q_proj", "v_proj"]}}',
              "--stream-documents", "2", "--outer-lr", "1e-2", "--questions-per-doc", "2", "--val-docs", "2",
              "--checkpoint-every", "1", "--weighting", '{"num_layers": 1}']
    main(common + ["--max-updates", "3", "--eval-every", "2"])
    records = [json.loads(line) for line in (tmp_path / "camels-run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["update"] for r in records if "train" in r] == [1, 2, 3]
    assert all(math.isfinite(r["train"]["qa_nll"]) for r in records if "train" in r)
    assert all(r["seconds_per_example"] > 0 and r["peak_rss_mb"] > 0 for r in records if "train" in r)
    assert "qa_nll_learned" in records[-1]["final_val"]
    base, _ = load_causal_lm(str(base_dir), ModelSettings(device="cpu"))
    model = load_weighting_model(out, base)
    assert model.head[2].weight.abs().max() > 0  # trained through two Adam steps: no longer the zero init
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "camels_weighting_model" and manifest["metrics"]["updates"] == 3
    assert manifest["config"]["update"]["optimizer"] == "adam"  # the regime it was meta-trained for
    # resume: a larger budget continues from update 3 instead of starting over
    main(common + ["--max-updates", "5", "--eval-every", "100"])
    records = [json.loads(line) for line in (tmp_path / "camels-run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["update"] for r in records if "train" in r] == [1, 2, 3, 4, 5]
    # export the checkpoint as it is (no further update, no evaluation)
    (out / "manifest.json").unlink()
    main(common + ["--max-updates", "5", "--final-eval", "false"])
    assert json.loads((out / "manifest.json").read_text())["metrics"]["updates"] == 5
    assert len((tmp_path / "camels-run" / "metrics.jsonl").read_text().splitlines()) == len(records)
    main(common + ["--eval-only", "true"])
    evaluated = json.loads((tmp_path / "camels-run" / "eval.json").read_text())["val"]
    assert evaluated["qa_nll_learned"] == pytest.approx(records[-1]["final_val"]["qa_nll_learned"], rel=1e-4)
    assert {"qa_nll_before", "qa_nll_uniform", "kl_uniform", "kl_learned"} <= set(evaluated)


def test_meta_training_through_an_adam_stream_lowers_the_outer_loss():
    """Two documents learned in sequence by Adam (the harness's optimizer), questions about both:
    a few outer steps on the weighting model lower the objective on that stream."""
    base, tok = tiny_causal_lm("llama")
    config = CamelsTrainConfig(squad="unused", update=UpdateConfig(
        optimizer="adam", lr=0.01, lora=LoraSpec(rank=4, targets=["q_proj", "v_proj", "down_proj"])))
    proxy, params0 = build_proxy(base, config)
    model = build_weighting_model(base, WeightingModelConfig(num_layers=1))
    docs = [document_batch(tok, [DOC]), document_batch(tok, ["The council approved the new harbour bridge."])]
    qa = qa_batch(tok, ["How many libraries?", "Who approved the bridge?"], ["12", "the council"])
    probe = document_batch(tok, ["Scientists reported a record harvest of kelp."])
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=3e-2)
    losses = []
    for _ in range(6):
        optimizer.zero_grad()
        loss, stats = camels_objective(proxy, params0, model, docs, qa, probe, config.inner(), 0.1, normalize=True)
        loss.backward(inputs=trainable)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-4
    assert stats["weight_max"] > stats["weight_mean"]  # no longer uniform


def test_camels_ft_in_the_harness_uses_the_learned_weights(tmp_path):
    from training.eval.harness import ProtocolConfig, run_method
    from training.data.evalset import EvalSet
    from training.methods import MethodConfig, MethodContext, build_method
    from training.types import Document, Question

    base, tok = tiny_causal_lm("llama")
    model = build_weighting_model(base, WeightingModelConfig(num_layers=1))
    torch.nn.init.normal_(model.head[2].weight)
    save_weighting_model(tmp_path / "w", model, base_model_id="tiny-llama", base_config=base.config)
    ctx = MethodContext(base, tok, MethodConfig(max_new_tokens=3, ft_lr=1e-2, camels_artifact=str(tmp_path / "w")))
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    method = build_method("camels_ft", ctx)
    doc = Document("d1", DOC)
    ids, weights = method.updater.token_weights(doc.text)
    expected = model(ids[None])[0].detach()
    torch.testing.assert_close(weights, expected)
    assert weights.std() > 0  # not uniform: the artifact's weights, not ones
    evalset = EvalSet("tiny", "test", [doc], [Question("q", "How many libraries?", ("12",), ("d1",))])
    run = run_method(method, evalset, ProtocolConfig(latency_samples=1, score_choices=False), progress=False)
    assert method.updater.steps == 1 and 0.0 <= run.f1 <= 100.0
    for name, p in base.named_parameters():  # closed: the base model is handed back unchanged
        torch.testing.assert_close(p, before[name])


def test_describe_weights_reports_distribution_and_token_kinds():
    from training.camels.describe import describe, markdown, token_kind

    assert [token_kind(t) for t in [" 2031", " Norvale", " the", ",", " opened", "Norvale"]] == [
        "number", "capitalised", "stopword", "punctuation", "other", "other"]
    docs = [[(" In", 1.0), (" 2031", 9.0), (" the", 0.5), (" Norvale", 6.0), (",", 0.5), (" opened", 1.0)]]
    summary = describe(docs, top_n=2)
    assert summary["tokens"] == 6
    assert summary["relative"]["share_below_1"] == pytest.approx(4 / 6, abs=1e-3)  # mean is 3
    assert summary["relative"]["share_above_3x_mean"] == 0  # 9 is exactly 3x
    assert [t for t, _ in summary["top_tokens"]] == [" 2031", " Norvale"]
    assert summary["by_kind"]["number"]["mean_relative_weight"] == pytest.approx(3.0)
    assert summary["by_kind"]["number"]["share_of_top10pct"] == 1.0
    assert "| number | 16.7% | 3.00 | 100.0% |" in markdown(summary)


def test_normalized_weights_learn_which_tokens_not_the_step_size():
    """With mean-normalised weights (as online fine-tuning uses them) a uniform rescaling of the
    weights changes nothing, so the meta-gradient cannot go into the overall step size."""
    base, tok = tiny_causal_lm("llama")
    config = CamelsTrainConfig(squad="unused", update=UpdateConfig(lora=LoraSpec(rank=4, targets=["q_proj", "v_proj"])))
    proxy, params0 = build_proxy(base, config)
    model = build_weighting_model(base, WeightingModelConfig(num_layers=1))
    doc = document_batch(tok, [DOC])
    qa = qa_batch(tok, ["How many libraries?"], ["12"])
    probe = document_batch(tok, ["The council approved the bridge."])
    inner = InnerLoopConfig(lr=0.5)
    loss, _ = camels_objective(proxy, params0, model, [doc], qa, probe, inner, 0.1, normalize=True)
    bias = model.head[2].bias
    (grad_bias, grad_weight) = torch.autograd.grad(loss, [bias, model.head[2].weight])
    assert grad_bias.abs().max() < 1e-6 * max(1.0, grad_weight.abs().max().item())
    assert grad_weight.abs().max() > 0
    with torch.no_grad():
        bias.fill_(2.0)  # every weight scaled up (all tokens still equal)
    scaled, _ = camels_objective(proxy, params0, model, [doc], qa, probe, inner, 0.1, normalize=True)
    unnormalised, _ = camels_objective(proxy, params0, model, [doc], qa, probe, inner, 0.1, normalize=False)
    assert scaled.item() == pytest.approx(loss.item(), rel=1e-5)
    assert unnormalised.item() != pytest.approx(loss.item(), rel=1e-3)
    # validation: equal weights, mean-normalised, are the uniform step; unnormalised they are a
    # uniform step of another size, which "matched" reproduces
    normalized = evaluate(proxy, params0, model, [([doc], qa, probe)], inner, normalize=True)
    assert normalized["qa_nll_learned"] == pytest.approx(normalized["qa_nll_uniform"], rel=1e-5)
    raw = evaluate(proxy, params0, model, [([doc], qa, probe)], inner, normalize=False)
    assert raw["qa_nll_learned"] == pytest.approx(raw["qa_nll_matched"], rel=1e-5)
    assert raw["qa_nll_learned"] != pytest.approx(raw["qa_nll_uniform"], rel=1e-4)


@pytest.mark.real_model
def test_weighting_model_on_smollm2_gives_one_weight_per_base_token():
    base, tok = load_causal_lm()
    model = build_weighting_model(base)
    ids = tok(DOC, add_special_tokens=False, return_tensors="pt")["input_ids"]
    weights = model(ids)
    assert weights.shape == ids.shape
    torch.testing.assert_close(weights, torch.full_like(weights, math.log(2) / 3))
    # the backbone is SmolLM2's first 4 blocks (+ final norm), copied: the base model's features
    with torch.no_grad():
        ours = model.backbone(input_ids=ids).last_hidden_state
        theirs = base.model.norm(base.model(input_ids=ids, output_hidden_states=True).hidden_states[4])
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
