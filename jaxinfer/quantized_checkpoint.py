"""Quantized checkpoints: parameter leaves in safetensors files plus a JSON manifest, loaded shard-locally.

Directory layout::

    <dir>/jaxinfer_quant.json   manifest (format, method, group size, calibration, source model,
                                jaxinfer version, ModelConfig, the format of every quantized leaf)
    <dir>/params/*.safetensors  the storage tree, one tensor per array (files of at most 4 GiB)
    <dir>/tokenizer*.json ...   the model's tokenizer (``save_pretrained``)

The storage tree is the parameter tree with every :class:`~pallas_kernels.quantized_matmul.qarray.QArray` /
:class:`~jaxinfer.models.qembedding.QEmbedding` leaf replaced by a dict of its arrays (``value``, ``scale`` and,
when asymmetric, ``offset``), stored under their ``/``-joined paths (``layers_0/mlp/up_proj/kernel/value``),
so the files hold plain arrays only; the manifest says how to rebuild each quantized leaf. Loading
builds the abstract target (``jax.ShapeDtypeStruct`` with the ``NamedSharding`` that each leaf's logical
axes map to) from the manifest and the model definition, and builds every array in its sharding from the
memory-mapped files (:func:`jaxinfer.qarray_reads.sharded_array`): each process reads only the slices its
devices hold (a column-split weight's columns, a row-split one's packed rows and scale groups).
Format version 1 (an orbax checkpoint in ``<dir>/params/``, written before version 2) still loads, through
orbax, which reads each array whole in every process.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from jax.sharding import Mesh

from jaxinfer.errors import WeightLoadError
from jaxinfer.model_config import ModelConfig, RopeScaling
from jaxinfer.models.qembedding import QEmbedding
from jaxinfer.qarray_reads import sharded_array
from jaxinfer.sharding import ShardingPlan, make_mesh, plan_sharding
from jaxinfer.weight_sources import SafetensorsCheckpoint, write_safetensors
from jaxinfer.weights import log_bytes_read
from pallas_kernels.quantized_matmul.config import QuantConfig
from pallas_kernels.quantized_matmul.experts import abstract_expert_qarray
from pallas_kernels.quantized_matmul.qarray import QArray, abstract_qarray

MANIFEST = "jaxinfer_quant.json"
FORMAT_VERSION = 2
_ORBAX_VERSION = 1  # the storage tree as an orbax checkpoint (read whole by every process)
_FIELDS = ("value", "scale", "offset")
_FILE_BYTES = 4 << 30  # largest safetensors file written (a larger single tensor gets a file of its own)


def config_to_dict(config: ModelConfig) -> dict:
    return dataclasses.asdict(config)


def config_from_dict(d: dict) -> ModelConfig:
    """Inverse of :func:`config_to_dict`."""
    d = dict(d)
    d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
    d["eos_token_ids"] = tuple(d.get("eos_token_ids") or ())
    d["mlp_only_layers"] = tuple(d.get("mlp_only_layers") or ())
    if d.get("rope_freq_factors") is not None:
        d["rope_freq_factors"] = tuple(d["rope_freq_factors"])
    return ModelConfig(**d)


def _is_q(x) -> bool:
    return isinstance(x, (QArray, QEmbedding))


def _storage(params) -> tuple[dict, dict]:
    """``(flat storage {path tuple: array}, leaves {"a/b/c": meta})`` of a parameter tree."""
    flat = flatten_dict(params)
    storage, leaves = {}, {}
    for path, leaf in flat.items():
        if not _is_q(leaf):
            storage[path] = leaf
            continue
        qa = leaf.table if isinstance(leaf, QEmbedding) else leaf
        leaves["/".join(path)] = dict(kind="qembedding" if isinstance(leaf, QEmbedding) else "qarray",
                                      config=dataclasses.asdict(qa.config), dtype=qa.dtype.name)
        for f in _FIELDS:
            if getattr(qa, f) is not None:
                storage[(*path, f)] = getattr(qa, f)
    return storage, leaves


def save_quantized(out_dir: str | Path, model, params, *, info: dict | None = None,
                   source_model: str | None = None, tokenizer=None) -> Path:
    """Write a quantized (or float) parameter tree of ``model`` to ``out_dir``.

    Args:
      out_dir: target directory (created; must not already hold a checkpoint).
      model: the :class:`~jaxinfer.models.causal_lm.CausalLM`.
      params: parameter tree (QArray / QEmbedding / float leaves).
      info: the quantizer's description (``QuantizedModel.info``), stored in the manifest.
      source_model: name or path of the model that was quantized.
      tokenizer: saved alongside with ``save_pretrained`` when given.

    Returns:
      ``out_dir`` as a ``Path``.
    """
    import jaxinfer

    out = Path(out_dir).resolve()
    if (out / "params").exists():
        raise WeightLoadError(f"{out} already holds a checkpoint; choose a new directory")
    (out / "params").mkdir(parents=True)
    storage, leaves = _storage(params)
    files = _split_files({"/".join(p): a for p, a in storage.items()})
    for i, tensors in enumerate(files):
        write_safetensors(out / "params" / f"params-{i + 1:05d}-of-{len(files):05d}.safetensors", tensors)
    info = dict(info or {})
    cfg = info.get("config") or {}
    manifest = dict(
        format_version=FORMAT_VERSION, jaxinfer_version=jaxinfer.__version__,
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        source_model=source_model, method=info.get("method"), format=info.get("format"),
        group_size=cfg.get("group_size"), calibration=info.get("calibration"),
        dtype=jnp.dtype(model.dtype).name, model_config=config_to_dict(model.config),
        leaves=leaves, quantization=info,
    )
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, default=_json_default))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def _split_files(tensors: dict) -> list[dict]:
    """``tensors`` in order, in groups of at most :data:`_FILE_BYTES` (one group per file)."""
    files, size = [{}], 0
    for name, a in tensors.items():
        nbytes = int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
        if files[-1] and size + nbytes > _FILE_BYTES:
            files.append({})
            size = 0
        files[-1][name] = a
        size += nbytes
    return files


def _json_default(x):
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def read_manifest(path: str | Path) -> dict:
    p = Path(path) / MANIFEST
    try:
        manifest = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise WeightLoadError(f"{p}: cannot read the quantized-checkpoint manifest ({e})") from e
    if manifest.get("format_version") not in (FORMAT_VERSION, _ORBAX_VERSION):
        raise WeightLoadError(f"{p}: unsupported manifest format_version {manifest.get('format_version')!r}")
    return manifest


def abstract_quantized_params(model, leaves: dict, plan: ShardingPlan, dtype=None):
    """Abstract parameter tree for ``model`` with the quantized ``leaves`` (manifest entries).

    Returns:
      ``(abstract params, abstract storage)``: the first has ``QArray`` / ``QEmbedding`` /
      ``jax.ShapeDtypeStruct`` leaves, the second is the flat storage layout; every
      ``ShapeDtypeStruct`` carries the ``NamedSharding`` its logical axes map to under ``plan``.
    """
    boxed = model.abstract_params()
    specs = flatten_dict(nn.unbox(boxed))
    names = flatten_dict(nn.get_partition_spec(boxed))
    dtype = jnp.dtype(dtype or model.dtype)

    def sds(shape, dt, axes):
        return jax.ShapeDtypeStruct(shape, dt, sharding=plan.sharding(axes))

    tree, storage = {}, {}
    for path, spec in specs.items():
        axes = tuple(names[path])
        meta = leaves.get("/".join(path))
        if meta is None:
            tree[path] = storage[path] = sds(spec.shape, dtype, axes)
            continue
        cfg = QuantConfig(**meta["config"])
        emb = meta["kind"] == "qembedding"
        if len(spec.shape) == 3:  # stacked MoE experts [E, K, N]
            ab = abstract_expert_qarray(*spec.shape, cfg, dtype)
        else:
            k, n = (spec.shape[1], spec.shape[0]) if emb else spec.shape
            ab = abstract_qarray(k, n, cfg, dtype)
        ax = ab.logical_axes((axes[1], axes[0]) if emb else axes)
        fields = {}
        for f in _FIELDS:
            a = getattr(ab, f)
            if a is not None:
                fields[f] = storage[(*path, f)] = sds(a.shape, a.dtype, getattr(ax, f))
        qa = QArray(fields["value"], fields["scale"], fields.get("offset"), cfg, dtype)
        tree[path] = QEmbedding(qa) if emb else qa
    return unflatten_dict(tree), storage


def load_quantized(path: str | Path, *, dtype=None, mesh: Mesh | None = None, plan: ShardingPlan | None = None):
    """Load a checkpoint written by :func:`save_quantized`, each leaf built straight in its sharding from the
    slices of it that this process's devices hold.

    Args:
      dtype: float dtype of unquantized leaves and of computation (default: the saved one).
      mesh: where to place it (default: one device), under the default sharding plan for the model ...
      plan: ... or this sharding plan (its mesh wins over ``mesh``).

    Returns:
      ``(CausalLM, params, manifest)``; the model carries the plan.
    """
    from jaxinfer.models.causal_lm import CausalLM

    path = Path(path).resolve()
    manifest = read_manifest(path)
    config = config_from_dict(manifest["model_config"])
    plan = plan or plan_sharding(config, mesh or make_mesh())
    model = CausalLM(config, dtype or manifest["dtype"], plan)
    abstract, storage = abstract_quantized_params(model, manifest["leaves"], plan)
    if manifest["format_version"] == _ORBAX_VERSION:
        flat = _restore_orbax(path, storage)
    else:
        flat = _read_shards(path / "params", storage)
    out = {}
    for p, leaf in flatten_dict(abstract).items():
        if _is_q(leaf):
            qa = leaf.table if isinstance(leaf, QEmbedding) else leaf
            fields = [flat.get((*p, f)) if getattr(qa, f) is not None else None for f in _FIELDS]
            new = QArray(*fields, qa.config, qa.dtype)
            out[p] = QEmbedding(new) if isinstance(leaf, QEmbedding) else new
        else:
            out[p] = flat[p]
    return model, unflatten_dict(out), manifest


def _read_shards(directory: Path, storage: dict) -> dict:
    """Every array of ``storage`` (flat path -> ``ShapeDtypeStruct`` with a sharding) built in its sharding
    from the memory-mapped safetensors files in ``directory``, each process reading its devices' slices."""
    ckpt = SafetensorsCheckpoint(directory)
    out = {}
    for p, a in storage.items():
        name = "/".join(p)
        if name not in ckpt.keys():
            raise WeightLoadError(f"{directory}: tensor {name} is missing")
        stored, dt = ckpt.shape(name), ckpt.dtype(name)
        if stored != tuple(a.shape) or (dt != a.dtype and not jnp.issubdtype(a.dtype, jnp.floating)):
            raise WeightLoadError(f"{directory}: tensor {name} is {dt}{list(stored)}, the manifest and model "
                                  f"imply {a.dtype}{list(a.shape)}")
        out[p] = sharded_array(a.shape, a.dtype, a.sharding, lambda i, name=name: ckpt.read(name, i))
    log_bytes_read(ckpt.bytes_read, sum(ckpt.nbytes("/".join(p)) for p in storage))
    return out


def _restore_orbax(path: Path, storage: dict) -> dict:
    """Format version 1: the storage tree restored by orbax into its shardings (each array read whole)."""
    import orbax.checkpoint as ocp

    try:
        restored = ocp.StandardCheckpointer().restore(path / "params", unflatten_dict(storage))
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise WeightLoadError(f"{path}: cannot restore the quantized parameters ({e})") from e
    return flatten_dict(restored)
