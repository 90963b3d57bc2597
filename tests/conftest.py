"""Test-wide setup: float32 matmuls at full precision, a persistent compilation cache, shared models."""

import os

# Eight virtual CPU devices for the sharding tests (single-device code is unaffected); must precede jax.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

# The CPU tests run on the CPU even with the AOT toolchain installed (libtpu, the CUDA plugin): without this
# JAX would try to initialise those backends (warnings, a CUDA plugin traceback without cuDNN). The
# compile-only TPU / H100 topologies of pallas_kernels.targets still work with it (the CUDA one needs it).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# dtype="auto" means bfloat16 weights with int8 KV on a CPU with bfloat16 instructions (jaxinfer.config.
# resolve_auto_settings); the suite's equality tests against HF float32 are written for float32, so "auto" means
# float32 here. tests/test_auto_settings.py checks the machine-dependent choice with this variable unset.
os.environ.setdefault("JAXINFER_AUTO_DTYPE", "float32")

import jax  # noqa: E402
import pytest  # noqa: E402

from jaxinfer.compilation_cache import enable_compilation_cache  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
enable_compilation_cache()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# Tests that start their own big processes (notebook kernels with a served model, ~7 GB together): run first,
# while the xdist workers are small. A worker's resident memory grows to ~9 GB over the suite (the compiled
# programs of hundreds of engines); two grown workers beside these processes outgrew a 24 GB machine.
FIRST = ("tests/test_notebooks.py::test_notebook_executes",)


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: not item.nodeid.startswith(FIRST))  # stable: the rest keep their order


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
