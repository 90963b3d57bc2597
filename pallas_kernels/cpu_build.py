"""Build, cache and register the project's C++ CPU kernels (called through ``jax.ffi``).

A kernel source is compiled on first use with the system C++ compiler (``$CXX``, else
``c++``/``g++``/``clang++``) against jax's FFI headers (``jax.ffi.include_dir()``), for the host CPU
(``-march=native``), with this folder on the include path for the headers the kernels share
(``cpu_simd.h``: vector types and conversions; ``cpu_parallel.h``: spreading work items over XLA's
intra-op thread pool), and cached under ``$JAXINFER_CACHE_DIR/cpu_kernels`` (default: the user cache
directory). The cache key covers the source, the shared headers and those beside the source, the flags,
the compiler, jaxlib's version and the CPU's feature flags, so a changed source or header, or another CPU, builds anew.

Each kernel module holds one :class:`CpuKernel` and exposes its :meth:`~CpuKernel.buildable` (cheap,
builds nothing: asked when choosing an implementation) and :meth:`~CpuKernel.available` (builds and
registers once, remembers a failure: called where the kernel is about to run).
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
import jaxlib

from pallas_kernels.backend import KernelUnavailableError

logger = logging.getLogger(__name__)

FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-march=native", "-mprefer-vector-width=512",
         "-fno-math-errno")
#: Where the headers shared by the kernels live (``#include "cpu_simd.h"``).
HEADER_DIR = Path(__file__).parent


def cache_dir() -> Path:
    """Where built kernels live (the same root as ``jaxinfer.compilation_cache.cache_root``; pallas_kernels
    does not import jaxinfer)."""
    override = os.environ.get("JAXINFER_CACHE_DIR")
    if override:
        return Path(override) / "cpu_kernels"
    import platformdirs

    return Path(platformdirs.user_cache_dir("jaxinfer")) / "cpu_kernels"


def compiler() -> str | None:
    """Path of the C++ compiler to use, or ``None`` when there is none."""
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def cpu_flags() -> str:
    """The host CPU's feature-flag line (part of the cache key)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def build(source: Path, prefix: str, cxx: str) -> Path:
    """Compile ``source`` into a shared library (or find it cached); returns its path.

    Raises:
      RuntimeError: the compiler failed (its error output is in the message).
    """
    include = jax.ffi.include_dir()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False).stdout
    # The shared headers and those beside the source (a kernel's own, e.g. quantized_matmul/cpu_vnni.h).
    header_files = sorted({*HEADER_DIR.glob("*.h"), *source.parent.glob("*.h")})
    headers = [f"{h.parent.name}/{h.name}\0{h.read_text()}" for h in header_files]
    key = hashlib.sha256("\0".join([source.read_text(), *headers, " ".join(FLAGS), version, jaxlib.__version__,
                                    platform.machine(), cpu_flags()]).encode()).hexdigest()[:16]
    out = cache_dir() / f"{prefix}_{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [cxx, *FLAGS, f"-I{HEADER_DIR}", f"-I{include}", str(source), "-o", tmp]
    logger.info("building a CPU kernel: %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        os.unlink(tmp)
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    os.replace(tmp, out)  # atomic: concurrent builders each write their own temp file
    return out


class CpuKernel:
    """One C++ kernel: its source, the FFI handler ``symbol`` it exports and the XLA ``target`` it is
    registered as; ``what`` names it in messages.

    ``state`` is ``{}`` (not tried), ``{"ok": True}`` or ``{"error": reason}``.
    """

    def __init__(self, source: Path, *, prefix: str, symbol: str, target: str, what: str):
        self.source, self.prefix, self.symbol, self.target, self.what = source, prefix, symbol, target, what
        self.state: dict[str, object] = {}
        self.lib: ctypes.CDLL | None = None  # the loaded library, once available()
        self._lock = threading.Lock()

    def buildable(self) -> bool:
        """Whether the kernel is built, or not tried yet and a C++ compiler is on the path (builds nothing)."""
        if "ok" in self.state:
            return True
        if "error" in self.state:
            return False
        return compiler() is not None

    def available(self) -> bool:
        """Whether the kernel is built (building it on the first call) and registered with XLA.

        A failure is logged, remembered and reported as ``False``.
        """
        with self._lock:
            if not self.state:
                try:
                    cxx = compiler()
                    if cxx is None:
                        raise RuntimeError("no C++ compiler found (set $CXX or install g++)")
                    lib = self.lib = ctypes.cdll.LoadLibrary(str(build(self.source, self.prefix, cxx)))
                    jax.ffi.register_ffi_target(self.target, jax.ffi.pycapsule(getattr(lib, self.symbol)),
                                                platform="cpu")
                    self.state["ok"] = True
                except Exception as e:  # noqa: BLE001 - any build / load failure means "fall back"
                    self.state["error"] = f"{type(e).__name__}: {e}"
                    logger.warning("%s unavailable, using the XLA path: %s", self.what, self.state["error"])
            return "ok" in self.state

    def require(self) -> None:
        """Build and register the kernel if need be.

        Raises:
          KernelUnavailableError: it could not be built here (the reason is in the message).
        """
        if not self.available():
            raise KernelUnavailableError(f"the {self.what} could not be built: {self.state['error']}")
