"""Method names -> weight formats, per-leaf group-size fallback, and byte accounting of parameter trees."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from jaxinfer.errors import QuantizationError
from jaxinfer.models.qembedding import QEmbedding
from pallas_kernels.quantized_matmul.config import GROUP_SIZES, QuantConfig
from pallas_kernels.quantized_matmul.qarray import QArray

METHODS = ("rtn", "gptq", "awq", "smoothquant", "fp8")


def method_config(method: str, bits: int | None = None, group_size: int | None | str = "default",
                  *, symmetric: bool = True, act: str | None = None) -> QuantConfig:
    """The weight format a method produces.

    Args:
      method: ``"rtn"``, ``"gptq"``, ``"awq"`` (integer weights, 4 or 8 bits), ``"smoothquant"`` (int8
        W8A8 with dynamic per-token activation scales) or ``"fp8"`` (float8_e4m3fn, per output channel).
      bits: 4 or 8 (default: 4 for AWQ, 8 otherwise; fp8 / smoothquant: 8 only).
      group_size: rows of K per scale (32, 64, 128) or ``None`` for per-output-channel scales; default
        128 for 4 bits and per channel for 8 bits.
      symmetric: ``False``: asymmetric int4 (scale + offset per group).
      act: ``"fp8"`` with method ``"fp8"`` gives W8A8 fp8 (activations quantized per token).

    Raises:
      QuantizationError: an unknown method or a combination the format cannot represent.
    """
    if method not in METHODS:
        raise QuantizationError(f"unknown quantization method {method!r}; expected one of {METHODS}")
    if bits is None:
        bits = 4 if method == "awq" else 8
    if bits not in (4, 8):
        raise QuantizationError(f"bits must be 4 or 8, got {bits}")
    if group_size == "default":
        group_size = 128 if bits == 4 else None
    if group_size == 0:
        group_size = None
    try:
        if method == "fp8":
            if bits != 8 or group_size is not None or act not in (None, "fp8"):
                raise QuantizationError("fp8 is 8-bit with per-channel scales (act None or 'fp8')")
            return QuantConfig("fp8", act=act)
        if method == "smoothquant":
            if bits != 8 or group_size is not None:
                raise QuantizationError("smoothquant produces int8 W8A8 weights with per-channel scales")
            return QuantConfig("int8", act="int8")
        if act is not None:
            raise QuantizationError(f"activation quantization is not available with method {method!r}")
        return QuantConfig("int4" if bits == 4 else "int8", group_size=group_size, symmetric=symmetric)
    except ValueError as e:
        if isinstance(e, QuantizationError):
            raise
        raise QuantizationError(str(e)) from e


def leaf_config(cfg: QuantConfig, k: int) -> QuantConfig | None:
    """``cfg`` for a weight with ``K`` rows: the group size falls back to the largest supported size that
    divides ``K`` when ``cfg.group_size`` does not (e.g. K = 576 with g128 -> g64); ``None`` if none does."""
    g = cfg.group_size
    if g is None or k % g == 0:
        return cfg
    for cand in sorted(GROUP_SIZES, reverse=True):
        if cand < g and k % cand == 0:
            return dataclasses.replace(cfg, group_size=cand)
    return None


def _is_weight_leaf(x) -> bool:
    return isinstance(x, (QArray, QEmbedding))


def param_bytes(params) -> dict:
    """Storage of a parameter tree (float, QArray and QEmbedding leaves).

    Returns:
      dict with ``total_bytes``, ``quantized_bytes`` (QArray / QEmbedding leaves), ``float_bytes``,
      ``num_params`` (logical parameters), ``quantized_params``, ``bytes_per_param`` (total / params) and
      ``float_bytes_as_bf16`` (total if float leaves were stored in bfloat16).
    """
    out = dict(total_bytes=0, quantized_bytes=0, float_bytes=0, num_params=0, quantized_params=0,
               float_params=0)
    for leaf in jax.tree.leaves(params, is_leaf=_is_weight_leaf):
        n = int(np.prod(leaf.shape))
        out["num_params"] += n
        if _is_weight_leaf(leaf):
            out["quantized_bytes"] += leaf.nbytes
            out["quantized_params"] += n
        else:
            out["float_bytes"] += n * np.dtype(leaf.dtype).itemsize
            out["float_params"] += n
    out["total_bytes"] = out["quantized_bytes"] + out["float_bytes"]
    out["bytes_per_param"] = out["total_bytes"] / max(out["num_params"], 1)
    out["float_bytes_as_bf16"] = out["quantized_bytes"] + 2 * out["float_params"]
    return out
