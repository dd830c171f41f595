"""Token pruning inside one forward pass of a Hugging Face decoder (LazyLLM-style prefill pruning).

The bottom ``after_layer`` decoder layers see every token of a chunk; there, the tokens that
received the most attention (H2O's heavy-hitter score, summed over those layers and heads) are
picked, and only they continue through the upper layers. The upper layers then cost
``keep / length`` of a full pass, which is what makes writing a memory entry much cheaper than a
full base-model pass (docs/mac.md). The survivors keep their positions; they attend to the cached
prefix and to each other.

Generic over architectures: the decoder layers and attention modules are found through the
model's own ``_can_record_outputs`` table (the mechanism transformers uses for
``output_hidden_states`` / ``output_attentions``), attention weights come from forward hooks on
the attention modules (eager attention returns them), and a pre-hook on each upper layer slices
every tensor argument with the chunk's query length (hidden states, positions, rotary tables)
and the attention mask's rows and columns.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, ExitStack

import torch
from torch import nn
from transformers import PreTrainedModel


def _target(entry) -> tuple[type, str | None]:
    """(class, layer-name filter) of a ``_can_record_outputs`` entry (a class or an OutputRecorder)."""
    if isinstance(entry, type):
        return entry, None
    return entry.target_class, getattr(entry, "layer_name", None)


def decoder_parts(model: PreTrainedModel) -> list[tuple[nn.Module, nn.Module]]:
    """``(decoder layer, its self-attention module)`` for every layer, bottom to top."""
    decoder = model.base_model
    table = getattr(decoder, "_can_record_outputs", None) or {}
    if "hidden_states" not in table or "attentions" not in table:
        raise ValueError(f"{type(decoder).__name__} does not declare its layers (_can_record_outputs): "
                         "token pruning needs a transformers 5 decoder")
    layer_cls, _ = _target(table["hidden_states"])
    attn_cls, attn_name = _target(table["attentions"])
    parts = []
    for layer in (m for m in decoder.modules() if isinstance(m, layer_cls)):
        attention = [m for name, m in layer.named_modules() if isinstance(m, attn_cls)
                     and (attn_name is None or f".{name}".endswith(attn_name))]
        if not attention:
            raise ValueError(f"no {attn_cls.__name__} in a {layer_cls.__name__}")
        parts.append((layer, attention[0]))
    return parts


@contextmanager
def recorded_attention(model: PreTrainedModel) -> Iterator[list[torch.Tensor]]:
    """Attention weights ``[B, heads, q, kv]`` of every layer, in call order, of the forward
    passes run inside the block (the model must run eager attention)."""
    weights: list[torch.Tensor] = []

    def hook(_module, _args, output) -> None:
        if not isinstance(output, tuple) or len(output) < 2 or output[1] is None:
            raise RuntimeError("attention weights are not returned: run the model with eager attention")
        weights.append(output[1])

    handles = [attention.register_forward_hook(hook) for _, attention in decoder_parts(model)]
    try:
        yield weights
    finally:
        for handle in handles:
            handle.remove()


def _slice(value, q_len: int, kv_len: int, rows: torch.Tensor | None, cols: torch.Tensor):
    """``value`` with the pruned query rows (``rows`` kept) and key columns (``cols`` kept) removed."""
    if isinstance(value, tuple):
        return tuple(_slice(v, q_len, kv_len, rows, cols) for v in value)
    if not isinstance(value, torch.Tensor):
        return value
    if value.dim() == 4 and value.shape[-2:] == (q_len, kv_len):  # the attention mask
        return (value if rows is None else value[..., rows, :])[..., cols]
    if rows is not None and value.dim() >= 2 and value.shape[1] == q_len:  # hidden states, positions, rotary
        return value[:, rows]
    if rows is not None and value.dim() == 1 and value.shape[0] == q_len:
        return value[rows]
    return value


@contextmanager
def pruned_upper_layers(
    model: PreTrainedModel,
    after_layer: int,
    q_len: int,
    kv_len: int,
    dropped_columns: Callable[[], torch.Tensor],
    kept_rows: Callable[[], torch.Tensor | None],
) -> Iterator[None]:
    """Run the layers from ``after_layer`` up without some tokens. Before the first of them runs,
    ``kept_rows()`` says which query rows of this call continue (None: all) and
    ``dropped_columns()`` which key positions (cache + this call) those layers do not hold."""
    plan: dict[str, torch.Tensor | None] = {}

    def pre_hook(_module, args, kwargs):
        if not plan:
            plan["rows"] = kept_rows()
            keep = torch.ones(kv_len, dtype=torch.bool)
            keep[dropped_columns()] = False
            plan["cols"] = keep.nonzero().flatten()
        rows, cols = plan["rows"], plan["cols"]
        moved = lambda v: v.to(args[0].device) if isinstance(v, torch.Tensor) else v  # noqa: E731
        return (tuple(_slice(a, q_len, kv_len, moved(rows), moved(cols)) for a in args),
                {k: _slice(v, q_len, kv_len, moved(rows), moved(cols)) for k, v in kwargs.items()})

    def restore_length(_module, _args, output):
        """The top layer's output back at the call's length (dropped rows zero), for models that
        reshape it to the input's shape (GPT-2); nobody reads those rows."""
        rows = plan.get("rows")
        hidden = output[0] if isinstance(output, tuple) else output
        if rows is None or hidden.shape[1] == q_len:
            return output
        full = hidden.new_zeros(hidden.shape[0], q_len, *hidden.shape[2:])
        full[:, rows.to(hidden.device)] = hidden
        return (full, *output[1:]) if isinstance(output, tuple) else full

    layers = [layer for layer, _ in decoder_parts(model)]
    with ExitStack() as stack:
        for layer in layers[after_layer:]:
            stack.callback(layer.register_forward_pre_hook(pre_hook, with_kwargs=True).remove)
        stack.callback(layers[-1].register_forward_hook(restore_length).remove)
        yield
