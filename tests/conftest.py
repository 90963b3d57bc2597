"""Test-wide setup: float32 matmuls at full precision, a persistent compilation cache, shared models."""

import os

import jax
import pytest

from jaxinfer.compilation_cache import enable_compilation_cache

jax.config.update("jax_default_matmul_precision", "highest")
enable_compilation_cache()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """``arch -> (directory, torch model)``, built lazily once per session."""
    from tests.tiny_models import make_tiny_model

    cache = {}
    root = tmp_path_factory.mktemp("tiny_models")

    def get(arch: str):
        if arch not in cache:
            path = root / arch
            cache[arch] = (path, make_tiny_model(arch, path))
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def default_llm():
    """The default model (SmolLM2-135M-Instruct GGUF) loaded once per session."""
    from jaxinfer import LLM

    return LLM()
