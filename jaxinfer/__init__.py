"""jaxinfer: LLM inference on JAX and Pallas.

The public names are imported lazily, so the pure-Python host modules (scheduler, block manager,
sequences) can be imported without importing jax.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "jaxinfer.llm",
    "SamplingParams": "jaxinfer.sampling_params",
    "RequestOutput": "jaxinfer.outputs",
    "CompletionOutput": "jaxinfer.outputs",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'jaxinfer' has no attribute {name!r}")
