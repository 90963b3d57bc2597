"""Ahead-of-time compilation of the engine's steps for a TPU or GPU this machine does not have.

``compile_for_target`` builds the engine's pieces on abstract weights and an abstract KV cache, placed on
compile-only devices of the target (:mod:`pallas_kernels.targets`), lowers the engine's own jitted step for
every bucket the engine would use and compiles it with the vendor's compiler (XLA TPU + Mosaic, or XLA GPU +
Triton + ptxas). Nothing executes: it answers "does it fit, does it compile, what could it reach" with
compiled memory figures and a roofline estimate, never with a measured speed.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from jax.sharding import Mesh

from jaxinfer.config import EngineConfig
from jaxinfer.device_batch import BatchBuilder
from jaxinfer.engine import scheduler_config, size_kv_cache, step_buckets
from jaxinfer.hlo_traffic import op_traffic, traffic_by_source
from jaxinfer.model_config import ModelConfig
from jaxinfer.model_registry import DEFAULT_MODEL
from jaxinfer.models.causal_lm import CausalLM
from jaxinfer.runner import ModelRunner
from jaxinfer.sharding import MESH_AXES, ShardingPlan, plan_sharding
from jaxinfer.step_inputs import StepBuckets
from jaxinfer.target import Kernels
from pallas_kernels.quantized_matmul.config import PRESETS, as_config
from pallas_kernels.quantized_matmul.experts import abstract_expert_qarray
from pallas_kernels.quantized_matmul.qarray import abstract_qarray
from pallas_kernels.ragged_paged_attention.pages import KVLayout, page_bytes_per_token
from pallas_kernels.targets import Target, get_target, target_devices

AUTO_DTYPE_ON_ACCELERATORS = jnp.bfloat16
TOP_OPS = 8  # largest XLA ops kept per bucket in the report

# Compiler options of a compile-only build, per platform. XLA's GPU compiler rewrites large sorts (the
# sampler's top-k / top-p over the vocabulary at batch >= ~16) to CUB's radix sort and asks the CUDA runtime
# for its scratch size, which fails without a GPU ("invalid device ordinal"); a deviceless compile keeps
# XLA's own sort instead. A real GPU compiles with the default (CUB).
DEVICELESS_COMPILER_OPTIONS = {"cuda": {"xla_gpu_enable_cub_radix_sort": False}}


def parse_target(text: str) -> tuple[Target, int]:
    """``"tpu-v5e-8"`` -> (the tpu-v5e target, 8 chips); ``"h100"`` -> (h100, 1)."""
    name, _, count = text.rpartition("-")
    if name and count.isdigit():
        return get_target(name), int(count)
    return get_target(text), 1


def model_config_for(model: str | None) -> ModelConfig:
    """A model's config without loading its weights: an HF ``config.json`` (file or directory), a GGUF
    file's metadata, a quantized checkpoint's manifest, or a registered name / hub id."""
    from jaxinfer.loader import load_config
    from jaxinfer.model_registry import resolve_model

    path = Path(model) if model else None
    if path is not None and path.is_file() and path.suffix == ".json":
        return ModelConfig.from_hf(json.loads(path.read_text()))
    source = resolve_model(model)
    if source.kind == "quantized":
        from jaxinfer.quantized_checkpoint import config_from_dict, read_manifest

        return config_from_dict(read_manifest(source.path)["model_config"])
    return load_config(source)[0]


def abstract_params(model: CausalLM, quantization: str | None = None):
    """The model's parameters as ``ShapeDtypeStruct`` leaves in their shardings under ``model.plan``;
    with ``quantization`` (a preset of :data:`PRESETS`), every decoder linear kernel is an abstract
    ``QArray`` of that format (embedding and LM head stay float, as ``jaxinfer quantize`` keeps them)."""
    plan = model.plan
    boxed = model.abstract_params()
    specs, names = flatten_dict(nn.unbox(boxed)), flatten_dict(nn.get_partition_spec(boxed))
    cfg = as_config(quantization) if quantization else None

    def place(leaf, axes):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=plan.sharding(tuple(axes)))

    out = {}
    for path, spec in specs.items():
        axes = tuple(names[path])
        expert = len(path) >= 2 and path[-2] == "experts"  # stacked MoE experts [E, K, N]
        router = path[-2:] in (("gate", "kernel"), ("shared_expert_gate", "kernel"))  # MoE routing stays float
        if cfg is not None and expert:
            qa = abstract_expert_qarray(*spec.shape, cfg, model.dtype)
            out[path] = jax.tree.map(place, qa, qa.logical_axes(axes), is_leaf=lambda x: isinstance(x, tuple))
        elif cfg is not None and path[-1] == "kernel" and path[0].startswith("layers_") and not router:
            qa = abstract_qarray(spec.shape[0], spec.shape[1], cfg, model.dtype)
            out[path] = jax.tree.map(place, qa, qa.logical_axes(axes), is_leaf=lambda x: isinstance(x, tuple))
        else:
            out[path] = place(spec, axes)
    return unflatten_dict(out)


def bytes_per_device(tree) -> int:
    """Bytes of an abstract (or concrete) sharded pytree held by one device."""
    return sum(
        int(np.prod(leaf.sharding.shard_shape(leaf.shape))) * jnp.dtype(leaf.dtype).itemsize
        for leaf in jax.tree.leaves(tree)
    )


@dataclass
class BucketResult:
    """One compiled step bucket: ``tokens`` x ``seqs``; memory per device from the compiler."""

    tokens: int
    seqs: int
    ok: bool
    seconds: float
    error: str | None = None
    argument_bytes: int = 0
    output_bytes: int = 0
    alias_bytes: int = 0
    temp_bytes: int = 0
    bytes_accessed: int = 0  # the compiler's cost analysis, per device (kernels' operands as it counts them)
    hlo_bytes: int = 0  # HBM bytes of the compiled program's XLA ops, attention kernels left out (hlo_traffic),
    # on the plain path (the cheapest branch of each conditional: no penalties, filtering or prompt logprobs)
    hlo_bytes_max: int = 0  # the same with the costliest branch of each conditional (every option on)
    minimum_bytes: int = 0  # weights once + embedding rows + KV read of the context + KV write (per device)
    estimated_bytes: int = 0  # hlo_bytes + the attention kernels' page reads at the context (padding included)
    estimated_bytes_max: int = 0  # hlo_bytes_max + the same page reads
    top_ops: list = field(default_factory=list)  # [(source op, bytes)] of the largest XLA ops

    @property
    def traffic_ratio(self) -> float:
        """``estimated_bytes / minimum_bytes``: the plain path (0 when not measured)."""
        return self.estimated_bytes / self.minimum_bytes if self.minimum_bytes else 0.0

    @property
    def traffic_ratio_max(self) -> float:
        """``estimated_bytes_max / minimum_bytes``: every optional branch taken (0 when not measured)."""
        return self.estimated_bytes_max / self.minimum_bytes if self.minimum_bytes else 0.0

    @property
    def peak_bytes(self) -> int:
        """Arguments + outputs not aliased to them + temporaries, per device."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes


