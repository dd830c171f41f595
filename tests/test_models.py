import pytest
import torch

from training.models import (
    ModelNotAvailableError,
    ModelSettings,
    converted_builtin_path,
    embed_texts,
    load_causal_lm,
    load_encoder,
    resolve_dtype,
    tiny_causal_lm,
)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_tiny_models_generate_and_train(kind):
    model, tokenizer = tiny_causal_lm(kind)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Who approved the bridge?"}], add_generation_prompt=True,
        return_tensors="pt", return_dict=True,
    )["input_ids"]
    out = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 4)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_tiny_models_are_seeded():
    a, _ = tiny_causal_lm("llama", seed=3)
    b, _ = tiny_causal_lm("llama", seed=3)
    c, _ = tiny_causal_lm("llama", seed=4)
    pa, pb, pc = (next(m.parameters()) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


def test_local_path_loads_like_a_hub_model(tiny_model_dir):
    model, tokenizer = load_causal_lm(str(tiny_model_dir), ModelSettings(device="cpu"))
    assert model.config.model_type == "llama" and not model.training
    assert tokenizer.pad_token is not None and tokenizer.chat_template


def test_unknown_model_gives_clear_error(tmp_path):
    with pytest.raises(ModelNotAvailableError, match="neither a built-in name"):
        load_causal_lm("no-such-org/no-such-model", ModelSettings(cache_dir=tmp_path))


def test_dtype_follows_device():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int3", torch.device("cpu"))


@pytest.mark.real_model
def test_builtin_smollm2_converts_once_and_answers(tmp_path):
    settings = ModelSettings(cache_dir=tmp_path)
    path = converted_builtin_path("smollm2-135m-instruct", tmp_path)
    assert (path / "model.safetensors").exists() and not list(path.parent.glob(".smollm2*"))
    mtime = (path / "model.safetensors").stat().st_mtime
    model, tokenizer = load_causal_lm("smollm2-135m-instruct", settings)
    assert (path / "model.safetensors").stat().st_mtime == mtime  # second load reads the cache
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True,
        return_tensors="pt", return_dict=True,
    )["input_ids"]
    out = model.generate(input_ids=ids, max_new_tokens=12, do_sample=False)
    assert "paris" in tokenizer.decode(out[0, ids.shape[1]:]).lower()


@pytest.mark.real_model
def test_builtin_encoder_embeds_by_meaning():
    encoder, tokenizer = load_encoder()
    vectors = embed_texts(encoder, tokenizer, ["A cat sat on the mat.", "A kitten rested on a rug.", "Stock markets fell sharply."])
    assert vectors.shape == (3, 384)
    assert torch.allclose(vectors.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.2
