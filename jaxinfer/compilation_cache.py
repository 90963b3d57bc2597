"""Persistent JAX compilation cache, on by default.

Compiled executables are stored under the user cache directory so a second start skips XLA
compilation. Turn it off with ``JAXINFER_COMPILATION_CACHE=0`` (or ``enable_compilation_cache(False)``);
``JAXINFER_CACHE_DIR`` moves the whole jaxinfer cache.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import jax
import platformdirs

logger = logging.getLogger(__name__)

_ENV_SWITCH = "JAXINFER_COMPILATION_CACHE"


def cache_root() -> Path:
    """Root of jaxinfer's on-disk cache (models, tokenizers, compiled executables)."""
    override = os.environ.get("JAXINFER_CACHE_DIR")
    return Path(override) if override else Path(platformdirs.user_cache_dir("jaxinfer"))


def compilation_cache_enabled() -> bool:
    """Whether the environment allows the persistent compilation cache (default: yes)."""
    return os.environ.get(_ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def enable_compilation_cache(
    enabled: bool | None = None, directory: str | os.PathLike | None = None
) -> Path | None:
    """Point JAX's persistent compilation cache at ``directory`` (default ``<cache_root>/xla``).

    Args:
      enabled: ``None`` follows ``JAXINFER_COMPILATION_CACHE``; ``False`` leaves JAX's cache untouched.
      directory: where compiled executables go.

    Returns:
      The cache directory in use, or ``None`` when disabled.
    """
    if enabled is None:
        enabled = compilation_cache_enabled()
    if not enabled:
        return None
    path = Path(directory) if directory is not None else cache_root() / "xla"
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    # Cache everything that took noticeable time; tiny programs are cheaper to recompile than to read.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    logger.debug("JAX persistent compilation cache at %s", path)
    return path