@dataclass
class Roofline:
    """A decode step's lower bound on the target: HBM bytes that must move (weights + the KV actually read)
    over the bandwidth, and flops over the peak; ``tokens_per_s`` = batch / the larger of the two."""

    batch: int
    context: int
    bytes_per_device: int
    flops_per_device: float
    memory_seconds: float
    compute_seconds: float

    @property
    def step_seconds(self) -> float:
        return max(self.memory_seconds, self.compute_seconds)

    @property
    def tokens_per_s(self) -> float:
        return self.batch / self.step_seconds


@dataclass
class CompileReport:
    """What :func:`compile_for_target` found."""

    target: str
    chips: int
    model: str
    quantization: str | None
    kv_cache_dtype: str
    dtype: str
    hbm_bytes_per_device: int
    weight_bytes_per_device: int
    kv_bytes_per_device: int
    kv_capacity_tokens: int
    buckets: list[BucketResult] = field(default_factory=list)
    rooflines: list[Roofline] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(b.ok for b in self.buckets) and self.fits

    @property
    def fits(self) -> bool:
        peaks = [b.peak_bytes for b in self.buckets if b.ok]
        return bool(peaks) and max(peaks) <= self.hbm_bytes_per_device

    def to_json(self) -> dict:
        d = asdict(self)
        d.update(ok=self.ok, fits=self.fits)
        for b, j in zip(self.buckets, d["buckets"]):
            j.update(peak_bytes=b.peak_bytes, traffic_ratio=b.traffic_ratio, traffic_ratio_max=b.traffic_ratio_max)
        for r, j in zip(self.rooflines, d["rooflines"]):
            j.update(step_seconds=r.step_seconds, tokens_per_s=r.tokens_per_s)
        return d


def expert_bytes_per_device(params) -> int:
    """Bytes of the MoE experts' stacked weights (leaves under an ``experts`` node) held by one device."""
    flat = flatten_dict(params, is_leaf=lambda _, x: not isinstance(x, dict))
    return bytes_per_device([v for p, v in flat.items() if "experts" in p])


def active_expert_fraction(config: ModelConfig, batch: int) -> float:
    """Expected share of a MoE layer's experts that ``batch`` tokens read in one decode step, with routing
    uniform and independent: ``1 - (1 - k / E) ** batch`` (``k / E`` at batch 1); 1 for a dense model."""
    if not config.num_experts:
        return 1.0
    return 1.0 - (1.0 - config.num_experts_per_tok / config.num_experts) ** batch


