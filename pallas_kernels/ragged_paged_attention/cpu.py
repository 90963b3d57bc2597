"""Ragged paged attention on the CPU: a C++ kernel (``cpu_kernel.cc``) called through ``jax.ffi``.

XLA:CPU runs the pure-jnp path (:mod:`.reference`) by gathering pages into float32 blocks, and with a
16-bit or 8-bit cache it converts far more of the cache than a step reads. The C++ kernel reads each
sequence's pages in place, dequantizes one block of keys at a time into float32 tiles and runs an
online softmax over them, spread over XLA's intra-op thread pool (see the comment at the top of
``cpu_kernel.cc``).

The kernel is compiled on first use with the system C++ compiler (``$CXX``, else ``c++``/``g++``)
against jax's FFI headers (``jax.ffi.include_dir()``), for the host CPU (``-march=native``), and cached
under ``$JAXINFER_CACHE_DIR/cpu_kernels`` (default: the user cache directory). The cache key covers
the source, the flags, the compiler, jaxlib's version and the CPU's feature flags.

Choosing and building are separate. :func:`buildable` is cheap and side-effect free (is the kernel
built, or not yet tried and a compiler on the path?); :func:`pallas_kernels.backend.default_impl` asks
it. :func:`available` builds and registers the kernel (once; the result is remembered) and is called
where the kernel is about to be used: by the dispatcher and by :func:`ragged_paged_attention_cpu`.
Without a compiler the default implementation on the CPU is ``"xla"``; if the build fails,
:func:`available` is ``False``, the default falls back to ``"xla"`` and ``impl="cpu"`` raises
:class:`~pallas_kernels.backend.KernelUnavailableError`.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from pallas_kernels.backend import KernelUnavailableError
from pallas_kernels.ragged_paged_attention.pages import KVLayout, KVPages

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("cpu_kernel.cc")
_SYMBOL = "JaxinferRaggedPagedAttentionCpu"
_TARGET = "jaxinfer_ragged_paged_attention_cpu"
_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-march=native", "-mprefer-vector-width=512",
          "-fno-math-errno")
_Q_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
_KV_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.int8),
              jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.float8_e5m2))

_MAX_HEAD_DIM = 256  # kMaxVecs * kLanes in cpu_kernel.cc

_lock = threading.Lock()
_state: dict[str, object] = {}  # "ok": True, or "error": reason


def _cache_dir() -> Path:
    # The same root as jaxinfer.compilation_cache.cache_root (pallas_kernels does not import jaxinfer).
    override = os.environ.get("JAXINFER_CACHE_DIR")
    if override:
        return Path(override) / "cpu_kernels"
    import platformdirs

    return Path(platformdirs.user_cache_dir("jaxinfer")) / "cpu_kernels"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _build(compiler: str) -> Path:
    include = jax.ffi.include_dir()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
    key = hashlib.sha256("\0".join([_SOURCE.read_text(), " ".join(_FLAGS), version, jaxlib.__version__,
                                    platform.machine(), _cpu_flags()]).encode()).hexdigest()[:16]
    out = _cache_dir() / f"rpa_cpu_{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [compiler, *_FLAGS, f"-I{include}", str(_SOURCE), "-o", tmp]
    logger.info("building the CPU attention kernel: %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        os.unlink(tmp)
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    os.replace(tmp, out)  # atomic: concurrent builders each write their own temp file
    return out


def _load() -> None:
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set $CXX or install g++)")
    lib = ctypes.cdll.LoadLibrary(str(_build(compiler)))
    jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(getattr(lib, _SYMBOL)), platform="cpu")


def buildable() -> bool:
    """Whether the kernel is built, or not tried yet and a C++ compiler is on the path (builds nothing)."""
    if "ok" in _state:
        return True
    if "error" in _state:
        return False
    return _compiler() is not None


def available() -> bool:
    """Whether the CPU kernel is built (building it on the first call) and registered with XLA."""
    with _lock:
        if not _state:
            try:
                _load()
                _state["ok"] = True
            except Exception as e:  # noqa: BLE001 - any build / load failure means "fall back"
                _state["error"] = f"{type(e).__name__}: {e}"
                logger.warning("CPU attention kernel unavailable, using the XLA path: %s", _state["error"])
        return "ok" in _state


def unsupported_reason(q: jax.Array, kv: KVPages) -> str | None:
    """Why the kernel cannot take these inputs (``None`` if it can)."""
    if kv.layout is not KVLayout.TOKEN_MAJOR:
        return "impl='cpu' needs a token-major cache"
    if jnp.dtype(q.dtype) not in _Q_DTYPES:
        return f"impl='cpu' takes float32 or bfloat16 queries, got {q.dtype}"
    if jnp.dtype(kv.k.dtype) not in _KV_DTYPES:
        return f"impl='cpu' does not read a {kv.k.dtype} cache"
    if q.shape[-1] > _MAX_HEAD_DIM:
        return f"impl='cpu' takes head_dim <= {_MAX_HEAD_DIM}, got {q.shape[-1]}"
    return None


def ragged_paged_attention_cpu(q: jax.Array, kv: KVPages, kv_lens: jax.Array, page_indices: jax.Array,
                               cu_q_lens: jax.Array, num_seqs: jax.Array, *, sm_scale: float,
                               sliding_window: int | None = None, soft_cap: float | None = None) -> jax.Array:
    """The C++ kernel (arguments as in :func:`.api.ragged_paged_attention`, already validated).

    ``q [T, Hq, D]`` (f32 / bf16), token-major ``kv``, ``kv_lens i32[S]``, ``page_indices i32[S, P]``,
    ``cu_q_lens i32[S+1]``, ``num_seqs i32[1]`` -> ``[T, Hq, D]`` in ``q.dtype``.
    """
    if not available():
        raise KernelUnavailableError(f"the CPU attention kernel could not be built: {_state['error']}")
    reason = unsupported_reason(q, kv)
    if reason:
        raise ValueError(reason)
    none = jnp.zeros((1,), jnp.float32)
    ks = kv.k_scale if kv.quantized else none
    vs = kv.v_scale if kv.quantized else none
    call = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct(q.shape, q.dtype), vmap_method="sequential")
    return call(q, kv.k, kv.v, ks, vs, kv_lens.astype(jnp.int32), page_indices.astype(jnp.int32),
                cu_q_lens.astype(jnp.int32), num_seqs.astype(jnp.int32), sm_scale=np.float32(sm_scale),
                sliding_window=np.int64(sliding_window or 0), soft_cap=np.float32(soft_cap or 0.0))
