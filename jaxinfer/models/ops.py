"""``linear(x, w)``, ``embed(table, tokens)`` and ``unembed(x, table)``: the calls model code makes for
every projection and for the token embedding / tied LM head, quantized or not (dispatch on the type)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxinfer.models.qembedding import QEmbedding
from jaxinfer.sharding import ShardingPlan, logical_to_mesh_spec
from pallas_kernels.backend import needs_interpret
from pallas_kernels.quantized_matmul.api import quantized_matmul
from pallas_kernels.quantized_matmul.qarray import QArray
from pallas_kernels.quantized_matmul.sharded import quantized_matmul_sharded

_PALLAS = ("pallas_tpu", "pallas_gpu")


def linear(x: jax.Array, w: jax.Array | QArray, bias: jax.Array | None = None, *, impl: str | None = None,
           interpret: bool | None = None, plan: ShardingPlan | None = None, axes: tuple[str, str] | None = None,
           int8_activations: bool = False, out_dtype=None):
    """``x @ w (+ bias)``, dispatching on the weight's type.

    Args:
      x: ``[..., K]`` activations.
      w: ``[K, N]`` plain float array, or a :class:`QArray` of logical shape ``[K, N]`` (any format).
      bias: optional unquantized ``[N]``.
      impl: kernel implementation for QArray weights (``None``: backend default).
      interpret: run a Pallas kernel in interpret mode (``None``: the kernel decides).
      plan, axes: the sharding plan and the weight's logical axis names. A compiled Pallas kernel cannot be
        partitioned by XLA, so on a multi-device plan a QArray weight runs it once per shard
        (:func:`sharded_quantized_matmul`).
      int8_activations: QArray weights on the C++ CPU kernel (``impl="cpu"``) run its int8 dot path with
        activations quantized per 32-block (:func:`pallas_kernels.quantized_matmul.api.quantized_matmul`).
      out_dtype: result dtype (default ``x.dtype``); float32 with 16-bit ``x`` keeps the float32
        accumulation unrounded (the LM head's logits).

    Returns:
      ``[..., N]`` in ``out_dtype``.
    """
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    if isinstance(w, QArray):
        if impl in _PALLAS:  # decided here: the shard_map below must not fall back on the runtime backend
            interpret = needs_interpret(impl, interpret)
        if plan is not None and axes is not None and plan.tp > 1 and impl in _PALLAS and not interpret:
            y = sharded_quantized_matmul(x, w, plan, axes, impl=impl, interpret=False, out_dtype=out_dtype)
        else:
            y = quantized_matmul(x, w, impl=impl, interpret=interpret, int8_activations=int8_activations,
                                 out_dtype=out_dtype)
    else:
        if w.ndim != 2 or x.shape[-1] != w.shape[0]:
            raise ValueError(f"linear: x {x.shape} and w {w.shape} do not match as [..., K] @ [K, N]")
        # 16-bit inputs: ask for a float32 result, then round. Same numbers as a 16-bit-output dot, but on
        # the CPU this is the form XLA lowers to its bf16 matrix units (AMX / AVX512-BF16); a
        # bf16 -> bf16 dot there runs several times slower.
        acc = jnp.float32 if jnp.dtype(x.dtype).itemsize < 4 else None
        y = jnp.matmul(x, w.astype(x.dtype), preferred_element_type=acc).astype(out_dtype)
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y


def sharded_quantized_matmul(x: jax.Array, w: QArray, plan: ShardingPlan, axes: tuple[str, str], *,
                             impl: str, interpret: bool | None = None, out_dtype=None) -> jax.Array:
    """``x[..., K] @ w`` with the quantized-matmul kernel run once per shard of ``plan``'s mesh
    (:func:`pallas_kernels.quantized_matmul.sharded.quantized_matmul_sharded`): the weight's logical
    ``axes`` ``(K-name, N-name)`` say, through the plan's rules, whether it is split along N (column
    parallel) or K (row parallel, partial products summed); unsplit weights run unsharded."""
    k_axis, n_axis = logical_to_mesh_spec(axes, plan.rules)
    if k_axis is None and n_axis is None:
        return quantized_matmul(x, w, impl=impl, interpret=interpret, out_dtype=out_dtype)
    split, axis = ("k", k_axis) if k_axis is not None else ("n", n_axis)
    y = quantized_matmul_sharded(x.reshape(-1, x.shape[-1]), w, plan.mesh, split=split, axis=axis, impl=impl,
                                 interpret=interpret, out_dtype=out_dtype)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def embed(table: jax.Array | QEmbedding, tokens: jax.Array, dtype=None, *, lane_strips: bool = False) -> jax.Array:
    """Token embeddings ``[T, E]`` for ``tokens i32[T]`` from a float ``table[V, E]`` or a QEmbedding.

    ``lane_strips``: read the rows as :func:`lane_strip_rows` (a tied table the TPU lays out
    vocabulary-minor, :func:`tpu_vocab_minor`).
    """
    if isinstance(table, QEmbedding):
        return table.lookup(tokens, dtype)
    if lane_strips and tokens.shape[0] * STRIP < table.shape[0]:
        out = lane_strip_rows(table, tokens)
    else:
        out = jnp.take(table, tokens, axis=0)
    return out if dtype is None else out.astype(dtype)


STRIP = 128  # TPU lanes


def tpu_vocab_minor(shape: tuple[int, int]) -> bool:
    """Whether the TPU compiler lays a ``[V, E]`` table out vocabulary-minor (``table.T`` row-major).

    It picks the layout of a 2D parameter whose tiles (8 sublanes x 128 lanes) waste the least: the
    vocabulary goes to the lanes when ``E`` is not a multiple of 128 and ``V`` pads less (SmolLM2's
    ``[49152, 576]``: vocabulary-minor; ``[49152, 512]`` or ``[128256, 4096]``: row-major). Compiled for
    v5e (libtpu 0.0.42.1) with a row gather and the tied LM head, 2026-12-06.
    """
    v, e = shape
    row_major = -(-v // 8) * 8 * (-(-e // STRIP) * STRIP)
    vocab_minor = -(-e // 8) * 8 * (-(-v // STRIP) * STRIP)
    return vocab_minor < row_major


def lane_strip_rows(table: jax.Array, tokens: jax.Array) -> jax.Array:
    """Rows ``table[tokens]`` (``[V, E]``, ``i32[T]`` -> ``[T, E]``) read as 128-column strips of ``table.T``.

    A tied embedding table is also the LM head's right operand, for which the TPU compiler lays it out
    vocabulary-minor (``table.T`` row-major, tiles of 8 x 128 vocabulary lanes). A row gather
    (``jnp.take``) on that layout makes it copy the whole table into row-major order every step. Reading,
    for each token, the ``[E, 128]`` strip of ``table.T`` that holds its column is a tile-aligned slice of
    the layout the LM head already uses: ``T x E x 128`` elements read, no copy (worth it while
    ``T x 128 < V``). Out-of-range tokens are clamped into ``[0, V)`` (``jnp.take`` fills them with NaN);
    needs ``V >= 128``.
    """
    v, e = table.shape
    if v < STRIP:
        raise ValueError(f"lane_strip_rows needs at least {STRIP} rows, got a table of shape {table.shape}")
    tok = jnp.clip(tokens.astype(jnp.int32), 0, v - 1)
    start = jnp.minimum((tok // STRIP) * STRIP, v - STRIP)
    columns = table.T  # [E, V]
    strips = jax.vmap(lambda s: jax.lax.dynamic_slice(columns, (0, s), (e, STRIP)))(start)  # [T, E, 128]
    return jnp.take_along_axis(strips, (tok - start)[:, None, None], axis=2)[..., 0]


def unembed(x: jax.Array, table: jax.Array | QEmbedding, *, impl: str | None = None,
            interpret: bool | None = None, int8_activations: bool = False) -> jax.Array:
    """Tied LM head ``x[..., E] @ table.T -> f32[..., V]`` (a QEmbedding's QArray is already ``[E, V]``).

    A float table is contracted over its last axis as stored: with a bf16 table, ``x @ table.T`` made
    XLA:CPU convert the whole table to float32 every step.
    """
    if isinstance(table, QEmbedding):
        return linear(x, table.table, impl=impl, interpret=interpret, int8_activations=int8_activations,
                      out_dtype=jnp.float32)
    if table.ndim != 2 or x.shape[-1] != table.shape[1]:
        raise ValueError(f"unembed: x {x.shape} and table {table.shape} do not match as [..., E] @ [V, E].T")
    return jax.lax.dot_general(x, table.astype(x.dtype), (((x.ndim - 1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32)