def _decode_roofline(
    target: Target,
    model: CausalLM,
    weight_bytes: int,
    kv_bytes_per_token: int,
    kv_shards: int,
    tp: int,
    batch: int,
    context: int,
    expert_bytes: int = 0,
) -> Roofline:
    """Weights moved per step: everything but the routed experts, plus the experts' bytes times
    :func:`active_expert_fraction` (only the experts the batch's tokens are routed to are read; with expert
    parallelism assumed spread evenly over the devices). Flops: 2 x the parameters one token reads."""
    c = model.config
    n_params = c.num_params(active=True)
    kv_read = batch * context * kv_bytes_per_token // kv_shards
    moved = int(weight_bytes - expert_bytes + expert_bytes * active_expert_fraction(c, batch)) + kv_read
    attn_flops = 4 * batch * context * c.num_layers * c.num_heads * c.head_dim
    flops = (2 * n_params * batch + attn_flops) / tp
    peak = target.peak_bf16_flops
    return Roofline(batch, context, moved, flops, moved / target.hbm_bandwidth, flops / peak)


@contextlib.contextmanager
def _without_persistent_cache():
    """Compile-only executables cannot be read back from JAX's persistent cache (loading needs a client for
    the target), so AOT compiles neither write nor read it."""
    before = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", before)


def compile_for_target(
    model: str | None,
    target: str,
    config: EngineConfig | None = None,
    *,
    quantization: str | None = None,
    buckets: str = "all",
    context: int = 1024,
    progress=None,
) -> CompileReport:
    """AOT-compile every step bucket the engine would use for ``model`` on ``target`` (e.g. ``"tpu-v5e-8"``).

    Args:
      model: registered name, HF directory / ``config.json``, GGUF file or quantized checkpoint (only its
        configuration is read).
      target: a target name with an optional chip count (:func:`parse_target`).
      config: engine settings (``tensor_parallel_size`` defaults to the chip count; ``dtype="auto"`` is
        bfloat16; ``kv_cache_memory`` per device, else ``kv_cache_memory_fraction`` of what the weights leave).
      quantization: weight format preset (:data:`PRESETS`), or ``None`` for float weights.
      buckets: ``"all"`` (every ``(T, S)`` bucket), ``"decode"`` (the smallest and the full-batch decode
        buckets) or ``"smallest"``.
      context: tokens of context per sequence in the roofline estimate.
      progress: called with each :class:`BucketResult` as it finishes.
    """
    tgt, chips = parse_target(target)
    config = config or EngineConfig()
    tp = config.tensor_parallel_size if config.tensor_parallel_size > 1 else chips
    if tp > chips:
        raise ValueError(f"tensor_parallel_size {tp} exceeds the target's {chips} chips")
    if quantization is not None and quantization not in PRESETS:
        raise ValueError(f"unknown quantization {quantization!r}; expected one of {sorted(PRESETS)}")
    mc = model_config_for(model)
    dtype = AUTO_DTYPE_ON_ACCELERATORS if config.dtype == "auto" else jnp.dtype(config.dtype)
    mesh = Mesh(np.array(target_devices(tgt, tp), dtype=object).reshape(1, tp), MESH_AXES)
    plan: ShardingPlan = plan_sharding(mc, mesh)
    if plan.kv_head_replicas > 1:
        mc = mc.with_overrides(num_kv_heads=mc.num_kv_heads * plan.kv_head_replicas)
    lm = CausalLM(mc, dtype, plan)
    kernels = Kernels.for_mesh(mesh, config.attention_impl)
    params = abstract_params(lm, quantization)
    weight_bytes = bytes_per_device(params)
    max_model_len = config.max_model_len or mc.max_position_embeddings
    kv_shards = tp if plan.shard_attention else 1
    memory = config.kv_cache_memory
    if memory is None:
        memory = int(max(tgt.hbm_bytes - weight_bytes, 0) * config.kv_cache_memory_fraction)
    spec = size_kv_cache(config, mc, max_model_len, dtype, kernels, plan, memory=memory)
    buckets_all = step_buckets(config, scheduler_config(config, max_model_len, spec.num_pages))
    batches = BatchBuilder(buckets_all, config.max_num_seqs, tuple(mc.eos_token_ids))
    runner = ModelRunner(lm, params, spec, config.max_num_seqs + 1, kernels, batches, plan, abstract=True)
    report = CompileReport(
        tgt.name,
        tp,
        str(model or DEFAULT_MODEL),
        quantization,
        config.kv_cache_dtype,
        jnp.dtype(dtype).name,
        tgt.hbm_bytes,
        weight_bytes,
        spec.total_bytes // kv_shards,
        spec.capacity_tokens,
    )
    ctx = min(context, max_model_len)
    embed_bytes = bytes_per_device(params["embed_tokens"])
    with _without_persistent_cache():
        for t, s in _pick(buckets_all, buckets, config.max_num_seqs):
            report.buckets.append(_compile_one(runner, t, s, DEVICELESS_COMPILER_OPTIONS.get(tgt.platform)))
            _decode_traffic(
                report.buckets[-1], lm, spec, weight_bytes, embed_bytes, expert_bytes_per_device(params), kv_shards, ctx
            )
            if progress is not None:
                progress(report.buckets[-1])
    for batch in sorted({1, config.max_num_seqs}):
        report.rooflines.append(
            _decode_roofline(
                tgt, lm, weight_bytes, spec.bytes_per_token, kv_shards, tp, batch, ctx, expert_bytes_per_device(params)
            )
        )
    return report


