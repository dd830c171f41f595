"""Meta-trained single-step updates on tiny random models: variants, objective, artifact, recipe."""

from __future__ import annotations

import json
import math

import pytest
import torch

from training.inner_loop import enable_double_backward, forward_logits
from training.meta_ft.adapter import MetaAdapterConfig, attach, inner_params, load_meta_adapter, save_meta_adapter
from training.meta_ft.train import MetaFTTrainConfig, main, meta_objective, outer_example
from training.models import ModelSettings, load_causal_lm, tiny_causal_lm
from training.token_batches import document_batch

from tests.meta_fixtures import FACTS, write_tiny_base_model, write_tiny_meta_init, write_tiny_squad

EXAMPLES = [(text, qas) for _, text, qas in FACTS[:2]]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _log_lr(lr: float, learn: bool = False) -> torch.Tensor:
    return torch.tensor(math.log(lr), requires_grad=learn)


def _model(variant: str, seed: int = 0):
    base, tok = tiny_causal_lm("llama", seed=seed)
    base.requires_grad_(False)
    config = MetaAdapterConfig(variant=variant, rank=4, top_layers=1, inner_lr=0.3)
    model, meta = attach(enable_double_backward(base), config)
    return model, tok, meta, config


@pytest.mark.parametrize("variant", ["lora", "rank1_full"])
def test_init_starts_as_the_base_model_and_gets_meta_gradients(variant):
    model, tok, meta, config = _model(variant)
    reference, _ = tiny_causal_lm("llama")
    doc = document_batch(tok, [EXAMPLES[0][0]])
    start = inner_params(model, meta, variant)
    torch.testing.assert_close(forward_logits(model, start, doc), reference(input_ids=doc.input_ids).logits)
    if variant == "rank1_full":  # the inner step updates full weight matrices of the top block only
        assert all(".layers.1." in name and name.endswith(".weight") for name in start)
    cfg = MetaFTTrainConfig(squad="unused", target="gold", questions_per_doc=2, adapter=config)
    example = outer_example(model, tok, EXAMPLES[:1], EXAMPLES[1][0], cfg)
    loss, stats = meta_objective(model, meta, variant, example, cfg.inner(), _log_lr(config.inner_lr))
    grads = torch.autograd.grad(loss, list(meta.values()), allow_unused=True)
    zero_init = [name for name in meta if name.endswith("::B") or "lora_B" in name]
    assert all(g is not None and g.abs().max() > 0 for n, g in zip(meta, grads) if n in zero_init)
    assert stats["outer_after"] != pytest.approx(stats["outer_before"])  # the inner step did something


@pytest.mark.parametrize("target,optimizer", [("gold", "sgd"), ("teacher", "sgd"), ("gold", "adam")])
def test_meta_training_over_a_stream_lowers_the_outer_loss(target, optimizer):
    """Two paragraphs learned in sequence from the init (SGD, or Adam as the harness's stream takes
    them), questions about both: outer steps on the init and the log-lr lower the loss."""
    model, tok, meta, config = _model("lora")
    config = config.model_copy(update={"optimizer": optimizer, "inner_lr": 0.3 if optimizer == "sgd" else 0.01})
    cfg = MetaFTTrainConfig(squad="unused", target=target, questions_per_doc=1, teacher_max_tokens=4,
                            adapter=config, stream_documents=2, c_kl=0.1)
    example = outer_example(model, tok, [(text, qas[:1]) for text, qas in EXAMPLES[:2]], FACTS[3][1], cfg)
    if target == "teacher":  # each question's teacher answered from its own paragraph: a KL target
        assert example.teacher_logp.shape[0] == int((example.qa.labels[:, 1:] != -100).sum())
    assert len(example.docs) == 2 and example.qa.input_ids.shape[0] == 2  # one question about each paragraph
    log_lr = _log_lr(config.inner_lr, learn=True)
    # the tiny model's prompted and unprompted answers are close (KL ~1e-3): smaller outer steps
    optimizer_ = torch.optim.Adam([{"params": list(meta.values()), "lr": 3e-2 if target == "gold" else 3e-3},
                                   {"params": [log_lr], "lr": 1e-2}])
    losses = []
    for _ in range(6):
        optimizer_.zero_grad()
        loss, stats = meta_objective(model, meta, "lora", example, cfg.inner(), log_lr, cfg.c_kl)
        loss.backward(inputs=[*meta.values(), log_lr])
        assert log_lr.grad is not None and log_lr.grad.abs() > 0  # the lr is learned with the init
        optimizer_.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert stats["lr"] != pytest.approx(config.inner_lr, rel=1e-4)


