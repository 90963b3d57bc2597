"""Public entry point: ``quantized_matmul(x, w)`` for any :class:`.qarray.QArray` format."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.backend import check_impl, default_impl, needs_interpret
from pallas_kernels.quantized_matmul.gpu import quantized_matmul_gpu
from pallas_kernels.quantized_matmul.qarray import QArray
from pallas_kernels.quantized_matmul.reference import quantized_matmul_reference
from pallas_kernels.quantized_matmul.tpu import quantized_matmul_tpu
from pallas_kernels.quantized_matmul.tuning import Blocks

_X_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def quantized_matmul(
    x: jax.Array,
    w: QArray,
    *,
    impl: str | None = None,
    interpret: bool | None = None,
    out_dtype=None,
    blocks: Blocks | None = None,
    int8_activations: bool = False,
) -> jax.Array:
    """``x @ dequantize(w)`` with dequantization fused into the matmul.

    Args:
      x: activations ``[..., K]`` (float32, bfloat16 or float16); any leading batch dims.
      w: quantized weight ``QArray`` of logical shape ``[K, N]`` (2-D; slice stacked layers first).
      impl: ``"xla"`` (pure-jnp reference), ``"cpu"`` (C++ kernel, :mod:`.cpu`), ``"pallas_tpu"``,
        ``"pallas_gpu"``, or ``None`` for the backend default (:func:`pallas_kernels.backend.default_impl`:
        ``"cpu"`` on the CPU when a compiler is found). ``"cpu"`` runs the XLA path for operands the C++
        kernel does not take (fp8, W8A8, float16 activations: a model may mix formats); if the kernel's
        build failed, the default falls back to ``"xla"`` and an explicit ``"cpu"`` raises
        :class:`~pallas_kernels.backend.KernelUnavailableError`.
      interpret: run a Pallas kernel in interpret mode (``None``: exactly when the backend cannot
        compile it, e.g. on the CPU).
      out_dtype: output dtype (default ``x.dtype``).
      blocks: optional kernel tile sizes (see :mod:`pallas_kernels.quantized_matmul.tuning`).
      int8_activations: ``impl="cpu"`` only (ignored by the others): the C++ kernel's int8 dot path with
        activations quantized per 32-block (W8A8-style numerics; where it applies, see
        :func:`pallas_kernels.quantized_matmul.cpu.int8_path_taken`).

    Returns:
      ``[..., N]`` in ``out_dtype``.
    """
    if not isinstance(w, QArray):
        raise TypeError(f"quantized_matmul needs a QArray weight, got {type(w).__name__}")
    if w.ndim != 2:
        raise ValueError(f"quantized_matmul needs a 2-D weight, got logical shape {w.shape}")
    x = jnp.asarray(x)
    if x.dtype not in _X_DTYPES:
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    k, n = w.shape
    if x.ndim < 1 or x.shape[-1] != k:
        raise ValueError(f"x last dim {x.shape[-1:]} does not match the weight's K={k}")
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    explicit = impl is not None
    impl = check_impl(impl or default_impl())
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.shape[0] == 0:
        return jnp.zeros((*lead, n), out_dtype)
    if impl == "cpu":
        from pallas_kernels.quantized_matmul import cpu

        # Operands the C++ kernel does not take run the XLA path; so does the default choice when building
        # the kernel (done here, on first use: default_impl() only checks for a compiler) fails.
        if cpu.unsupported_reason(x2, w) is None and (explicit or cpu.available()):
            return cpu.quantized_matmul_cpu(x2, w, out_dtype, int8_activations=int8_activations).reshape(*lead, n)
        impl = "xla"
    if impl == "xla":
        y = quantized_matmul_reference(x2, w, out_dtype)
    elif impl == "pallas_tpu":
        y = quantized_matmul_tpu(
            x2, w, out_dtype=out_dtype, interpret=needs_interpret(impl, interpret), blocks=blocks
        )
    else:
        y = quantized_matmul_gpu(
            x2, w, out_dtype=out_dtype, interpret=needs_interpret(impl, interpret), blocks=blocks
        )
    return y.reshape(*lead, n)
