"""Artifact directories: ``manifest.json`` + ``weights.safetensors``.

Every meta-learned artifact (MAC networks, CaMeLS weighting model, meta-trained LoRA init) is
saved the same way so the service can load any of them and refuse one trained for another base
model before it does damage.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
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
# Trained artifacts that ship with the project: artifacts/<kind>/<built-in base model name>/
SHIPPED_DIR = Path(os.environ.get("FRESHLM_ARTIFACTS_DIR", Path(__file__).resolve().parent.parent / "artifacts"))
SHIPPED_KINDS = ("qa-format", "mac", "camels", "meta-ft")
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
    command: str | None = Field(None, description="the command line that produced the artifact")
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


def invocation() -> str:
    """This process's command line as one would type it (``python -m module args``)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    head = f"python -m {spec.name}" if spec is not None and spec.name else Path(sys.argv[0]).name
    return " ".join([head, *map(shlex.quote, sys.argv[1:])])


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
    training_data = {"qa_tuning_fingerprint": getattr(base_config, "qa_tuning", None), **(training_data or {})}
    manifest = Manifest(
        kind=kind, base_model=base_model, base_model_config_hash=config_hash(base_config),
        config=config or {}, training_data=training_data, metrics=metrics or {},
        git_commit=git_commit(), command=invocation(),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp / WEIGHTS)
    (tmp / MANIFEST).write_text(manifest.model_dump_json(indent=2))
    _readable(tmp)
    if path.exists():  # overwrite: move the old one aside first, drop it once the new one is in
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}-old-", dir=path.parent))
        os.replace(path, old / path.name)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(path)
    return manifest


def _readable(directory: Path) -> None:
    """mkdtemp makes owner-only directories: an artifact is read by other users (a service account)."""
    directory.chmod(0o755)
    for f in directory.iterdir():
        f.chmod(0o644)


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
        # The hash covers the merged QA-format tuning too: name both, as either may be the mismatch.
        trained_tuning = manifest.training_data.get("qa_tuning_fingerprint")
        loaded_tuning = getattr(base_config, "qa_tuning", None)
        trained, loaded, advice = f"config hash {manifest.base_model_config_hash}", f"config hash {expected}", ""
        if trained_tuning is not None and trained_tuning != loaded_tuning:
            trained += f", QA-format tuning {trained_tuning}"
            loaded += f" and {'QA-format tuning ' + loaded_tuning if loaded_tuning else 'no QA-format tuning'}"
            advice = "merge the same QA-format tuning (FRESHLM_QA_TUNING / --qa-tuning), "
        raise ArtifactError(
            f"{path} was trained for base model {manifest.base_model!r} ({trained}), but the loaded base model "
            f"has {loaded}: {advice}load the matching base model or retrain the artifact for this one"
        )
    return manifest, load_file(Path(path) / WEIGHTS)


def shipped_artifact(kind: str, base_model: str) -> Path | None:
    """The artifact of ``kind`` that ships for the built-in ``base_model``, if there is one."""
    if kind not in SHIPPED_KINDS:
        raise ValueError(f"unknown shipped artifact kind {kind!r} ({', '.join(SHIPPED_KINDS)})")
    if not base_model or "/" in base_model or base_model.startswith("."):  # a path or a hub id: nothing ships
        return None
    path = SHIPPED_DIR / kind / base_model
    return path if (path / MANIFEST).is_file() else None


def configured_artifact(kind: str, explicit: str | Path | None, env_var: str, base_model: str) -> Path:
    """``explicit``, else ``$env_var``, else the shipped artifact for ``base_model``."""
    value = explicit or os.environ.get(env_var)
    if value:
        return Path(value).expanduser()
    shipped = shipped_artifact(kind, base_model)
    if shipped is None:
        raise ArtifactError(f"no {kind} artifact given ({env_var} or the method config) and none ships for "
                            f"base model {base_model!r} in {SHIPPED_DIR}")
    return shipped



def export_artifact(src: str | Path, dst: str | Path, dtype: str = "float16") -> Manifest:
    """Copy an artifact with its floating-point tensors cast to ``dtype`` (loading casts them back to
    the model's dtype); the manifest is kept and says where the copy came from."""
    manifest = read_manifest(src)
    cast = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    tensors = {k: v.to(cast) if v.is_floating_point() else v for k, v in load_file(Path(src) / WEIGHTS).items()}
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}-", dir=dst.parent))
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp / WEIGHTS)
    exported = manifest.model_copy(update={"config": {**manifest.config, "stored_dtype": dtype}})
    (tmp / MANIFEST).write_text(exported.model_dump_json(indent=2))
    _readable(tmp)
    if dst.exists():
        shutil.rmtree(dst)
    tmp.rename(dst)
    return exported


def main(argv: list[str] | None = None) -> None:
    """``freshlm export-artifact SRC DST [--dtype float16]``: the copy that ships under artifacts/."""
    import argparse

    parser = argparse.ArgumentParser(prog="freshlm export-artifact", description=main.__doc__)
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    args = parser.parse_args(argv)
    manifest = export_artifact(args.src, args.dst, args.dtype)
    size = (Path(args.dst) / WEIGHTS).stat().st_size
    print(f"{args.dst}: {manifest.kind}, {size / 2**20:.2f} MiB of {args.dtype} tensors")


if __name__ == "__main__":
    main()
