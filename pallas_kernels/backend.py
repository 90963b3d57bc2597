"""Kernel implementation selection by backend.

The kernel entry points (:func:`pallas_kernels.ragged_paged_attention.api.ragged_paged_attention`,
:func:`pallas_kernels.quantized_matmul.api.quantized_matmul`) take ``impl`` in
``{"xla", "pallas_tpu", "pallas_gpu"}`` or ``None``; ``None`` resolves through :func:`default_impl` from
the default JAX backend: the Pallas kernel on a TPU or GPU, the pure-jnp ``"xla"`` reference elsewhere
(Pallas runs on the CPU only in interpret mode, which is for tests, not speed). Ragged paged attention
and the quantized matmul also take ``"cpu"``, C++ kernels behind ``jax.ffi``
(:mod:`pallas_kernels.ragged_paged_attention.cpu`, :mod:`pallas_kernels.quantized_matmul.cpu`), their
default on the CPU when a C++ compiler is found (the grouped matmul has no C++ kernel and runs ``"xla"``
for ``"cpu"``). Choosing builds nothing: a C++ kernel is built where it is first called, and the default
falls back to ``"xla"`` there if the build fails.
"""

from __future__ import annotations

import os

import jax

IMPLS = ("xla", "cpu", "pallas_tpu", "pallas_gpu")
ATTENTION_IMPLS = IMPLS


class KernelUnavailableError(RuntimeError):
    """The requested kernel implementation cannot run on this backend."""


def default_impl(platform: str | None = None, *, attention: bool = False) -> str:
    """Implementation used when an op gets ``impl=None`` (``attention=True``: ragged paged attention).

    ``JAXINFER_KERNEL_IMPL`` overrides the choice (e.g. ``xla`` to force the reference path). On the
    CPU, attention and the quantized matmul use their C++ kernels when they can be built
    (``buildable()`` of :mod:`pallas_kernels.ragged_paged_attention.cpu` /
    :mod:`pallas_kernels.quantized_matmul.cpu`: built already, or not tried yet and a compiler exists),
    else ``"xla"``. This only decides and builds nothing; the build happens on the kernel's first call,
    which falls back to ``"xla"`` if it fails.
    """
    forced = os.environ.get("JAXINFER_KERNEL_IMPL")
    if forced:
        return check_impl(forced)
    platform = platform or jax.default_backend()
    if platform == "tpu":
        return "pallas_tpu"
    if platform in ("gpu", "cuda", "rocm"):
        return "pallas_gpu"
    if platform == "cpu":
        if attention:
            from pallas_kernels.ragged_paged_attention import cpu
        else:
            from pallas_kernels.quantized_matmul import cpu
        return "cpu" if cpu.buildable() else "xla"
    return "xla"


def check_impl(impl: str, valid: tuple[str, ...] = IMPLS) -> str:
    """Validate an ``impl`` name against ``valid``, raising ``ValueError`` listing the valid ones."""
    if impl not in valid:
        raise ValueError(f"unknown kernel impl {impl!r}; expected one of {valid}")
    return impl


def needs_interpret(impl: str, interpret: bool | None) -> bool:
    """Whether a Pallas kernel must run in interpret mode.

    ``interpret=None`` means: interpret exactly when the default backend cannot compile ``impl``
    (a Pallas TPU kernel off a TPU, a Pallas GPU kernel off a GPU).
    """
    if interpret is not None:
        return interpret
    platform = jax.default_backend()
    if impl == "pallas_tpu":
        return platform != "tpu"
    if impl == "pallas_gpu":
        return platform not in ("gpu", "cuda", "rocm")
    return False
