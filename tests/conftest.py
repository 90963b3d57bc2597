"""Test-wide setup: float32 matmuls at full precision and a persistent compilation cache."""

import os

os.environ.setdefault("XLA_FLAGS", "")

import jax  # noqa: E402

from jaxinfer.compilation_cache import enable_compilation_cache  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
enable_compilation_cache()
