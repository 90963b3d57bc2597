"""Quantize a whole jaxinfer model: RTN, GPTQ, AWQ, SmoothQuant or fp8 applied to every decoder linear.

``quantize_model(model, params, method, config, calib_tokens=...)`` returns a new parameter tree whose
linear kernels are :class:`QArray` leaves (the model code runs it unchanged) plus a
description of what was done.

Per decoder layer (calibration sequences run through the model's own layers, see
:mod:`quantize.layer_runner`):

* ``rtn`` / ``fp8``: round to nearest, no calibration.
* ``gptq``: sequential. Layer ``i`` is calibrated on the outputs of the already-quantized layers
  ``< i``; inside a layer the groups q/k/v, o, gate/up, down are quantized in order, each on inputs
  recomputed with the groups before it quantized ("true sequential"). One Hessian per shared input.
* ``awq``: scales searched on the float model's activations per group sharing an input, each group
  after the group it feeds (so the weights it quantizes already carry the folded scales): v -> o (only
  when o_proj's inputs map one-to-one onto v's outputs, i.e. no grouped-query sharing; otherwise o_proj
  gets the clipping search only), q/k/v (folded into ``input_layernorm``; no clipping search for q/k),
  up -> down (folded into up_proj's output columns), gate/up (folded into ``post_attention_layernorm``).
* ``smoothquant``: per-channel smoothing (``alpha``) of the q/k/v and gate/up inputs folded into the two
  norms from the float model's activation ranges; every linear then int8 W8A8 (o/down unsmoothed).

Mixed precision: the LM head / embedding table stay float unless ``quantize_head`` /
``quantize_embedding``; ``keep_first_last`` keeps decoder layers 0 and L-1 float; ``keep`` names more
linears (``fnmatch`` patterns such as ``"layers_*/mlp/down_proj"``). A group (AWQ / SmoothQuant) with a
kept member is not rescaled. A weight whose K is not a multiple of the group size uses the largest
supported group size dividing K (recorded in ``info["group_size_fallbacks"]``).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxinfer.errors import QuantizationError
from jaxinfer.models.qembedding import QEmbedding
from pallas_kernels.quantized_matmul.config import QuantConfig, as_config
from pallas_kernels.quantized_matmul.experts import quantize_experts
from pallas_kernels.quantized_matmul.qarray import QArray
from quantize.awq import awq_search
from quantize.calibration import ActStats, HessianState
from quantize.folding import fold_into_linear_output, fold_into_norm, scale_rows
from quantize.gptq import gptq_quantize
from quantize.layer_runner import INPUT_OF, LINEARS, LayerRunner
from quantize.model_formats import METHODS, leaf_config, method_config, param_bytes
from quantize.moe_quant import get_weight, layer_linears, set_weight
from quantize.rtn import rtn_quantize
from quantize.smoothquant import smoothquant

QKV = ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj")
GATE_UP = ("mlp/gate_proj", "mlp/up_proj")
GPTQ_GROUPS = (QKV, ("self_attn/o_proj",), GATE_UP, ("mlp/down_proj",))
CALIBRATED = ("gptq", "awq", "smoothquant")


@dataclass
class QuantizedModel:
    """Result of :func:`quantize_model`: the parameter tree and a JSON-able description (``info``)."""

    params: dict
    info: dict = field(default_factory=dict)
    folded: dict | None = None


@dataclass(frozen=True)
class MethodOptions:
    """Algorithm knobs (defaults follow the papers' reference implementations)."""

    gptq_percdamp: float = 0.01
    gptq_blocksize: int = 128
    gptq_act_order: bool = False
    gptq_true_sequential: bool = True
    awq_n_grid: int = 20
    awq_duo_scaling: bool = False
    smoothquant_alpha: float = 0.5


def _copy_tree(tree):
    """Fresh nested dicts (a FrozenDict becomes a dict); array / QArray leaves are shared."""
    return {k: _copy_tree(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


def _get(lp, name):
    a, b = name.split("/")
    return lp[a][b]


def _put(lp, name, qarray, pre_float, pre: dict):
    """Store a quantized kernel; ``pre[name]`` keeps the float weight it quantizes (scales folded in)."""
    _get(lp, name)["kernel"] = qarray
    pre[name] = pre_float


def _folded_layer(lp, pre: dict):
    """The layer with every quantized kernel replaced by the float weight it quantizes."""
    out = _copy_tree(lp)
    for name, w in pre.items():
        _get(out, name)["kernel"] = w
    return out


def quantize_model(
    model,
    params: dict,
    method: str,
    config: QuantConfig | str | None = None,
    *,
    calib_tokens: np.ndarray | None = None,
    keep: tuple[str, ...] = (),
    keep_first_last: bool = False,
    quantize_head: bool = False,
    quantize_embedding: bool = False,
    options: MethodOptions = MethodOptions(),
    progress: bool = True,
    return_folded: bool = False,
) -> QuantizedModel:
    """Quantize the linear layers of ``model`` (a :class:`~jaxinfer.models.causal_lm.CausalLM`).

    Args:
      model: the model definition.
      params: its float parameter tree (not modified).
      method: one of ``"rtn"``, ``"gptq"``, ``"awq"``, ``"smoothquant"``, ``"fp8"``.
      config: weight format (a :class:`QuantConfig` or preset name; see
        :func:`quantize.model_formats.method_config` for each method's default).
      calib_tokens: ``i32[N, L]`` calibration sequences (required by gptq / awq / smoothquant).
      keep: ``fnmatch`` patterns of linears kept float, e.g. ``"layers_0/*"``, ``"*/down_proj"``.
      keep_first_last: keep decoder layers 0 and ``num_layers - 1`` float.
      quantize_head: also quantize the LM head (the embedding table when tied; RTN in ``config``).
      quantize_embedding: also quantize an untied embedding table (RTN; lookups dequantize only the
        gathered rows).
      options: algorithm settings.
      progress: show tqdm progress bars.
      return_folded: also return ``QuantizedModel.folded``: the float parameters with every AWQ /
        SmoothQuant scale folded in but no weight quantized (the same function as ``params``).

    Returns:
      :class:`QuantizedModel`.

    Raises:
      QuantizationError: unknown method, missing calibration data, an unusable format.
    """
    if method not in METHODS:
        raise QuantizationError(f"unknown quantization method {method!r}; expected one of {METHODS}")
    try:
        cfg = method_config(method) if config is None else as_config(config)
    except ValueError as e:
        raise QuantizationError(str(e)) from e
    if method == "smoothquant" and cfg.act is None:
        raise QuantizationError("smoothquant needs a W8A8 format (int8-w8a8 or fp8-w8a8)")
    if method == "fp8" and cfg.weight != "fp8":
        raise QuantizationError(f"method 'fp8' needs an fp8 format, got {cfg.name}")
    if method in CALIBRATED and calib_tokens is None:
        raise QuantizationError(f"method {method!r} needs calibration tokens")
    c = model.config
    if method in CALIBRATED and c.num_experts:
        raise QuantizationError(
            f"method {method!r} is not implemented for mixture-of-experts models ({c.architecture}); "
            "use rtn or fp8 (round to nearest, each expert's weights quantized on their own)")
    start = time.perf_counter()
    new = _copy_tree(params)
    folded = _copy_tree(params) if return_folded else None
    plan = _plan(c, cfg, keep, keep_first_last)
    info = dict(method=method, format=cfg.name, config=dataclasses.asdict(cfg), options=dataclasses.asdict(options),
                kept_float=sorted(p for p, v in plan.items() if v is None),
                group_size_fallbacks={p: v.group_size for p, v in plan.items()
                                      if v is not None and v.group_size != cfg.group_size})
    if method in CALIBRATED:
        tokens = np.asarray(calib_tokens)
        info["calibration"] = dict(num_samples=int(tokens.shape[0]), seq_len=int(tokens.shape[1]),
                                   num_tokens=int(tokens.size))
        runner = LayerRunner(model, tokens)
        layer_info = _calibrated(method, runner, params, new, folded, plan, options, progress)
        info["layers"] = layer_info
    else:
        for i in tqdm(range(c.num_layers), desc=f"{method} layers", disable=not progress, leave=False):
            lp = new[f"layers_{i}"]
            for name in layer_linears(c, i):
                lcfg = plan[f"layers_{i}/{name}"]
                if lcfg is not None:
                    w = get_weight(lp, name)
                    set_weight(lp, name, quantize_experts(w, lcfg) if w.ndim == 3 else rtn_quantize(w, lcfg))
    _quantize_head(c, new, cfg, quantize_head, quantize_embedding)
    info["head"] = dict(lm_head_quantized=quantize_head, embedding_quantized=quantize_embedding or
                        (quantize_head and c.tie_word_embeddings))
    info["bytes"] = param_bytes(new)
    info["seconds"] = round(time.perf_counter() - start, 2)
    return QuantizedModel(new, info, folded)


def _plan(c, cfg: QuantConfig, keep, keep_first_last) -> dict[str, QuantConfig | None]:
    """Linear path -> its format (group size adapted to K), or ``None`` when kept float."""
    plan = {}
    k_of = {"self_attn/o_proj": c.q_size, "mlp/down_proj": c.intermediate_size,
            "mlp/experts/down_proj": c.moe_intermediate_size,
            "mlp/shared_expert/down_proj": c.shared_expert_intermediate_size}
    for i in range(c.num_layers):
        for name in layer_linears(c, i):
            path = f"layers_{i}/{name}"
            kept = any(fnmatch.fnmatchcase(path, pat) for pat in keep)
            kept |= keep_first_last and i in (0, c.num_layers - 1)
            plan[path] = None if kept else leaf_config(cfg, k_of.get(name, c.hidden_size))
    return plan


def _quantize_head(c, new, cfg, quantize_head, quantize_embedding):
    if quantize_head and not c.tie_word_embeddings:
        hcfg = leaf_config(cfg, c.hidden_size)
        if hcfg is not None:
            new["lm_head"]["kernel"] = rtn_quantize(new["lm_head"]["kernel"], hcfg)
    if (quantize_head and c.tie_word_embeddings) or (quantize_embedding and not c.tie_word_embeddings):
        hcfg = leaf_config(cfg, c.hidden_size)
        if hcfg is not None:
            new["embed_tokens"] = QEmbedding.quantize(new["embed_tokens"], hcfg)


def _calibrated(method, runner: LayerRunner, params, new, folded, plan, options, progress) -> list[dict]:
    c = runner.config
    x = runner.embed(params)
    layer_info = []
    for i in tqdm(range(c.num_layers), desc=f"{method} layers", disable=not progress, leave=False):
        name = f"layers_{i}"
        cfgs = {n: plan[f"{name}/{n}"] for n in LINEARS}
        lp, pre = new[name], {}
        if all(v is None for v in cfgs.values()):
            x, _ = runner.run(params[name], x, capture=False)
            layer_info.append({})
            continue
        if method == "gptq":
            layer_info.append(_gptq_layer(runner, lp, x, cfgs, options, pre))
            x, _ = runner.run(lp, x, capture=False)  # next layer sees this layer's quantized output
        else:
            y, inputs = runner.run(params[name], x)
            if method == "awq":
                layer_info.append(_awq_layer(c, lp, inputs, cfgs, options, pre))
            else:
                layer_info.append(_smoothquant_layer(lp, inputs, cfgs, options, pre))
            x = y  # AWQ / SmoothQuant calibrate every layer on the float model's activations
        if folded is not None:
            folded[name] = _folded_layer(lp, pre)
    return layer_info


# -- GPTQ ------------------------------------------------------------------------------------------------
def _gptq_layer(runner, lp, x, cfgs, options, pre) -> dict:
    groups = GPTQ_GROUPS if options.gptq_true_sequential else (LINEARS,)
    inputs = None
    for group in groups:
        todo = [n for n in group if cfgs[n] is not None]
        if not todo:
            continue
        if inputs is None or options.gptq_true_sequential:
            _, inputs = runner.run(lp, x)
        hessians = {}
        for n in todo:
            key = INPUT_OF[n]
            if key not in hessians:
                hessians[key] = HessianState.init(inputs[key].shape[-1]).update(inputs[key])
            w = _get(lp, n)["kernel"]
            q = gptq_quantize(w, hessians[key], cfgs[n], percdamp=options.gptq_percdamp,
                              blocksize=options.gptq_blocksize, act_order=options.gptq_act_order)
            _put(lp, n, q, w, pre)
    return {}


# -- AWQ -------------------------------------------------------------------------------------------------
def _awq(weights, x, cfg, options, clip, search: bool):
    return awq_search(weights, x, cfg, n_grid=options.awq_n_grid if search else 1,
                      duo_scaling=options.awq_duo_scaling, clip=clip)


def _awq_layer(c, lp, inputs, cfgs, options, pre) -> dict:
    out = {}
    # v -> o: o_proj's input channel j is v's output channel j only without grouped-query sharing.
    o_cfg, v_cfg = cfgs["self_attn/o_proj"], cfgs["self_attn/v_proj"]
    if o_cfg is not None:
        scalable = v_cfg is not None and c.num_heads == c.num_kv_heads
        out["o_alpha"] = _awq_into_linear(lp, "self_attn/v_proj", "self_attn/o_proj",
                                          inputs["self_attn/o_proj"], o_cfg, options, scalable, pre)
    out["qkv_alpha"] = _awq_shared(lp, "input_layernorm", QKV, inputs["self_attn/q_proj"], cfgs, options,
                                   (False, False, True), pre)
    d_cfg = cfgs["mlp/down_proj"]
    if d_cfg is not None:
        scalable = cfgs["mlp/up_proj"] is not None
        out["down_alpha"] = _awq_into_linear(lp, "mlp/up_proj", "mlp/down_proj", inputs["mlp/down_proj"],
                                             d_cfg, options, scalable, pre)
    out["gate_up_alpha"] = _awq_shared(lp, "post_attention_layernorm", GATE_UP, inputs["mlp/gate_proj"],
                                       cfgs, options, (True, True), pre)
    return out


def _awq_into_linear(lp, prev, name, x, cfg, options, scalable, pre):
    """AWQ for one linear whose input is ``prev``'s output; scales folded into ``prev``'s columns."""
    w = _get(lp, name)["kernel"]
    res = _awq([w], x, cfg, options, True, scalable)
    if scalable:
        _fold_linear(_get(lp, prev), res.scales)
    _put(lp, name, res.qarrays[0], scale_rows(w, res.scales), pre)
    return res.alpha


def _awq_shared(lp, norm, names, x, cfgs, options, clip, pre):
    """AWQ for linears sharing a norm's output; scales folded into the norm (all members quantized)."""
    todo = [n for n in names if cfgs[n] is not None]
    if not todo:
        return None
    if len(todo) == len(names) and len({cfgs[n] for n in names}) == 1:
        ws = [_get(lp, n)["kernel"] for n in names]
        res = _awq(ws, x, cfgs[names[0]], options, list(clip), True)
        lp[norm]["scale"] = fold_into_norm(lp[norm]["scale"], res.scales)
        for n, w, q in zip(names, ws, res.qarrays):
            _put(lp, n, q, scale_rows(w, res.scales), pre)
        return res.alpha
    flags = dict(zip(names, clip))
    for n in todo:  # a kept member: no rescaling, clipping search only
        w = _get(lp, n)["kernel"]
        _put(lp, n, _awq([w], x, cfgs[n], options, flags[n], False).qarrays[0], w, pre)
    return 0.0


def _fold_linear(leaf, s):
    if "bias" in leaf:
        leaf["kernel"], leaf["bias"] = fold_into_linear_output(leaf["kernel"], s, leaf["bias"])
    else:
        leaf["kernel"] = fold_into_linear_output(leaf["kernel"], s)


# -- SmoothQuant -------------------------------------------------------------------------------------------
def _smoothquant_layer(lp, inputs, cfgs, options, pre) -> dict:
    for norm, names, key in (("input_layernorm", QKV, "self_attn/q_proj"),
                             ("post_attention_layernorm", GATE_UP, "mlp/gate_proj")):
        todo = [n for n in names if cfgs[n] is not None]
        if len(todo) == len(names) and len({cfgs[n] for n in names}) == 1:
            amax = ActStats.init(inputs[key].shape[-1]).update(inputs[key]).abs_max
            ws = [_get(lp, n)["kernel"] for n in names]
            res = smoothquant(ws, amax, alpha=options.smoothquant_alpha, config=cfgs[names[0]])
            lp[norm]["scale"] = fold_into_norm(lp[norm]["scale"], res.scales)
            for n, w, q in zip(names, ws, res.qarrays):
                _put(lp, n, q, scale_rows(w, res.scales), pre)
        else:  # a kept member: no smoothing
            for n in todo:
                w = _get(lp, n)["kernel"]
                _put(lp, n, QArray.quantize(w, cfgs[n]), w, pre)
    for n in ("self_attn/o_proj", "mlp/down_proj"):
        if cfgs[n] is not None:
            w = _get(lp, n)["kernel"]
            _put(lp, n, QArray.quantize(w, cfgs[n]), w, pre)
    return {}


def calibration_tokens(ids, n_samples: int, seq_len: int) -> np.ndarray:
    """``n_samples`` non-overlapping windows of ``seq_len`` tokens, evenly spread over ``ids``.

    Args:
      ids: token ids of the calibration text (``[n]``).

    Returns:
      ``i32[n_samples, seq_len]``.

    Raises:
      QuantizationError: the text has fewer than ``n_samples * seq_len`` tokens, or bad sizes.
    """
    ids = np.asarray(ids, np.int32).reshape(-1)
    if n_samples < 1 or seq_len < 2:
        raise QuantizationError(f"need calib samples >= 1 and seq len >= 2, got {n_samples} x {seq_len}")
    windows = len(ids) // seq_len
    if windows < n_samples:
        raise QuantizationError(
            f"calibration text has {len(ids)} tokens: fewer than {n_samples} x {seq_len}; pass a longer text "
            "or fewer / shorter samples")
    picks = np.linspace(0, windows - 1, n_samples).round().astype(int)
    return np.stack([ids[w * seq_len:(w + 1) * seq_len] for w in picks])


def is_quantized_leaf(x) -> bool:
    """True for QArray / QEmbedding leaves."""
    return isinstance(x, (QArray, QEmbedding))


def count_quantized(params) -> int:
    """Number of quantized leaves in a parameter tree."""
    return sum(is_quantized_leaf(x) for x in jax.tree.leaves(params, is_leaf=is_quantized_leaf))


