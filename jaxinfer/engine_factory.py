"""The one place engines are built: load the model (and a draft model) once, onto the mesh the config asks
for, then build an :class:`~jaxinfer.engine.Engine` or a data-parallel group of them."""

from __future__ import annotations

import jax

from jaxinfer.compilation_cache import enable_compilation_cache
from jaxinfer.config import EngineConfig, resolve_auto_settings, resolve_dtype
from jaxinfer.dp_engine import DataParallelEngine
from jaxinfer.engine import Engine
from jaxinfer.errors import ModelNotFoundError
from jaxinfer.loader import load_model
from jaxinfer.model_registry import KNOWN_MODELS, resolve_model
from jaxinfer.sharding import make_mesh


def create_engine(model: str | None = None, config: EngineConfig | None = None, *,
                  compilation_cache: bool | None = None) -> Engine | DataParallelEngine:
    """Load ``model`` (registered name, HF directory, GGUF file, hub id or quantized checkpoint; ``None``:
    the default model) as ``config`` says (dtype, quantization, tensor / data parallelism, draft model) and
    build the engine: an :class:`Engine`, or a :class:`DataParallelEngine` when ``data_parallel_size > 1``.

    ``compilation_cache``: the persistent XLA cache switch (``None``: the environment's default, on).
    """
    enable_compilation_cache(compilation_cache)
    config = config or EngineConfig()
    if config.data_parallel_size > 1 and jax.process_count() > 1:
        raise ValueError("data_parallel_size > 1 is not supported across processes (--distributed): each replica "
                         "would run on some processes only; use tensor parallelism across processes, or one "
                         "server per host behind a load balancer")
    # dtype "auto" -> this machine's fast setting
    config = resolve_auto_settings(config, gguf_model=_auto_keeps_gguf(model, config))
    dtype = resolve_dtype(config.dtype)
    mesh = make_mesh(config.tensor_parallel_size, config.data_parallel_size)
    loaded = load_model(model, dtype=dtype, mesh=mesh, quantization=config.quantization)
    draft = None
    if config.speculative_method == "draft":
        draft = load_model(config.speculative_model, dtype=dtype, mesh=loaded.mesh, load_tokenizer_too=False)
    name = str(model) if model is not None else None
    if config.data_parallel_size > 1:
        return DataParallelEngine(loaded, config, draft=draft, model_name=name)
    return Engine(loaded, config, draft=draft, model_name=name)


def _auto_keeps_gguf(model: str | None, config: EngineConfig) -> bool:
    """Whether ``dtype="auto"`` may keep this model's GGUF weights quantized: a GGUF model on the CPU with
    nothing else asked for. A model that does not resolve is left to :func:`load_model` to report."""
    if config.dtype != "auto" or config.quantization is not None or jax.default_backend() != "cpu":
        return False
    if model is None or str(model) in KNOWN_MODELS:  # registered models are GGUF: no fetch + checksum twice
        return True
    try:
        return resolve_model(model).kind == "gguf"
    except ModelNotFoundError:
        return False
