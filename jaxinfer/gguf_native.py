"""Load a GGUF model keeping its Q8_0 / Q4_0 / Q4_1 tensors quantized (lossless import), shard-locally.

Every linear weight stored as Q8_0 / Q4_0 / Q4_1 becomes a :class:`~pallas_kernels.quantized_matmul.qarray.QArray`
(``int8-g32`` / ``int4-g32`` / ``int4-g32-asym`` with float16 scales: a byte transpose of the GGUF
blocks, see :mod:`jaxinfer.gguf_qarray`); llama.cpp's q/k row permutation is undone by permuting the
QArray's output columns. A token embedding in one of those types becomes a
:class:`~jaxinfer.models.qembedding.QEmbedding` (GGUF already stores it as ``[E, V]`` blocks along ``E``): lookups
dequantize only the gathered rows, and a tied LM head multiplies by it directly. Every other tensor
(norms, F32 / F16 / K-quant weights) is loaded as float exactly as the float loader does.

Each QArray leaf is built in its own sharding (:mod:`jaxinfer.qarray_reads`) from only the GGUF blocks
its process's devices hold: a GGUF row is one output column ``n`` (its blocks run along ``K``), so a
column-split weight reads its devices' rows (whole heads of them where q/k rows are permuted) and a
row-split weight the blocks of its ``K`` range in every row. A block holds its values and its scale (and
Q4_1's offset), so ``value``, ``scale`` and ``offset`` of one device come from the same bytes, read once.
"""

from __future__ import annotations

from dataclasses import dataclass

import flax.linen as nn
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from gguf import GGMLQuantizationType as GGMLType
from tqdm.auto import tqdm

from jaxinfer.errors import WeightLoadError
from jaxinfer.gguf_qarray import block_fields, lossless_config
from jaxinfer.models.qembedding import QEmbedding
from jaxinfer.qarray_reads import load_qarray, qarray_shardings
from jaxinfer.weights import gguf_sources, log_bytes_read, unpermute_gguf_rows
from pallas_kernels.quantized_matmul.qarray import abstract_qarray

LOSSLESS_TYPES = (GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q4_1)


def _permuted_heads(path: tuple[str, ...], config) -> int:
    """The head count whose llama.cpp row order q_proj / k_proj undo, else 0 (also for the architectures
    whose conversion keeps HF's order: Qwen's)."""
    if config.architecture not in ("llama", "mistral", "mixtral"):
        return 0
    if path[-2:] == ("q_proj", "kernel"):
        return config.num_heads
    if path[-2:] == ("k_proj", "kernel"):
        return config.num_kv_heads
    return 0


@dataclass(frozen=True)
class GGUFQuantSource:
    """A Q8_0 / Q4_0 / Q4_1 GGUF tensor ``name`` (``N`` rows of ``K / 32`` blocks) as the leaves of a
    ``[K, N]`` QArray; ``heads``: undo llama.cpp's row permutation within each of that many heads (0: none).

    :meth:`read` gives any slice of ``value`` / ``scale`` / ``offset`` from the blocks that hold it.
    """

    name: str
    heads: int = 0

    def read(self, ckpt, field: str, index: tuple[slice, slice], cache: dict | None = None) -> np.ndarray:
        """``field[index]`` from ``ckpt`` (a :class:`~jaxinfer.weight_sources.GGUFCheckpoint`); ``cache`` (kept
        by the caller for one tensor) holds the decoded block regions, so the leaves and replicas of one
        region read it once."""
        t = ckpt.tensors[self.name]
        n_all, k_all = ckpt.shape(self.name)
        per = 1 if field != "value" else (32 if GGMLType(int(t.tensor_type)) == GGMLType.Q8_0 else 16)
        rows = k_all // 32 * (per if field == "value" else 1)
        (k0, k1, _), (n0, n1, _) = index[0].indices(rows), index[1].indices(n_all)
        b0, b1 = k0 // per, -(-k1 // per)
        a, b = n0, n1
        if self.heads:  # whole heads of stored rows
            hs = n_all // self.heads
            a, b = a // hs * hs, -(-b // hs) * hs
        key = (a, b, b0, b1)
        fields = cache.get(key) if cache is not None else None
        if fields is None:
            value, scale, offset = block_fields(ckpt.read_blocks(self.name, (a, b), (b0, b1)), t.tensor_type)
            if self.heads:
                perm = unpermute_gguf_rows(np.arange(b - a), (b - a) // hs)
                value, scale = value[:, perm], scale[:, perm]
                offset = None if offset is None else offset[:, perm]
            fields = {"value": value, "scale": scale, "offset": offset}
            if cache is not None:
                cache[key] = fields
        return fields[field][k0 - b0 * per : k1 - b0 * per, n0 - a : n1 - a]


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
    read_before = ckpt.bytes_read
    out = {}
    if rest:
        out = flatten_dict(load_params(ckpt, rest, _subset(boxed, set(rest)), plan.mesh, rules=plan.rules,
                                       desc=desc, log=False))
    for path, t in tqdm(native.items(), desc=desc, unit="tensor", leave=False):
        spec = specs[path]
        emb = path == ("embed_tokens",)
        k, n = (spec.shape[1], spec.shape[0]) if emb else spec.shape
        if tuple(int(d) for d in t.shape) != (k, n):
            raise WeightLoadError(f"tensor {t.name} has shape {tuple(int(d) for d in t.shape)} (K, N) but the "
                                  f"configuration implies {(k, n)} for parameter {'/'.join(path)}")
        try:
            abstract = abstract_qarray(k, n, lossless_config(t.tensor_type), spec.dtype)
        except ValueError as e:
            raise WeightLoadError(f"tensor {t.name}: {e}") from e
        axes = tuple(names[path])
        shardings = qarray_shardings(abstract, (axes[1], axes[0]) if emb else axes, plan)
        src, cache = GGUFQuantSource(t.name, _permuted_heads(path, config)), {}
        qa = load_qarray(abstract, shardings, lambda f, i, src=src, cache=cache: src.read(ckpt, f, i, cache))
        out[path] = QEmbedding(qa) if emb else qa
    total = sum(ckpt.nbytes(s.name) for p, s in sources.items() if p in specs)
    log_bytes_read(ckpt.bytes_read - read_before, total)
    return unflatten_dict(out)


def _subset(boxed, paths: set):
    flat = flatten_dict(boxed, is_leaf=lambda _, x: isinstance(x, nn.LogicallyPartitioned))
    return unflatten_dict({p: v for p, v in flat.items() if p in paths})
