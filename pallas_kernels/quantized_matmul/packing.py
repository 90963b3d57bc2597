"""int4 packing: two 4-bit values per int8 byte, split-half within each quantization group.

Layout ("split-half per group"), for a weight ``q[K, N]`` of 4-bit values and group size ``g``:
packed row ``j * g/2 + r`` (``r < g/2``) of column ``n`` holds

* low nibble:  ``q[j * g + r, n]``
* high nibble: ``q[j * g + g/2 + r, n]``

so ``packed`` is ``int8[K/2, N]``. This is the byte order of GGUF Q4_0 / Q4_1 blocks (g = 32), so those
import as a byte copy. Unpacking a tile of whole groups is two shifts (low: ``(b << 28) >> 28`` on the
sign-extended int32 byte, high: ``b >> 4``; asymmetric values mask with ``& 15`` instead) and places the
two halves of each group one after the other: no lane shuffles, and every group can be unpacked
independently of the kernel's K tile. Symmetric values are stored as signed two's-complement nibbles
(``[-8, 7]``); asymmetric ones as unsigned nibbles (``[0, 15]``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.jit, static_argnames=("group_size",))
def pack_int4(q: jnp.ndarray, group_size: int) -> jnp.ndarray:
    """Pack 4-bit values ``q[..., K, N]`` (any integer dtype, values in [-8, 7] or [0, 15]).

    Returns:
      ``int8[..., K/2, N]`` in the split-half-per-group layout.
    """
    *lead, k, n = q.shape
    if k % group_size or group_size % 2:
        raise ValueError(f"K={k} must be a multiple of the (even) group size {group_size}")
    h = group_size // 2
    q = jnp.asarray(q).astype(jnp.int32).reshape(*lead, k // group_size, 2, h, n)
    lo = q[..., 0, :, :] & 0xF
    hi = q[..., 1, :, :] & 0xF
    byte = (lo | (hi << 4)).astype(jnp.uint8).view(jnp.int8)
    return byte.reshape(*lead, k // 2, n)


def unpack_int4_halves(packed: jnp.ndarray, signed: bool) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Low and high nibbles of ``packed`` (int8) as int32 arrays of the same shape."""
    p = packed.astype(jnp.int32)  # sign-extended
    if signed:
        return (p << 28) >> 28, p >> 4
    return p & 0xF, (p >> 4) & 0xF


@functools.partial(jax.jit, static_argnames=("group_size", "signed"))
def unpack_int4(packed: jnp.ndarray, group_size: int, signed: bool) -> jnp.ndarray:
    """Inverse of :func:`pack_int4`: ``int8[..., K/2, N]`` -> ``int32[..., K, N]``."""
    *lead, k2, n = packed.shape
    h = group_size // 2
    if k2 % h:
        raise ValueError(f"packed rows {k2} are not a multiple of half the group size {h}")
    lo, hi = unpack_int4_halves(packed, signed)
    lo = lo.reshape(*lead, k2 // h, 1, h, n)
    hi = hi.reshape(*lead, k2 // h, 1, h, n)
    return jnp.concatenate([lo, hi], axis=-3).reshape(*lead, 2 * k2, n)
