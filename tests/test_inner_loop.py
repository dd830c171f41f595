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
    stream_update,
    weighted_nll,
)
from training.lora import LoraSpec
from training.models import tiny_causal_lm
from training.token_batches import document_batch, qa_batch
from training.updates import LoraUpdater, UpdateConfig

DOC = "In 2031 the city of Norvale opened 12 libraries and 3 museums."
OTHER = "Scientists at the Aurora Institute reported a record harvest of kelp."
STREAM = [DOC, OTHER, "The council approved the new harbour bridge on Tuesday."]


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

    _check_directional_derivative(outer, init, seed=2, eps=1e-5, atol=1e-8)


def _check_directional_derivative(outer, init: dict, seed: int, eps: float, atol: float) -> None:
    """The autograd gradient of ``outer`` at ``init`` along a random direction == central differences."""
    grads = torch.autograd.grad(outer(init), list(init.values()))
    assert all(g.abs().max() > 0 for g in grads)
    gen = torch.Generator().manual_seed(seed)
    direction = {n: torch.randn(p.shape, dtype=p.dtype, generator=gen) for n, p in init.items()}
    analytic = sum((g * direction[n]).sum() for g, n in zip(grads, init))
    plus = {n: (p + eps * direction[n]).detach().requires_grad_(True) for n, p in init.items()}
    minus = {n: (p - eps * direction[n]).detach().requires_grad_(True) for n, p in init.items()}
    numeric = (outer(plus) - outer(minus)) / (2 * eps)
    torch.testing.assert_close(analytic.detach(), numeric.detach(), rtol=1e-5, atol=atol)


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


# --- the online update over a stream, differentiable ------------------------------------------


def _weights_for(tok):
    """Token weights as a CaMeLS artifact would give them: one positive weight per token, not uniform."""
    def weights(text: str) -> tuple[torch.Tensor, torch.Tensor]:
        ids = document_batch(tok, [text], 512).input_ids[0]
        return ids, 0.2 + torch.rand(len(ids), generator=torch.Generator().manual_seed(len(ids)))
    return weights


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_stream_update_is_the_online_update_of_training_updates(optimizer):
    """k documents through ``stream_update`` == the same k documents through ``LoraUpdater.step``
    (torch.optim, what the harness and the service run), token weights and optimizer state included.
    Adam's step from a fresh state, ``lr * g / (|g| + eps)``, has slope ``lr / eps`` where ``g`` is
    near 0, so the rounding of two equal formulas moves a rare coordinate by up to ~1e-4 * lr after 3
    steps (in float64 too; seen on an AMD EPYC, not on a Xeon): Adam is compared to 1e-3 * lr, which
    a wrong moment, bias correction or weight (differences of order lr) would still fail."""
    base, tok = tiny_causal_lm("llama")
    config = UpdateConfig(optimizer=optimizer, lr=0.05 if optimizer == "adam" else 2.0,
                          lora=LoraSpec(rank=4, targets=["q_proj", "v_proj", "down_proj"]))
    token_weights = _weights_for(tok)
    updater = LoraUpdater(base, tok, token_weights, config)
    start = {n: p.detach().clone() for n, p in select_params(updater.model, "lora").items()}
    for text in STREAM:
        assert updater.step(text).accepted
    online = {n: p.detach() for n, p in select_params(updater.model, "lora").items()}

    docs, weights = [], []
    for text in STREAM:
        ids, w = token_weights(text)
        docs.append(document_batch(tok, [text], 512))
        weights.append((w / w[1:].mean())[None])  # mean-normalised: sum(w * nll) / sum(w), as online
    params = {n: p.clone().requires_grad_(True) for n, p in start.items()}
    final, state = stream_update(updater.model, params, docs, weights, InnerLoopConfig.of_update(config),
                                 create_graph=False)
    assert state.step == len(STREAM)
    for name, p in online.items():
        torch.testing.assert_close(final[name], p, rtol=1e-4, atol=1e-3 * config.lr if optimizer == "adam" else 1e-6)
    moved_a = max((online[n] - start[n]).abs().max().item() for n in online if "lora_A" in n)
    assert moved_a > 0  # after the first step B != 0, so the A matrices move too: all of the state is tested
    if optimizer == "adam":
        torch_state = updater.optimizer.state_dict()["state"]
        first = torch_state[0]
        torch.testing.assert_close(state.exp_avg_sq[next(iter(online))], first["exp_avg_sq"], rtol=1e-4, atol=1e-12)


