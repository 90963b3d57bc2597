"""Stateless building blocks shared by every architecture: norms, RoPE, linear, SwiGLU.

Shapes: ``T`` tokens (flattened over sequences), ``E`` hidden size, ``H`` heads, ``D`` head dim.
"""

from __future__ import annotations

__all__ = ["Linear", "RMSNorm", "Rotary", "apply_rope", "embed", "weight_param", "linear", "norm_impl", "rms_norm",
           "rope", "swiglu", "unembed"]

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# ``linear(x, w)`` dispatches on the weight's type (plain array or ``quantize.QArray``), and ``embed`` /
# ``unembed`` on the embedding table's (plain array or ``quantize.QEmbedding``): model code never branches
# on a quantization format.
from jaxinfer.models.ops import embed, linear, unembed
from jaxinfer.sharding import ShardingPlan
from jaxinfer.target import Kernels
from pallas_kernels import norm_act


def rms_norm(x: jax.Array, scale: jax.Array, eps: float, impl: str = "xla") -> jax.Array:
    """RMSNorm over the last axis, computed in float32. ``x[..., E]``, ``scale[E]``; ``impl`` ``"cpu"`` runs
    the C++ row kernel (:mod:`pallas_kernels.norm_act`)."""
    return norm_act.rms_norm(x, scale, eps, impl)


class Rotary(NamedTuple):
    """RoPE tables of one step's tokens, computed once and shared by every layer: ``cos``, ``sin`` ``f32[T, D // 2]``.

    Built once per forward (:meth:`at`) and materialised: XLA:CPU otherwise fuses the angle computation into
    each layer's rotation and evaluates the sines and cosines again per head and per layer (5-6% of a
    512-token step of the default model on the CPU).
    """

    cos: jax.Array
    sin: jax.Array

    @classmethod
    def at(cls, positions: jax.Array, inv_freq) -> Rotary:
        """Tables for ``positions i32[T]`` and ``inv_freq f32[D // 2]``."""
        angles = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq, jnp.float32)[None, :]

        def tables(a):
            return jnp.cos(a), jnp.sin(a)

        # A conditional's results are materialised, so its two (identical) branches keep the compiler from
        # fusing the tables, and recomputing them, into each consumer (an optimization barrier does not).
        return cls(*jax.lax.cond(jnp.any(positions >= 0), tables, tables, angles))


def apply_rope(x: jax.Array, rotary: Rotary) -> jax.Array:
    """Rotary embedding, half-split ("rotate_half") convention.

    Args:
      x: ``[T, H, D]``.
      rotary: the tables of ``x``'s ``T`` positions.
    Returns:
      ``[T, H, D]`` in ``x.dtype`` (rotation computed in float32).
    """
    cos, sin = rotary.cos[:, None, :], rotary.sin[:, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """:func:`apply_rope` with tables computed here: ``x[T, H, D]``, ``positions i32[T]``, ``inv_freq f32[D // 2]``."""
    return apply_rope(x, Rotary.at(positions, inv_freq))


def swiglu(gate: jax.Array, up: jax.Array, impl: str = "xla") -> jax.Array:
    """``silu(gate) * up`` with PyTorch's roundings (:func:`pallas_kernels.norm_act.swiglu`)."""
    return norm_act.swiglu(gate, up, impl)


def weight_param(module: nn.Module, name: str, init, shape: tuple[int, ...], dtype):
    """``module.param(name, init, shape, dtype)`` that also accepts a stored weight pytree.

    Flax checks a stored parameter against ``shape`` leaf by leaf, which rejects a quantized weight whose
    leaves have a physical layout (packed int4 values, a transposed quantized embedding). A stored value
    that is not a plain array is returned as is once its logical ``.shape`` equals ``shape``.
    """
    if module.has_variable("params", name):
        stored = module.get_variable("params", name)
        if not isinstance(stored, (jax.Array, np.ndarray, nn.meta.AxisMetadata)):
            if tuple(getattr(stored, "shape", ())) != tuple(shape):
                raise ValueError(f"parameter {name!r} of {module.name}: stored weight has logical shape "
                                 f"{getattr(stored, 'shape', None)}, the module expects {tuple(shape)}")
            return stored
    return module.param(name, init, shape, dtype)


def matmul_options(kernels: Kernels | None) -> dict:
    """``impl`` / ``interpret`` / ``int8_activations`` keywords of :func:`linear` / :func:`unembed` for a
    kernel choice."""
    if kernels is None:
        return {}
    return {"impl": kernels.matmul, "interpret": kernels.matmul_interpret,
            "int8_activations": kernels.matmul_int8_activations}


def norm_impl(kernels: Kernels | None) -> str:
    """The ``impl`` of :func:`rms_norm` / :func:`swiglu` / :class:`RMSNorm` for a kernel choice."""
    return "xla" if kernels is None else kernels.norm


class Linear(nn.Module):
    """``y = x @ kernel (+ bias)``; ``kernel[in, out]`` carries logical axis names ``axes``."""

    features: int
    axes: tuple[str, str]
    use_bias: bool = False
    param_dtype: jnp.dtype = jnp.float32
    kernels: Kernels | None = None  # the runner's kernel choice (its matmul kernel runs QArray weights)
    plan: ShardingPlan | None = None  # set on a multi-device plan: compiled kernels then run per shard
    out_dtype: jnp.dtype | None = None  # result dtype (None: the input's); float32 for the LM head's logits

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), self.axes)
        kernel = weight_param(self, "kernel", init, (x.shape[-1], self.features), self.param_dtype)
        bias = None
        if self.use_bias:
            binit = nn.with_logical_partitioning(nn.initializers.zeros_init(), (self.axes[1],))
            bias = self.param("bias", binit, (self.features,), self.param_dtype)
        return linear(x, kernel, bias, plan=self.plan, axes=self.axes, out_dtype=self.out_dtype,
                      **matmul_options(self.kernels))


class RMSNorm(nn.Module):
    """RMSNorm with a learned ``scale[E]`` (logical axis ``axis``); ``impl`` as :func:`rms_norm`.

    ``__call__(x)`` returns the norm of ``x[..., E]``; ``__call__(x, add)`` returns ``(norm(x + add), x + add)``
    (a residual sum and the norm that reads it, one pass with the C++ kernel).
    """

    eps: float
    axis: str = "embed"
    param_dtype: jnp.dtype = jnp.float32
    impl: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, add: jax.Array | None = None):
        init = nn.with_logical_partitioning(nn.initializers.ones_init(), (self.axis,))
        scale = self.param("scale", init, (x.shape[-1],), self.param_dtype)
        if add is None:
            return rms_norm(x, scale, self.eps, self.impl)
        return norm_act.add_rms_norm(x, add, scale, self.eps, self.impl)
