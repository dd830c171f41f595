"""The trained artifacts that ship in artifacts/: small, loadable on the real base model they were
trained on, and refused with a clear error on another base or another QA-format tuning."""

from __future__ import annotations

import pytest

from training.artifacts import (
    MANIFEST, SHIPPED_DIR, SHIPPED_KINDS, WEIGHTS, ArtifactError, load_artifact, read_manifest,
)
from training.models import DEFAULT_BASE_MODEL, tiny_causal_lm

SHIPPED = {kind: SHIPPED_DIR / kind / DEFAULT_BASE_MODEL for kind in SHIPPED_KINDS}


def test_every_artifact_ships_with_a_complete_manifest_and_fits_the_budget():
    total = 0
    for kind, path in SHIPPED.items():
        assert (path / MANIFEST).is_file() and (path / WEIGHTS).is_file(), f"{kind} does not ship"
        manifest = read_manifest(path)
        assert manifest.base_model == DEFAULT_BASE_MODEL
        assert manifest.command and manifest.training_data, f"{kind}: the manifest must say how it was made"
        if kind != "qa-format":  # trained on the QA-tuned base, and say so
            assert manifest.training_data.get("qa_tuning_fingerprint"), kind
            assert manifest.metrics, kind
        total += sum(f.stat().st_size for f in path.iterdir())
    assert total <= 60 * 2**20, f"shipped artifacts take {total / 2**20:.1f} MB (budget 60 MB)"


@pytest.mark.real_model
def test_shipped_artifacts_load_on_the_real_base_and_are_refused_elsewhere():
    from training.camels.weighting_model import load_weighting_model
    from training.mac.runtime import load_mac_runtime
    from training.memory import InMemoryMemoryBank
    from training.meta_ft.adapter import read_meta_init
    from training.models import load_causal_lm
    from training.qa_tuning import apply_qa_tuning
    from training.updaters import load_updater
    from training.updates import LoraUpdater, UpdateConfig

    untuned, tokenizer = load_causal_lm()
    base = apply_qa_tuning(load_causal_lm()[0], SHIPPED["qa-format"])
    runtime = load_mac_runtime(SHIPPED["mac"], base, tokenizer, InMemoryMemoryBank())
    runtime.memorize(["d"], ["The Saltmarsh Bridge will cost 42 million crowns, the council said on Tuesday."])
    ((answer, read),) = runtime.answer(base, ["How much will the Saltmarsh Bridge cost?"], max_new_tokens=12)
    assert read == ["d"] and "42 million" in answer
    weights = load_weighting_model(SHIPPED["camels"], base)
    ids = tokenizer("The council approved 42 million crowns.", return_tensors="pt")["input_ids"]
    assert weights(ids).shape == ids.shape
    config, tensors = read_meta_init(SHIPPED["meta-ft"], base.config)
    spec = load_updater(SHIPPED["meta-ft"], base, tokenizer, UpdateConfig())
    updater = LoraUpdater(base, tokenizer, spec.token_weights, spec.config, initial=spec.initial)
    assert updater.step("The council approved the Saltmarsh Bridge.").accepted and config.variant == "lora"
    updater.unload()

    for kind, path in SHIPPED.items():
        if kind == "qa-format":
            continue
        with pytest.raises(ArtifactError, match="no QA-format tuning"):  # the right model, untuned
            if kind == "mac":
                load_mac_runtime(path, untuned, tokenizer, InMemoryMemoryBank())
            elif kind == "camels":
                load_weighting_model(path, untuned)
            else:
                read_meta_init(path, untuned.config)
    other, _ = tiny_causal_lm()  # another base model altogether
    for path in SHIPPED.values():
        with pytest.raises(ArtifactError, match="trained for base model 'smollm2-135m-instruct'"):
            load_artifact(path, kind=read_manifest(path).kind, base_config=other.config)
    assert tensors
