"""Packed fp32 linear layers (``training.packed_linear``): the same outputs as ``nn.Linear`` within
float rounding, a row's output independent of the rows beside it, training untouched, a changed
weight packed again, and models that still copy and pickle."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from training.models import ModelSettings, load_causal_lm, tiny_causal_lm
from training.packed_linear import _PACKS, PackedLinear, pack_cpu_linears, packing_available

pytestmark = pytest.mark.skipif(not packing_available(), reason="this PyTorch has no oneDNN linear ops")


def packed_layer(bias: bool = True, seed: int = 0) -> tuple[nn.Linear, nn.Linear]:
    """A packed layer and a plain copy of it."""
    torch.manual_seed(seed)
    plain = nn.Linear(48, 40, bias=bias)
    layer = copy.deepcopy(plain)
    assert pack_cpu_linears(layer) == 1 and type(layer) is PackedLinear
    return layer, plain


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 48), (3, 7, 48)])
def test_a_packed_layer_computes_what_linear_does(bias, shape):
    layer, plain = packed_layer(bias)
    x = torch.randn(shape)
    with torch.no_grad():
        out = layer(x)
    assert layer in _PACKS  # the packed path ran, not the fallback
    torch.testing.assert_close(out, plain(x).detach(), rtol=1e-5, atol=1e-5)
    wide = torch.zeros(*shape[:-1], 2 * shape[-1])
    wide[..., ::2] = x
    strided = wide[..., ::2]  # the same values, not contiguous
    assert not strided.is_contiguous()
    with torch.no_grad():
        torch.testing.assert_close(layer(strided), out)


def test_a_rows_output_is_the_same_alone_and_in_a_batch():
    layer, _ = packed_layer()
    x = torch.randn(8, 48)
    with torch.no_grad():
        together = layer(x)
        assert all(torch.equal(layer(x[i:i + 1]), together[i:i + 1]) for i in range(8))


def test_with_gradients_or_autocast_the_layer_is_plain_linear():
    layer, plain = packed_layer()
    x = torch.randn(4, 48)
    out = layer(x)
    out.square().sum().backward()
    plain(x).square().sum().backward()
    assert layer not in _PACKS
    assert torch.equal(layer.weight.grad, plain.weight.grad) and torch.equal(layer.bias.grad, plain.bias.grad)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16


def test_a_weight_changed_in_place_or_replaced_is_packed_again():
    layer, _ = packed_layer()
    x = torch.randn(4, 48)

    def expected() -> torch.Tensor:
        return torch.nn.functional.linear(x, layer.weight, layer.bias).detach()

    with torch.no_grad():
        layer(x)
        layer.weight.mul_(2)  # in place, as an optimizer step or a loaded state dict
        torch.testing.assert_close(layer(x), expected())
    layer.weight.data = torch.randn(40, 48)  # replaced, as PEFT's safe merge does
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected())


def test_a_packed_model_copies_and_pickles_and_its_copy_answers_alike():
    model, tokenizer = tiny_causal_lm()
    ids = tokenizer("a question about the news", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits  # packs every layer
    assert sum(type(m) is PackedLinear for m in model.modules()) > 0
    assert any(m in _PACKS for m in model.modules())
    twin = copy.deepcopy(model)
    pickle.loads(pickle.dumps(model))
    with torch.no_grad():
        assert torch.equal(twin(ids).logits, logits)


@pytest.mark.parametrize("packed", [True, False])
def test_load_causal_lm_packs_the_linear_layers_only_when_asked(tmp_path, packed):
    model, tokenizer = tiny_causal_lm(cpu_packed_linears=False)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, _ = load_causal_lm(str(tmp_path), ModelSettings(device="cpu", cpu_packed_linears=packed))
    kinds = {type(m) for m in loaded.modules() if isinstance(m, nn.Linear)}
    assert kinds == ({PackedLinear} if packed else {nn.Linear})


def test_a_weight_substituted_for_a_call_is_used_and_the_own_one_comes_back():
    layer, _ = packed_layer()
    x = torch.randn(4, 48)
    other = {"weight": torch.randn(40, 48), "bias": torch.randn(40)}
    with torch.no_grad():
        own = layer(x)
        substituted = torch.func.functional_call(layer, other, (x,))
        torch.testing.assert_close(substituted, torch.nn.functional.linear(x, other["weight"], other["bias"]))
        torch.testing.assert_close(layer(x), own)
