"""fp32 linear layers on a CPU through oneDNN with the weight packed once.

PyTorch sends an fp32 ``nn.Linear`` on a CPU to MKL's sgemm, which reads the weight in its plain
layout at every call and does poorly with the few rows of a decoding step. oneDNN with the weight
reordered once into its blocked layout, the ops ``torch.compile``'s CPU weight-freezing pass emits
(``mkldnn._reorder_linear_weight`` / ``mkldnn._linear_pointwise``), reads it at memory speed
whatever the rows. Measured on an AMD EPYC (one thread, every linear layer of SmolLM2-135M with its
own weights; docs/BENCHMARKS.md): one row 57 -> 44 ms, eight rows 89 -> 46 ms, a 270-row product
~15 % faster. A row's output also no longer depends on the rows beside it (MKL's does, in the last
bits), so a batched answer is the answer the row gets alone.

Inference only: with gradients enabled, under autocast, or off fp32 on a CPU, a layer runs as
``nn.Linear`` does, so training and CUDA are untouched. The packed copy costs the weight's size
again in RAM (~540 MB for SmolLM2-135M in fp32). A weight changed in place (an optimizer step, a
loaded state dict) or replaced is packed again at its next call; one written through ``.data`` in
place is not seen (PyTorch does not count such writes), so merge adapters with PEFT's
``safe_merge=True``, which replaces the weight (``training.qa_tuning.apply_qa_tuning``).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.nn import functional as F

PACK_ROWS = 8
"""The rows oneDNN is told to expect when it picks the packed layout (a decoding step's batch);
any number of rows works."""


def packing_available() -> bool:
    """Whether this PyTorch has oneDNN and the two ops (private ones: a future PyTorch may drop them,
    and the layers then stay plain ``nn.Linear``)."""
    ops = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight")
            and hasattr(ops, "_linear_pointwise"))


_PACKS: weakref.WeakKeyDictionary[nn.Module, tuple[weakref.ref, int, int, torch.Tensor]] = weakref.WeakKeyDictionary()
"""Each layer's (its weight tensor, the weight's data_ptr and version, packed weight), kept outside
the module: a packed (opaque) tensor can be neither deep-copied nor pickled, and models are both.
The weight is held by a weak reference and compared by identity: a weight substituted for a call
(``torch.func.functional_call``) at the address of a freed one is not mistaken for it."""


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` whose no-grad fp32 CPU calls go through its packed weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (torch.is_grad_enabled() or x.dtype != torch.float32 or w.dtype != torch.float32
                or w.device.type != "cpu" or torch.is_autocast_enabled("cpu")):
            return F.linear(x, w, self.bias)
        entry = _PACKS.get(self)
        if entry is None or entry[0]() is not w or entry[1] != w.data_ptr() or entry[2] != w._version:
            entry = (weakref.ref(w), w.data_ptr(), w._version,
                     torch.ops.mkldnn._reorder_linear_weight(w.detach(), PACK_ROWS))
            _PACKS[self] = entry  # a second thread meanwhile packs its own copy: both are right
        return torch.ops.mkldnn._linear_pointwise(x, entry[3], self.bias, "none", [], "")


def pack_cpu_linears(model: nn.Module) -> int:
    """Turn every plain ``nn.Linear`` of ``model`` into a ``PackedLinear`` (same parameters, same
    state dict); the number turned. Nothing when this PyTorch lacks the ops (``packing_available``)."""
    if not packing_available():
        return 0
    layers = [m for m in model.modules() if type(m) is nn.Linear]
    for layer in layers:
        layer.__class__ = PackedLinear
    return len(layers)
