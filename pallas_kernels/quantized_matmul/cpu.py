"""Weight-only quantized matmul on the CPU: a C++ kernel (``cpu_kernel.cc``) called through ``jax.ffi``.

XLA:CPU runs the pure-jnp path (:mod:`.reference`) by converting the whole int8 / int4 weight to the
activations' dtype in every call and then running a float dot, so a decode step reads (and writes) far
more than the packed weight. The C++ kernel streams the packed weight once and dequantizes it in
registers for small M (decode), and for larger M (prefill) dequantizes one block of columns at a time
into a cache-resident panel multiplied with AMX tiles (AMX-BF16), bfloat16 dot instructions (AVX512-BF16)
or float32 FMAs (see the comment at the top of ``cpu_kernel.cc``). Work is spread over XLA's intra-op thread pool.
With ``int8_activations`` on a CPU with AVX512-VNNI the prefill path instead quantizes the activations to
int8 per 32-block and runs an integer dot (``vpdpbusd``, ``cpu_vnni.h``): W8A8-style numerics, opt-in.

Formats: ``int8`` (per channel or group-wise, e.g. GGUF Q8_0 as ``int8-g32``), ``int4`` symmetric and
asymmetric (GGUF Q4_0 / Q4_1 as ``int4-g32`` / ``int4-g32-asym``), with float32, float16 or bfloat16
scales; activations float32 or bfloat16. fp8 weights and W8A8 formats are not taken
(:func:`unsupported_reason`); the dispatcher runs the XLA path for them.

Building, caching and the fallback follow the CPU attention kernel (:mod:`pallas_kernels.cpu_build`):
:func:`buildable` is cheap and builds nothing, :func:`available` builds and registers once.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import cpu_build
from pallas_kernels.quantized_matmul.qarray import QArray

_TARGET = "jaxinfer_quantized_matmul_cpu"
_X_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))

#: Largest M run by the streaming (decode) path; larger M dequantizes panels (bench/quant_matmul.py).
GEMV_MAX_M = 8
#: Products with fewer weight bytes x rows than this run on the calling thread only.
PARALLEL_MIN_BYTES = 128 * 1024
#: Activation quantization block along K of the int8 dot path (``int8_activations``).
INT8_BLOCK = 32
#: With ``int8_activations``, the largest M run by the streaming path: the int8 panel path is already
#: faster at 8 rows (bench/quant_matmul.py; about even at 4).
INT8_GEMV_MAX_M = 4

#: The C++ kernel (built on first use; :mod:`pallas_kernels.cpu_build`).
KERNEL = cpu_build.CpuKernel(Path(__file__).with_name("cpu_kernel.cc"), prefix="qmm_cpu",
                             symbol="JaxinferQuantizedMatmulCpu", target=_TARGET, what="CPU quantized-matmul kernel")
buildable = KERNEL.buildable
available = KERNEL.available


def unsupported_reason(x: jax.Array, w: QArray) -> str | None:
    """Why the kernel cannot take these operands (``None`` if it can)."""
    cfg = w.config
    if cfg.act is not None:
        return f"impl='cpu' takes weight-only formats, not {cfg.name}"
    if cfg.weight not in ("int8", "int4"):
        return f"impl='cpu' takes int8 / int4 weights, not {cfg.weight}"
    if jnp.dtype(x.dtype) not in _X_DTYPES:
        return f"impl='cpu' takes float32 or bfloat16 activations, got {x.dtype}"
    if w.ndim != 2:
        return "impl='cpu' takes a 2-D weight"
    return None


def amx_enabled() -> bool:
    """Whether the kernel's bfloat16 panel path (M > :data:`GEMV_MAX_M`, K a multiple of 32) multiplies on
    AMX tiles: built for a CPU with AMX-BF16 (``-march=native``), the tile state granted by the OS, and
    ``JAXINFER_CPU_AMX`` not ``0`` (read once per process; ``0`` keeps the AVX512-BF16 dot)."""
    return available() and bool(KERNEL.lib.JaxinferQuantizedMatmulAmx())


def has_vnni() -> bool:
    """Whether this CPU has AVX512-VNNI (``vpdpbusd``), which the int8 dot path needs (the kernel is built
    for the host CPU, ``-march=native``)."""
    return "avx512_vnni" in cpu_build.cpu_flags().split()


def int8_path_taken(k: int, w: QArray, m: int, *, gemv_max_m: int = INT8_GEMV_MAX_M) -> bool:
    """Whether ``quantized_matmul_cpu(..., int8_activations=True)`` of ``x[m, k]`` runs the int8 dot (else
    the float path, with the float path's numerics): AVX512-VNNI, the panel path (``m > gemv_max_m``),
    ``K`` a multiple of 32 and the weight's groups (if any) multiples of 32."""
    g = w.config.group_size or k
    return has_vnni() and m > gemv_max_m and k % INT8_BLOCK == 0 and g % INT8_BLOCK == 0


def quantized_matmul_cpu(x: jax.Array, w: QArray, out_dtype, *, gemv_max_m: int | None = None,
                         parallel_min_bytes: int | None = None, int8_activations: bool = False) -> jax.Array:
    """``x[M, K] @ dequantize(w)[K, N] -> [M, N]`` in ``out_dtype`` through the C++ kernel.

    Args:
      x: float32 or bfloat16 activations ``[M, K]``.
      w: int8 / int4 weight-only :class:`QArray` of logical shape ``[K, N]``.
      out_dtype: any float dtype (float32 / bfloat16 are written by the kernel, others cast after).
      gemv_max_m: largest M run by the streaming path (a tuning knob; both float paths give the same math;
        default :data:`GEMV_MAX_M`, or :data:`INT8_GEMV_MAX_M` where ``int8_activations`` runs the int8 dot,
        :func:`int8_path_taken`).
      parallel_min_bytes: products with fewer weight bytes x M run on the calling thread alone (default
        :data:`PARALLEL_MIN_BYTES`).
      int8_activations: where :func:`int8_path_taken`, quantize each row of ``x`` to int8 per block of
        :data:`INT8_BLOCK` along K (``d = max|x| / 127``, round to nearest even) and multiply the integer
        levels with AVX512-VNNI (W8A8-style numerics, as llama.cpp runs its quantized formats; see
        ``cpu_vnni.h``). Elsewhere the float path runs as with ``False``.

    Raises:
      KernelUnavailableError: the kernel could not be built here.
      ValueError: the operands are of a kind the kernel does not take.
    """
    KERNEL.require()
    reason = unsupported_reason(x, w)
    if reason:
        raise ValueError(reason)
    cfg = w.config
    out_dtype = jnp.dtype(out_dtype)
    kernel_out = out_dtype if out_dtype in _X_DTYPES else jnp.dtype(jnp.float32)
    m, n = x.shape[0], w.shape[1]
    if gemv_max_m is None:  # the int8 dot's own crossover only where it runs; elsewhere the float path's
        int8 = int8_activations and int8_path_taken(x.shape[1], w, m)
        gemv_max_m = INT8_GEMV_MAX_M if int8 else GEMV_MAX_M
    offset = w.offset if w.offset is not None else jnp.zeros((1,), w.scale.dtype)
    call = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct((m, n), kernel_out), vmap_method="sequential")
    y = call(x, w.value, w.scale, offset, group_size=np.int64(cfg.group_size or 0),
             int4=np.int64(cfg.weight == "int4"), asymmetric=np.int64(not cfg.symmetric),
             gemv_max_m=np.int64(gemv_max_m),
             parallel_min_bytes=np.int64(PARALLEL_MIN_BYTES if parallel_min_bytes is None else parallel_min_bytes),
             int8_activations=np.int64(bool(int8_activations)))
    return y.astype(out_dtype)