def _pick(buckets: StepBuckets, which: str, max_num_seqs: int) -> list[tuple[int, int]]:
    if which == "all":
        return buckets.shapes()
    if which == "smallest":
        return [buckets.bucket(1, 1)]
    if which == "decode":
        return sorted({buckets.bucket(1, 1), buckets.bucket(max_num_seqs, max_num_seqs)})
    raise ValueError(f"buckets must be 'all', 'decode' or 'smallest', got {which!r}")


def _decode_traffic(
    b: BucketResult,
    model: CausalLM,
    spec,
    weight_bytes: int,
    embed_bytes: int,
    expert_bytes: int,
    kv_shards: int,
    context: int,
) -> None:
    """Fill ``b``'s minimum and estimated HBM bytes for a decode step of its ``S`` sequences at ``context``.

    Minimum (per device): every weight read once, except an untied embedding table, of which only the ``T``
    looked-up rows are read (a tied table is read whole as the LM head), and MoE experts scaled by
    :func:`active_expert_fraction`; plus the KV cache's logical bytes (K and V at the model's head_dim, the
    int8 / fp8 scales included, no lane padding) read for ``S x context`` tokens and written for ``T``.
    Estimated: the compiled program's XLA-op bytes (:func:`jaxinfer.hlo_traffic.op_traffic`, attention
    kernels left out, since their operand is the whole cache and what they read depends on the step's
    lengths) plus the kernels' page reads for ``S x context`` tokens at the cache's physical bytes per
    token (lane padding included), and per page read the whole int8 / fp8 scale row of ``G`` pages
    holding its scales.
    """
    if not b.ok:
        return
    c = model.config
    logical = c.num_layers * page_bytes_per_token(
        KVLayout.TOKEN_MAJOR, spec.num_kv_heads, spec.head_dim, spec.dtype, spec.quant_dtype
    )
    weights = weight_bytes - expert_bytes + int(expert_bytes * active_expert_fraction(c, b.seqs))
    if not c.tie_word_embeddings:
        weights += b.tokens * embed_bytes // c.vocab_size - embed_bytes
    b.minimum_bytes = weights + (b.seqs * context + b.tokens) * logical // kv_shards
    pages = b.seqs * context * spec.bytes_per_token // kv_shards
    if spec.quant_dtype is not None and spec.scale_pages_per_row > 1:
        # the kernel DMAs the whole scale row of G pages holding each page's scales (K and V): G - 1 pages'
        # scales more per page read
        pages_read = b.seqs * -(-context // spec.page_size)
        row_extra = (spec.scale_pages_per_row - 1) * spec.page_size * spec.num_kv_heads * 4 // kv_shards
        pages += c.num_layers * pages_read * 2 * row_extra
    b.estimated_bytes, b.estimated_bytes_max = b.hlo_bytes + pages, b.hlo_bytes_max + pages


def _compile_one(runner: ModelRunner, t: int, s: int, options: dict | None = None) -> BucketResult:
    start = time.perf_counter()
    try:
        compiled = runner.lower(t, s).compile(compiler_options=options)
    except Exception as e:  # the compiler's refusal is the answer: report it per bucket
        return BucketResult(t, s, False, time.perf_counter() - start, error=f"{type(e).__name__}: {e}"[:2000])
    seconds = time.perf_counter() - start
    m = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, list) else cost) or {}
    text = compiled.as_text()
    ops = op_traffic(text, branches="min")
    top = list(traffic_by_source([o for o in ops if not o.kernel]).items())[:TOP_OPS]
    hlo_max = sum(o.bytes for o in op_traffic(text, branches="max") if not o.kernel)
    return BucketResult(
        t,
        s,
        True,
        seconds,
        None,
        int(m.argument_size_in_bytes),
        int(m.output_size_in_bytes),
        int(m.alias_size_in_bytes),
        int(m.temp_size_in_bytes),
        bytes_accessed=int(cost.get("bytes accessed", 0)),
        hlo_bytes=sum(o.bytes for o in ops if not o.kernel),
        hlo_bytes_max=hlo_max,
        top_ops=top,
    )
