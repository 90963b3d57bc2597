"""RMSNorm, residual add + RMSNorm and SwiGLU by implementation: ``"xla"`` (jnp) or ``"cpu"`` (the C++
kernel, :mod:`.cpu`, for float32 / bfloat16 operands; other dtypes, or a kernel that cannot be built, run the
jnp path). Other implementation names run the jnp path, which XLA fuses well on TPUs and GPUs.

Shapes: ``x[..., E]``, ``scale[E]``, ``gate`` / ``up`` ``[..., F]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.norm_act import cpu


def _cpu(impl: str, *xs: jax.Array) -> bool:
    ok = all(x.ndim >= 1 and x.shape[-1] > 0 and jnp.dtype(x.dtype) in cpu.DTYPES for x in xs)
    return impl == "cpu" and ok and len({(x.shape, x.dtype) for x in xs}) == 1 and cpu.available()


def rms_norm(x: jax.Array, scale: jax.Array, eps: float, impl: str = "xla") -> jax.Array:
    """RMSNorm over the last axis, computed in float32 and rounded once to ``x.dtype``."""
    if _cpu(impl, x):
        return cpu.rms_norm_cpu(x, scale, eps)
    return _rms_norm32(x.astype(jnp.float32), scale, eps).astype(x.dtype)


def _rms_norm32(x32: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return y * scale.astype(jnp.float32)


def add_rms_norm(x: jax.Array, a: jax.Array, scale: jax.Array, eps: float,
                 impl: str = "xla") -> tuple[jax.Array, jax.Array]:
    """``(rms_norm(x + a), x + a)``: the residual sum in ``x.dtype`` and its RMSNorm (one pass on the CPU).

    The norm reads the sum as rounded to ``x.dtype``, as PyTorch's residual stream does (XLA would otherwise
    be free to keep the unrounded float32 sum for it)."""
    if _cpu(impl, x, a):
        return cpu.add_rms_norm_cpu(x, a, scale, eps)
    s = x + a
    s32 = s.astype(jnp.float32)
    if jnp.issubdtype(s.dtype, jnp.floating) and jnp.dtype(s.dtype).itemsize < 4:
        info = jnp.finfo(s.dtype)
        s32 = jax.lax.reduce_precision(s32, exponent_bits=info.nexp, mantissa_bits=info.nmant)
    return _rms_norm32(s32, scale, eps).astype(x.dtype), s


def swiglu(gate: jax.Array, up: jax.Array, impl: str = "xla") -> jax.Array:
    """``silu(gate) * up`` with PyTorch's roundings: ``silu`` evaluated in float32 and rounded once to the
    inputs' dtype, then the product rounded (16-bit inputs; ``jax.nn.silu`` on bf16 would round after each
    of its negate / exp / add / divide / multiply)."""
    if _cpu(impl, gate, up):
        return cpu.swiglu_cpu(gate, up)
    if jnp.dtype(gate.dtype).itemsize >= 4:
        return jax.nn.silu(gate) * up
    g = gate.astype(jnp.float32)
    return (g * jax.nn.sigmoid(g)).astype(gate.dtype) * up
