"""The answering side of adapter versions: each request pins one version by name.

Versions are loaded into one PEFT model as named adapters (``v<version>``) and a request passes
``adapter_names=[...]`` to generation, so a question answered during a swap runs entirely on the
version it read at its start, never a mix, and no global ``set_adapter`` is ever called (PEFT
#804). The model's active adapter stays a zero-initialised one, so paths that call the base
model directly (MAC) see the base model unless they ask for a version.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from pathlib import Path

from peft import PeftModel, get_peft_model, set_peft_model_state_dict
from transformers import PreTrainedModel

from service.adapters.store import load_weights, peft_config

log = logging.getLogger("freshlm.adapters")
IDENTITY = "identity"


class LiveAdapters:
    def __init__(self, base: PreTrainedModel, root: Path, capacity: int) -> None:
        self.base = base
        self.root = root
        self.capacity = capacity
        self.peft: PeftModel | None = None
        self._loaded: OrderedDict[str, str] = OrderedDict()
        self.lock = threading.RLock()  # held by the caller while generating (see Answerer)

    @property
    def model(self) -> PreTrainedModel:
        return self.peft if self.peft is not None else self.base

    def ensure(self, version: str) -> str:
        """The adapter name of ``version``, loading it (and evicting the least recent) if needed.
        Call with ``self.lock`` held: no generation runs while adapters are added or removed."""
        name = f"v{version}"
        if name in self._loaded:
            self._loaded.move_to_end(name)
            return name
        tensors, config = load_weights(self.root, version)
        if self.peft is None:
            self.peft = get_peft_model(self.base, peft_config(config, self.base), adapter_name=IDENTITY)
            self.peft.eval()
        self.peft.add_adapter(name, peft_config(config, self.base))
        set_peft_model_state_dict(self.peft, tensors, adapter_name=name)
        self.peft.requires_grad_(False)
        self.peft.eval()  # per-request adapter_names needs eval mode
        self._loaded[name] = version
        while len(self._loaded) > self.capacity:
            old, _ = self._loaded.popitem(last=False)
            self.peft.delete_adapter(old)
        log.info("loaded adapter version %s", version)
        return name