@pytest.mark.parametrize("variant", ["lora", "rank1_full"])
def test_artifact_round_trip(tmp_path, variant):
    model, tok, meta, config = _model(variant)
    with torch.no_grad():
        for p in meta.values():
            p.normal_(0, 0.1)
    doc = document_batch(tok, [EXAMPLES[0][0]])
    expected = forward_logits(model, inner_params(model, meta, variant), doc)
    save_meta_adapter(tmp_path / "m", model, meta, config, base_model_id="tiny", base_config=model.config)
    fresh, _ = tiny_causal_lm("llama")
    loaded, params, loaded_config = load_meta_adapter(tmp_path / "m", fresh)
    assert loaded_config == config
    torch.testing.assert_close(loaded(input_ids=doc.input_ids).logits, expected)
    assert params and all(p.requires_grad for p in params.values())


def test_recipe_trains_saves_and_resumes_and_the_learned_lr_is_used_online(tmp_path):
    from training.updaters import load_updater
    from training.updates import UpdateConfig

    squad = write_tiny_squad(tmp_path / "squad.json")
    base_dir = write_tiny_base_model(tmp_path / "base")
    out = tmp_path / "meta"
    common = ["--squad", str(squad), "--out", str(out), "--base-model", str(base_dir), "--device", "cpu",
              "--adapter", '{"variant": "lora", "optimizer": "adam", "rank": 2, "top_layers": 1, "inner_lr": 0.01}',
              "--target", "teacher", "--teacher-max-tokens", "3", "--stream-documents", "2",
              "--questions-per-doc", "1", "--examples-per-update", "1", "--val-examples", "1",
              "--eval-every", "2", "--checkpoint-every", "1", "--outer-lr", "1e-2", "--lr-outer-lr", "0.1"]
    main(common + ["--max-updates", "2"])
    metrics = tmp_path / "meta-run" / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["update"] for r in records if "train" in r] == [1, 2]
    assert math.isfinite(records[-1]["final_val"]["outer_after"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "meta_ft_init" and manifest["config"]["adapter"]["variant"] == "lora"
    main(common + ["--max-updates", "3"])
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["update"] for r in records if "train" in r] == [1, 2, 3]
    manifest = json.loads((out / "manifest.json").read_text())
    learned = manifest["config"]["adapter"]["inner_lr"]
    assert learned == pytest.approx(manifest["metrics"]["learned_lr"])
    assert learned != pytest.approx(0.01, rel=1e-3)  # three outer steps of 0.1 on log(lr) moved it
    assert learned == pytest.approx(records[-1]["final_val"]["lr"])
    base, _ = load_causal_lm(str(base_dir), ModelSettings(device="cpu"))
    loaded, params, _ = load_meta_adapter(out, base)
    assert any(p.abs().max() > 0 for n, p in params.items() if "lora_B" in n)  # trained away from B = 0
    # the online update (training.updates, the service's and the harness's) runs Adam at the learned lr
    fresh, tok = load_causal_lm(str(base_dir), ModelSettings(device="cpu"))
    spec = load_updater(out, fresh, tok, UpdateConfig(optimizer="sgd", lr=5.0))
    assert spec.config.optimizer == "adam" and spec.config.lr == learned
    from training.updates import LoraUpdater

    updater = LoraUpdater(fresh, tok, spec.token_weights, spec.config, initial=spec.initial)
    assert isinstance(updater.optimizer, torch.optim.Adam) and updater.optimizer.param_groups[0]["lr"] == learned
    assert updater.step(FACTS[0][1]).accepted


def test_meta_training_warm_starts_from_a_saved_init_and_its_lr(tmp_path):
    """``--init``: a stream run continues from an artifact's tensors (a one-document init) with the
    adapter it was trained as: with no update and its lr, its validation is the artifact's own."""
    squad = write_tiny_squad(tmp_path / "squad.json")
    base_dir = write_tiny_base_model(tmp_path / "base")
    common = ["--squad", str(squad), "--base-model", str(base_dir), "--device", "cpu", "--target", "gold",
              "--questions-per-doc", "1", "--val-examples", "1", "--eval-every", "5", "--checkpoint-every", "1",
              "--outer-lr", "5e-2", "--lr-outer-lr", "0.1"]
    main(common + ["--out", str(tmp_path / "first"), "--stream-documents", "2", "--max-updates", "2",
                   "--adapter", '{"variant": "lora", "optimizer": "sgd", "rank": 2, "top_layers": 1, "inner_lr": 0.3}'])
    first = json.loads((tmp_path / "first" / "manifest.json").read_text())
    adapter = json.dumps(first["config"]["adapter"])
    main(common + ["--out", str(tmp_path / "warm"), "--stream-documents", "2", "--max-updates", "0",
                   "--init", str(tmp_path / "first"), "--adapter", adapter])
    warm = json.loads((tmp_path / "warm" / "manifest.json").read_text())
    assert warm["config"]["adapter"] == first["config"]["adapter"]
    assert warm["metrics"]["val"]["outer_after"] == pytest.approx(first["metrics"]["val"]["outer_after"], rel=1e-5)
    # the same adapter and lr from B = 0 validates differently: the warm run did read the tensors
    main(common + ["--out", str(tmp_path / "cold"), "--stream-documents", "2", "--max-updates", "0",
                   "--adapter", adapter])
    cold = json.loads((tmp_path / "cold" / "manifest.json").read_text())
    assert cold["metrics"]["val"]["outer_after"] != pytest.approx(first["metrics"]["val"]["outer_after"], rel=1e-3)
    with pytest.raises(ValueError, match="was trained as"):  # another rank: refused, not silently cut
        main(common + ["--out", str(tmp_path / "bad"), "--init", str(tmp_path / "first"), "--max-updates", "0",
                       "--adapter", '{"variant": "lora", "optimizer": "sgd", "rank": 4, "top_layers": 1}'])


@pytest.mark.parametrize("variant", ["lora", "rank1_full"])
def test_meta_ft_in_the_harness_steps_per_group_and_restores_the_base(tmp_path, variant):
    from training.data.evalset import EvalSet
    from training.eval.harness import ProtocolConfig, run_method
    from training.methods import MethodConfig, MethodContext, build_method
    from training.types import Document, Question

    write_tiny_meta_init(tmp_path / "m", MetaAdapterConfig(variant=variant, rank=4, top_layers=1, inner_lr=0.3))
    base, tok = tiny_causal_lm("llama")
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    ctx = MethodContext(base, tok, MethodConfig(max_new_tokens=3, meta_ft_artifact=str(tmp_path / "m")))
    docs = [Document(f"d{i}", text) for i, (_, text, _) in enumerate(FACTS[:5])]
    questions = [Question("q", "How many libraries?", ("12",), ("d0",))]
    method = build_method("meta_ft_4", ctx)
    start = [p.detach().clone() for p in method.updater.params]
    for doc in docs[:4]:
        method.ingest(doc)
    assert method.updater.steps == 1  # four documents, one pooled SGD step
    assert any(not torch.equal(a, p) for a, p in zip(start, method.updater.params))
    method.ingest(docs[4])
    assert method.updater.steps == 1 and len(method.pending) == 1
    method.answer(questions)  # a partial group is learned before answering
    assert method.updater.steps == 2
    method.close()
    for name, p in base.named_parameters():
        torch.testing.assert_close(p, before[name])
    run = run_method(build_method("meta_ft", ctx), EvalSet("tiny", "test", docs[:2], questions),
                     ProtocolConfig(latency_samples=1, score_choices=False), progress=False)
    assert 0.0 <= run.f1 <= 100.0


def test_meta_ft_isolated_answers_each_question_from_its_own_document_then_restores_the_init(tmp_path):
    from training.methods import MethodConfig, MethodContext, build_method
    from training.types import Document, Question

    model, tok, meta, config = _model("lora")
    with torch.no_grad():
        for p in meta.values():
            p.normal_(0, 0.1)
    save_meta_adapter(tmp_path / "m", model, meta, config, base_model_id="tiny", base_config=model.config)
    base, tok = tiny_causal_lm("llama")
    ctx = MethodContext(base, tok, MethodConfig(max_new_tokens=4, meta_ft_artifact=str(tmp_path / "m")))
    docs = [Document(f"d{i}", text) for i, (_, text, _) in enumerate(FACTS[:3])]
    questions = [Question("q1", "How many libraries?", ("12",), ("d1",)),
                 Question("q0", "Who won?", ("x",), ("d0",))]

    isolated = build_method("meta_ft_isolated", ctx)
    init = [p.detach().clone() for p in isolated.updater.params]
    for doc in docs:
        isolated.ingest(doc)
    assert isolated.updater.steps == 0  # nothing is learned until a question about a document comes
    answers = isolated.answer(questions)
    assert isolated.updater.steps == 2  # one step per question's document, from the init each time
    assert all(torch.equal(a, p) for a, p in zip(init, isolated.updater.params))
    isolated.close()

    # the same as a stream method that saw only that one document
    for question, answer in zip(questions, answers):
        single = build_method("meta_ft", ctx)
        single.ingest(next(d for d in docs if d.id == question.doc_ids[0]))
        assert single.answer([question]) == [answer]
        single.close()


def test_harness_chooses_the_meta_ft_sgd_lr_on_the_validation_stream(tmp_path):
    from training.eval.cli import main as eval_main

    model, _, meta, config = _model("lora")
    save_meta_adapter(tmp_path / "m", model, meta, config, base_model_id="tiny", base_config=model.config)
    out = tmp_path / "r.json"
    result = eval_main(["--quick", "--dataset", "squad-seq", "--data", str(write_tiny_squad(tmp_path / "s.json")),
                        "--out", str(out), "--no-progress", "--methods", "meta_ft,meta_ft_isolated",
                        "--meta-ft-artifact", str(tmp_path / "m"), "--meta-ft-lr-grid", "0.01,0.1"])
    selection = result["config"]["lr_selection"]
    assert set(selection) == {"meta_ft"}  # the isolated protocol keeps the meta-trained lr
    assert selection["meta_ft"]["chosen"] in (0.01, 0.1) and set(selection["meta_ft"]["val_f1"]) == {"0.01", "0.1"}
    assert set(result["methods"]) == {"meta_ft", "meta_ft_isolated"}
    from training.methods import MethodConfig, MethodContext, build_method

    base, tok = tiny_causal_lm("llama")
    for lr, expected in ((None, config.inner_lr), (0.05, 0.05)):
        method = build_method("meta_ft", MethodContext(base, tok, MethodConfig(
            meta_ft_artifact=str(tmp_path / "m"), meta_ft_lr=lr)))
        assert method.updater.optimizer.param_groups[0]["lr"] == expected
        method.close()
