"""Artifact directories: ``manifest.json`` + ``weights.safetensors``.

Every meta-learned artifact (MAC networks, CaMeLS weighting model, meta-trained LoRA init) is
saved the same way so the service can load any of them and refuse one trained for another base
model before it does damage.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, Field
from safetensors.torch import load_file, save_file
from transformers import PretrainedConfig

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
# Config fields that change between saves of the same network and must not change its identity.
_VOLATILE_CONFIG_KEYS = {
    "transformers_version", "_name_or_path", "_model_name_or_path", "dtype", "torch_dtype",
    "use_cache", "_attn_implementation_autoset", "_commit_hash", "output_attentions",
    "output_hidden_states", "return_dict", "quantization_config",
}


class ArtifactError(RuntimeError):
    """An artifact is missing, malformed, or was trained for another base model."""


class Manifest(BaseModel):
    kind: str
    format_version: int = FORMAT_VERSION
    base_model: str
    base_model_config_hash: str
    config: dict[str, Any] = Field(default_factory=dict)
    training_data: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    git_commit: str | None = None
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))


def config_hash(config: PretrainedConfig) -> str:
    """A stable fingerprint of a base model's architecture and vocabulary."""
    items = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()[:16]


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def save_artifact(
    path: str | Path,
    *,
    kind: str,
    tensors: dict[str, torch.Tensor],
    base_model: str,
    base_config: PretrainedConfig,
    config: dict[str, Any] | None = None,
    training_data: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> Manifest:
    """Write an artifact directory atomically (weights first, manifest last, then rename)."""
    path = Path(path)
    manifest = Manifest(
        kind=kind, base_model=base_model, base_model_config_hash=config_hash(base_config),
        config=config or {}, training_data=training_data or {}, metrics=metrics or {},
        git_commit=git_commit(),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp / WEIGHTS)
    (tmp / MANIFEST).write_text(manifest.model_dump_json(indent=2))
    if path.exists():  # overwrite: move the old one aside first, drop it once the new one is in
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}-old-", dir=path.parent))
        os.replace(path, old / path.name)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(path)
    return manifest


def read_manifest(path: str | Path) -> Manifest:
    manifest_path = Path(path) / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"{path} is not an artifact directory: {MANIFEST} is missing")
    try:
        return Manifest.model_validate_json(manifest_path.read_text())
    except ValueError as exc:
        raise ArtifactError(f"{manifest_path} is not a valid manifest: {exc}") from exc


def load_artifact(
    path: str | Path, *, kind: str, base_config: PretrainedConfig
) -> tuple[Manifest, dict[str, torch.Tensor]]:
    """Load an artifact, refusing one of another kind, format or base model."""
    manifest = read_manifest(path)
    if manifest.kind != kind:
        raise ArtifactError(f"{path} holds a {manifest.kind!r} artifact, expected {kind!r}")
    if manifest.format_version != FORMAT_VERSION:
        raise ArtifactError(
            f"{path} has format version {manifest.format_version}; this code reads {FORMAT_VERSION}"
        )
    expected = config_hash(base_config)
    if manifest.base_model_config_hash != expected:
        raise ArtifactError(
            f"{path} was trained for base model {manifest.base_model!r} (config hash "
            f"{manifest.base_model_config_hash}), but the loaded base model has config hash "
            f"{expected}: retrain the artifact for this base model or load the matching one"
        )
    return manifest, load_file(Path(path) / WEIGHTS)