def _stream_setup():
    model, tok, doc, qa = _outer_setup()
    docs = [document_batch(tok, [text], max_tokens=10) for text in STREAM]
    return model, tok, docs, qa


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_stream_gradients_wrt_weights_and_lr_match_finite_differences(optimizer):
    """d QA-loss(after 3 documents) / d (token weights of documents 2 and 3, log lr), float64."""
    model, _, docs, qa = _stream_setup()
    params = {n: p.detach().requires_grad_(True) for n, p in select_params(model, "lora").items()}
    cfg = InnerLoopConfig(optimizer=optimizer, lr=0.02 if optimizer == "adam" else 0.5)
    gen = torch.Generator().manual_seed(3)
    weights = [(0.5 + torch.rand(d.input_ids.shape, dtype=torch.float64, generator=gen)) for d in docs]

    def outer(ws, log_lr):
        final, _ = stream_update(model, params, docs, ws, cfg, lr=log_lr.exp())
        return weighted_nll(model, final, qa)

    log_lr = torch.tensor(float(torch.tensor(cfg.lr).log()), dtype=torch.float64, requires_grad=True)
    ws = [w.clone().requires_grad_(True) for w in weights]
    grads = torch.autograd.grad(outer(ws, log_lr), [*ws, log_lr])
    assert all(g[:, 1:].abs().max() > 0 for g in grads[1:3])  # later documents' weights matter
    eps = 1e-6
    for doc_index, t in ((1, 3), (2, 5), (2, 8)):
        bump = [w.detach().clone() for w in weights]
        bump[doc_index][0, t] += eps
        down = [w.detach().clone() for w in weights]
        down[doc_index][0, t] -= eps
        numeric = (outer(bump, log_lr.detach()) - outer(down, log_lr.detach())) / (2 * eps)
        torch.testing.assert_close(grads[doc_index][0, t], numeric.detach(), rtol=1e-4, atol=1e-9)
    numeric = (outer(weights, log_lr.detach() + eps) - outer(weights, log_lr.detach() - eps)) / (2 * eps)
    torch.testing.assert_close(grads[-1], numeric.detach(), rtol=1e-5, atol=1e-9)


def test_adam_stream_gradient_wrt_the_init_matches_finite_differences():
    """MAML through 3 Adam steps: d QA-loss / d LoRA init along a random direction."""
    model, _, docs, qa = _stream_setup()
    init = {n: p.detach().clone().requires_grad_(True) for n, p in select_params(model, "lora").items()}
    cfg = InnerLoopConfig(optimizer="adam", lr=0.02)

    def outer(params):
        return weighted_nll(model, stream_update(model, params, docs, None, cfg)[0], qa)

    # Adam's step ~ lr * g / (|g| + eps) bends sharply where a gradient coordinate is small (here
    # down to ~1e-6): central differences with a step of 1e-6 are off by 0.6 %, 1e-7 by 0.006 %;
    # the meta-gradient through Adam holds in a small radius only.
    _check_directional_derivative(outer, init, seed=4, eps=1e-9, atol=1e-9)


def test_truncation_and_first_order_keep_what_they_promise():
    """window=1: the last document's weights get their exact gradient, earlier ones none;
    first_order: the init's gradient is the outer gradient at the final parameters (FOMAML)."""
    model, _, docs, qa = _stream_setup()
    params = {n: p.detach().requires_grad_(True) for n, p in select_params(model, "lora").items()}
    gen = torch.Generator().manual_seed(5)

    def weight_grads(cfg):
        ws = [(0.5 + torch.rand(d.input_ids.shape, dtype=torch.float64, generator=gen)).requires_grad_(True)
              for d in docs]
        final, _ = stream_update(model, params, docs, ws, cfg)
        return torch.autograd.grad(weighted_nll(model, final, qa), ws, allow_unused=True)

    gen.manual_seed(5)
    exact = weight_grads(InnerLoopConfig(optimizer="adam", lr=0.02))
    gen.manual_seed(5)
    truncated = weight_grads(InnerLoopConfig(optimizer="adam", lr=0.02, window=1))
    torch.testing.assert_close(truncated[-1], exact[-1])
    assert all(g is None or g.abs().max() == 0 for g in truncated[:-1])
    assert exact[0][:, 1:].abs().max() > 0  # ... which the exact gradient does reach

    init = {n: p.detach().clone().requires_grad_(True) for n, p in select_params(model, "lora").items()}
    cfg = InnerLoopConfig(optimizer="sgd", lr=0.5, first_order=True)
    final, _ = stream_update(model, init, docs, None, cfg)
    first_order = torch.autograd.grad(weighted_nll(model, final, qa), list(init.values()))
    at_final = {n: p.detach().requires_grad_(True) for n, p in final.items()}
    fomaml = torch.autograd.grad(weighted_nll(model, at_final, qa), list(at_final.values()))
    for a, b in zip(first_order, fomaml):
        torch.testing.assert_close(a, b)
    exact_init = torch.autograd.grad(
        weighted_nll(model, stream_update(model, init, docs, None, InnerLoopConfig(optimizer="sgd", lr=0.5))[0], qa),
        list(init.values()))
    assert any((a - b).abs().max() > 1e-8 for a, b in zip(first_order, exact_init))  # an approximation
