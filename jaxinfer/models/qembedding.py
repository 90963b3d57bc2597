"""QEmbedding: a quantized token-embedding table that is also usable as a tied LM head.

A float embedding is ``table[V, E]``: tokens gather rows, and a tied LM head computes
``h @ table.T``. A :class:`QEmbedding` stores the table as a :class:`QArray` of logical
shape ``[E, V]`` (the LM-head orientation: quantization groups run along ``E``, one scale column per
token), which is exactly how GGUF stores ``token_embd.weight`` (each token's row contiguous in blocks of
32). A lookup dequantizes only the gathered token columns; the tied LM head is ``linear(h, qarray)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels.quantized_matmul.qarray import QArray


@jax.tree_util.register_pytree_with_keys_class
class QEmbedding:
    """Quantized embedding table of logical shape ``[V, E]``, stored as a QArray ``[E, V]``."""

    __slots__ = ("table",)

    def __init__(self, table: QArray):
        if not isinstance(table, QArray):
            raise TypeError(f"QEmbedding needs a QArray [E, V], got {type(table).__name__}")
        self.table = table

    def tree_flatten_with_keys(self):
        return ((jax.tree_util.GetAttrKey("table"), self.table),), None

    def tree_flatten(self):
        return (self.table,), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        (obj.table,) = children
        return obj

    @classmethod
    def quantize(cls, table: jax.Array, config, **kwargs) -> QEmbedding:
        """RTN-quantize a float ``table[V, E]`` (groups along ``E``); ``kwargs`` go to ``QArray.quantize``."""
        return cls(QArray.quantize(jnp.asarray(table).T, config, **kwargs))

    @property
    def shape(self) -> tuple[int, int]:
        """Logical ``(V, E)``."""
        e, v = self.table.shape
        return (v, e)

    @property
    def ndim(self) -> int:
        return 2

    @property
    def dtype(self):
        return self.table.dtype

    @property
    def config(self):
        return self.table.config

    @property
    def nbytes(self) -> int:
        return self.table.nbytes

    def __repr__(self) -> str:
        return f"QEmbedding({self.table.config.name}, shape={self.shape}, dtype={self.dtype.name})"

    def lookup(self, tokens: jax.Array, dtype: Any = None) -> jax.Array:
        """Rows ``table[tokens]``: ``i32[T] -> [T, E]``, dequantizing only the ``T`` gathered tokens."""
        return self.table.take_columns(tokens).dequantize(dtype).T

    def dequantize(self, dtype: Any = None) -> jax.Array:
        """The whole float table ``[V, E]``."""
        return self.table.dequantize(dtype).T

    def logical_axes(self, axes: Sequence[str | None]) -> QEmbedding:
        """Axis names of the leaves, given the float table's names ``(vocab_name, embed_name)``."""
        v, e = tuple(axes)
        return QEmbedding(self.table.logical_axes((e, v)))
