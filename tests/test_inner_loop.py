"""The math of the functional inner loop, on tiny random models."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from training.inner_loop import (
    enable_double_backward,
    InnerLoopConfig,
    inner_update,
    kl_from_base,
    kl_to_teacher,
    labelled_logprobs,
    select_params,
    weighted_nll,
)
from training.models import tiny_causal_lm
from training.token_batches import document_batch, qa_batch

DOC = "In 2031 the city of Norvale opened 12 libraries and 3 museums."
OTHER = "Scientists at the Aurora Institute reported a record harvest of kelp."


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_lora(kind: str = "llama", dtype: torch.dtype = torch.float32, seed: int = 0):
    model, tok = tiny_causal_lm(kind, seed=seed)
    targets = ["q_proj", "v_proj", "down_proj"] if kind == "llama" else ["c_attn", "c_proj"]
    torch.manual_seed(seed + 1)
    # init_lora_weights=False: B is random too, so the first step also moves A (a fair test).
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                            init_lora_weights=False))
    return enable_double_backward(peft.to(dtype).eval()), tok


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_uniform_weighted_nll_is_the_ordinary_lm_loss(kind):
    model, tok = tiny_causal_lm(kind)
    batch = document_batch(tok, [DOC, OTHER])
    ours = weighted_nll(model, select_params(model, "all"), batch)
    ref = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
    torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize("which,kind", [("lora", "llama"), ("lora", "gpt2"), ("all", "llama")])
def test_functional_steps_equal_torch_sgd_steps(which, kind):
    """k unrolled functional steps == k steps of torch.optim.SGD on the same parameters."""
    if which == "lora":
        model, tok = tiny_lora(kind)
    else:
        model, tok = tiny_causal_lm(kind)
    batch = document_batch(tok, [DOC, OTHER])
    weights = torch.rand(batch.input_ids.shape, generator=torch.Generator().manual_seed(0)) * 3
    cfg = InnerLoopConfig(lr=0.05, steps=3)
    params = select_params(model, which)
    start = {n: p.detach().clone() for n, p in params.items()}
    updated = inner_update(model, params, batch, weights, cfg, create_graph=False)

    optim = torch.optim.SGD(list(params.values()), lr=cfg.lr)
    for _ in range(cfg.steps):
        optim.zero_grad()
        loss = weighted_nll(model, dict(model.named_parameters()), batch, weights)
        loss.backward()
        optim.step()
    moved = 0.0
    for name, p in params.items():
        torch.testing.assert_close(updated[name], p.detach(), rtol=1e-4, atol=1e-6)
        moved = max(moved, (p.detach() - start[name]).abs().max().item())
    assert moved > 1e-4  # the step really changed the parameters


def _outer_setup():
    # GPT-2 style: Llama's RMSNorm and eager softmax compute in float32 even in a float64 model,
    # which would drown the finite differences in rounding noise.
    torch.manual_seed(0)
    model, tok = tiny_lora("gpt2", dtype=torch.float64)
    doc = document_batch(tok, [DOC], max_tokens=14)
    qa = qa_batch(tok, ["How many libraries opened?"], ["12"])
    return model, tok, doc, qa


def test_outer_gradient_wrt_token_weights_matches_finite_differences():
    """CaMeLS: d QA-loss(after a weighted step) / d weights, checked by gradcheck in float64."""
    model, _, doc, qa = _outer_setup()
    params = {n: p.detach() for n, p in select_params(model, "lora").items()}
    for p in params.values():
        p.requires_grad_(True)
    cfg = InnerLoopConfig(lr=0.5, steps=2)

    def outer(weights):
        updated = inner_update(model, params, doc, weights, cfg)
        return weighted_nll(model, updated, qa)

    weights = torch.rand(doc.input_ids.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    weights.requires_grad_(True)
    (grad,) = torch.autograd.grad(outer(weights), weights)
    assert grad[0, 0] == 0  # the first token is never a target
    assert (grad[:, 1:].abs() > 0).all()  # every other token's weight gets an outer gradient
    eps = 1e-6
    numeric = torch.zeros_like(weights)
    for t in (1, 4, 8, weights.shape[1] - 1):  # a few positions keep the test quick
        bump = torch.zeros_like(weights)
        bump[0, t] = eps
        numeric[0, t] = (outer(weights.detach() + bump) - outer(weights.detach() - bump)).detach() / (2 * eps)
    checked = [1, 4, 8, weights.shape[1] - 1]
    torch.testing.assert_close(grad[0, checked], numeric[0, checked], rtol=1e-5, atol=1e-8)


def test_outer_gradient_wrt_initial_params_matches_finite_differences():
    """MAML: d QA-loss(after a step) / d LoRA init, along a random direction, vs central differences."""
    model, _, doc, qa = _outer_setup()
    init = {n: p.detach().clone().requires_grad_(True) for n, p in select_params(model, "lora").items()}
    cfg = InnerLoopConfig(lr=0.5, steps=1)

    def outer(params):
        return weighted_nll(model, inner_update(model, params, doc, None, cfg), qa)

    grads = torch.autograd.grad(outer(init), list(init.values()))
    assert all(g.abs().max() > 0 for g in grads)
    gen = torch.Generator().manual_seed(2)
    direction = {n: torch.randn(p.shape, dtype=p.dtype, generator=gen) for n, p in init.items()}
    analytic = sum((g * direction[n]).sum() for g, n in zip(grads, init))
    eps = 1e-5
    plus = {n: (p + eps * direction[n]).detach().requires_grad_(True) for n, p in init.items()}
    minus = {n: (p - eps * direction[n]).detach().requires_grad_(True) for n, p in init.items()}
    numeric = (outer(plus) - outer(minus)) / (2 * eps)
    torch.testing.assert_close(analytic.detach(), numeric.detach(), rtol=1e-5, atol=1e-8)


def test_kl_is_zero_when_nothing_changed_and_positive_after_a_step():
    model, tok = tiny_lora("llama")
    params = select_params(model, "lora")
    probe = document_batch(tok, [OTHER])
    assert kl_from_base(model, params, params, probe).item() == pytest.approx(0.0, abs=1e-7)
    doc = document_batch(tok, [DOC])
    zero_step = inner_update(model, params, doc, torch.zeros(doc.input_ids.shape), InnerLoopConfig(lr=0.1))
    assert kl_from_base(model, params, zero_step, probe).item() == pytest.approx(0.0, abs=1e-7)
    moved = inner_update(model, params, doc, None, InnerLoopConfig(lr=0.5))
    kl = kl_from_base(model, params, moved, probe)
    assert kl.item() > 1e-6
    # the KL term sends a gradient into the update (it can pull the update back)
    grads = torch.autograd.grad(kl, [p for p in params.values()], allow_unused=True)
    assert any(g is not None and g.abs().max() > 0 for g in grads)


def test_kl_to_teacher_lines_up_answer_tokens_behind_different_prompts():
    model, tok = tiny_lora("llama")
    params = select_params(model, "lora")
    answer = tok("12", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    student = qa_batch(tok, ["How many libraries?"], [answer])
    teacher = qa_batch(tok, ["How many libraries?"], [answer], passages=[[DOC]])
    assert student.input_ids.shape[1] < teacher.input_ids.shape[1]
    with torch.no_grad():
        same = labelled_logprobs(model, params, student)
        prompted = labelled_logprobs(model, params, teacher)
    assert same.shape == prompted.shape == (len(answer), len(tok))
    assert kl_to_teacher(model, params, student, same).item() == pytest.approx(0.0, abs=1e-6)
    assert kl_to_teacher(model, params, student, prompted).item() > 0
