"""QA-format tuning on a tiny model: it learns the short-answer format, saves an artifact, and
merging that artifact reproduces the tuned model (and refuses another base model)."""

import pytest
import torch

from training.artifacts import ArtifactError, load_artifact, save_artifact
from training.data.evalset import EvalSet
from training.models import tiny_causal_lm
from training.qa_tuning import (
    KIND, QATuningConfig, apply_qa_tuning, collate, encode_example, qa_examples, tune_qa_format,
)
from training.types import Document, Question


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def toy_train_set():
    docs = [Document(f"d{i}", f"In 20{i}0 the city opened {i} libraries.") for i in range(4)]
    questions = [Question(f"q{i}", f"How many libraries opened in 20{i}0?", (f"{i}", f"{i} libraries"), (f"d{i}",))
                 for i in range(4)]
    return EvalSet("toy", "train", docs, questions)


def answer_nll(model, tokenizer, examples):
    batch = collate([encode_example(tokenizer, m, a) for m, a in examples], tokenizer.pad_token_id)
    with torch.no_grad():
        return model(**batch).loss.item()


def test_examples_mix_context_and_no_context_with_shortest_gold():
    cfg = QATuningConfig(n_examples=4, context_fraction=0.5, injection_fraction=0.0)
    examples = qa_examples(toy_train_set(), cfg)
    with_context = [m for m, _ in examples if "<documents>" in m[-1]["content"]]
    assert len(examples) == 4 and len(with_context) == 2
    assert all(len(a) == 1 for _, a in examples)  # "3", not "3 libraries"


def test_injected_instructions_in_the_context_keep_the_gold_answer_as_target():
    import json
    from pathlib import Path

    from training.qa_tuning import CANARY_WORDS

    train = toy_train_set()
    examples = qa_examples(train, QATuningConfig(n_examples=4, context_fraction=0.5, injection_fraction=1.0))
    injected = [(m[-1]["content"], a) for m, a in examples if any(w in m[-1]["content"] for w in CANARY_WORDS)]
    assert len(injected) == 4  # every example, with or without its paragraph
    assert all(content.startswith("<documents>") for content, _ in injected)  # inside the untrusted block
    assert sorted(a for _, a in injected) == ["0", "1", "2", "3"]  # the target is still the gold answer
    probes = json.loads((Path(__file__).parents[1] / "examples" / "prompt_injections.json").read_text())
    canaries = {p["canary"].split("-")[0] for p in probes["injections"]}
    assert not canaries & set(CANARY_WORDS)  # trained on other canaries than the measured probes


def test_labels_cover_only_the_answer():
    _, tokenizer = tiny_causal_lm()
    ids, labels = encode_example(tokenizer, [{"role": "user", "content": "Q?"}], "Lima")
    answer = [t for t in labels if t != -100]
    assert len(ids) == len(labels) and tokenizer.decode(answer[:-1]) == "Lima"
    assert answer[-1] == tokenizer.eos_token_id


def test_tuning_lowers_answer_loss_and_round_trips_through_an_artifact(tmp_path):
    model, tokenizer = tiny_causal_lm()
    train = toy_train_set()
    cfg = QATuningConfig(n_examples=4, batch_size=2, lr=1e-2, warmup_steps=1, lora_top_layers=1)
    examples = qa_examples(train, cfg)
    before = answer_nll(model, tokenizer, examples)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    weights = tune_qa_format(model, tokenizer, train, cfg, progress=False)
    assert all(torch.equal(reference[k], v) for k, v in model.state_dict().items())  # base untouched
    assert weights and all("lora_" in k for k in weights)
    assert all(".layers.1." in k for k in weights)  # only the top layer was adapted
    save_artifact(tmp_path / "qa", kind=KIND, tensors=weights, base_model="tiny-llama",
                  base_config=model.config, config=cfg.model_dump())
    tuned = apply_qa_tuning(model, tmp_path / "qa")
    assert answer_nll(tuned, tokenizer, examples) < before

    # an artifact trained on the tuned base names the tuning: refused on the untuned base
    save_artifact(tmp_path / "on-tuned", kind="mac", tensors={"w": torch.zeros(1)}, base_model="tiny-llama",
                  base_config=tuned.config)
    load_artifact(tmp_path / "on-tuned", kind="mac", base_config=tuned.config)
    untuned, _ = tiny_causal_lm()
    fingerprint = tuned.config.qa_tuning
    with pytest.raises(ArtifactError, match=rf"QA-format tuning {fingerprint}\), but the loaded base model has config hash \w+ and no QA"):
        load_artifact(tmp_path / "on-tuned", kind="mac", base_config=untuned.config)

    other, _ = tiny_causal_lm("gpt2")
    with pytest.raises(ArtifactError, match="trained for base model"):
        apply_qa_tuning(other, tmp_path / "qa")


def test_tuning_resumes_from_its_checkpoint(tmp_path):
    model, tokenizer = tiny_causal_lm()
    cfg = QATuningConfig(n_examples=4, batch_size=1, lr=1e-2, warmup_steps=1, checkpoint_every=2)

    class Stop(Exception):
        pass

    import training.qa_tuning as qt
    original = qt.collate
    calls = {"n": 0}

    def failing_collate(rows, pad):
        calls["n"] += 1
        if calls["n"] == 3:
            raise Stop
        return original(rows, pad)

    qt.collate = failing_collate
    try:
        with pytest.raises(Stop):
            tune_qa_format(model, tokenizer, toy_train_set(), cfg, checkpoint_dir=tmp_path, progress=False)
    finally:
        qt.collate = original
    assert (tmp_path / "qa_tuning_checkpoint.pt").exists()
    state = torch.load(tmp_path / "qa_tuning_checkpoint.pt", weights_only=False)
    assert state["step"] == 2


@pytest.mark.real_model
def test_committed_qa_artifact_makes_smollm2_answer_with_a_short_span():
    from pathlib import Path

    from training.generation import generate_answer
    from training.models import load_causal_lm
    from training.prompts import qa_messages

    artifact = Path(__file__).resolve().parent.parent / "artifacts" / "qa-format" / "smollm2-135m-instruct"
    model, tokenizer = load_causal_lm("smollm2-135m-instruct")
    model = apply_qa_tuning(model, artifact)
    passage = "On Tuesday the Norvale city council approved a new harbour bridge costing 40 million euros."
    answer = generate_answer(model, tokenizer, qa_messages("How much will the harbour bridge cost?", [passage]))
    assert "40 million" in answer and len(answer.split()) <= 5
