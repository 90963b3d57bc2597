"""Load a GGUF model keeping its Q8_0 / Q4_0 / Q4_1 tensors quantized (lossless import).

Every linear weight stored as Q8_0 / Q4_0 / Q4_1 becomes a :class:`~pallas_kernels.quantized_matmul.qarray.QArray`
(``int8-g32`` / ``int4-g32`` / ``int4-g32-asym`` with float16 scales: a byte transpose of the GGUF
blocks, see :mod:`jaxinfer.gguf_qarray`); llama.cpp's q/k row permutation is undone by permuting the
QArray's output columns. A token embedding in one of those types becomes a
:class:`~jaxinfer.models.qembedding.QEmbedding` (GGUF already stores it as ``[E, V]`` blocks along ``E``): lookups
dequantize only the gathered rows, and a tied LM head multiplies by it directly. Every other tensor
(norms, F32 / F16 / K-quant weights) is loaded as float exactly as the float loader does (each process
reading only its devices' slices). Each leaf is placed in the ``NamedSharding`` its logical axes map to; a
quantized tensor is read whole by every process and sliced on the host (not shard-local yet).
"""

from __future__ import annotations

import flax.linen as nn
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from gguf import GGMLQuantizationType as GGMLType
from tqdm.auto import tqdm

from jaxinfer.errors import WeightLoadError
from jaxinfer.gguf_qarray import qarray_from_gguf
from jaxinfer.models.qembedding import QEmbedding
from jaxinfer.sharding import place_param
from jaxinfer.weights import gguf_sources, unpermute_gguf_rows

LOSSLESS_TYPES = (GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q4_1)


def _q_permutation(path: tuple[str, ...], config) -> np.ndarray | None:
    """Column permutation undoing llama.cpp's row order for q_proj / k_proj, else ``None`` (also for the
    architectures whose conversion keeps HF's order: Qwen's)."""
    if config.architecture not in ("llama", "mistral", "mixtral"):
        return None
    if path[-2:] == ("q_proj", "kernel"):
        return unpermute_gguf_rows(np.arange(config.q_size), config.num_heads)
    if path[-2:] == ("k_proj", "kernel"):
        return unpermute_gguf_rows(np.arange(config.kv_size), config.num_kv_heads)
    return None


def load_gguf_native(ckpt, model, *, desc: str = "Loading GGUF (native)"):
    """Parameters of ``model`` from a :class:`~jaxinfer.weight_sources.GGUFCheckpoint`, lossless types kept
    quantized, each placed in its sharding under ``model.plan``.

    Returns:
      the parameter tree (QArray / QEmbedding / ``jax.Array`` leaves).

    Raises:
      WeightLoadError: a tensor is missing or its shape does not match the configuration.
    """
    from jaxinfer.weights import load_params

    config, plan = model.config, model.plan
    boxed = model.abstract_params()
    sources = gguf_sources(config)
    specs = flatten_dict(nn.unbox(boxed))
    names = flatten_dict(nn.get_partition_spec(boxed))
    native, rest = {}, {}
    for path, src in sources.items():
        t = ckpt.tensors.get(src.name)
        quantizable = path[-1] == "kernel" or path == ("embed_tokens",)
        if t is not None and quantizable and GGMLType(int(t.tensor_type)) in LOSSLESS_TYPES:
            native[path] = t
        else:
            rest[path] = src
    float_params = {}
    if rest:
        float_params = flatten_dict(load_params(ckpt, rest, _subset(boxed, set(rest)), plan.mesh, rules=plan.rules,
                                                desc=desc))
    out = dict(float_params)
    for path, t in tqdm(native.items(), desc=desc, unit="tensor", leave=False):
        spec = specs[path]
        emb = path == ("embed_tokens",)
        k, n = (spec.shape[1], spec.shape[0]) if emb else spec.shape
        ckpt.bytes_read += int(t.n_bytes)  # the whole quantized tensor (slices are taken on the host)
        try:
            qa = qarray_from_gguf(t.data, t.tensor_type, t.shape, dtype=spec.dtype)
        except ValueError as e:
            raise WeightLoadError(f"tensor {t.name}: {e}") from e
        if qa.shape != (k, n):
            raise WeightLoadError(f"tensor {t.name} has shape {qa.shape} (K, N) but the configuration implies "
                                  f"{(k, n)} for parameter {'/'.join(path)}")
        perm = _q_permutation(path, config)
        if perm is not None:
            qa = qa.take_columns(perm)
        out[path] = place_param(QEmbedding(qa) if emb else qa, names[path], plan)
    return unflatten_dict(out)


def _subset(boxed, paths: set):
    flat = flatten_dict(boxed, is_leaf=lambda _, x: isinstance(x, nn.LogicallyPartitioned))
    return unflatten_dict({p: v for p, v in flat.items() if p in paths})
