"""Which weights of a decoder layer are quantized, dense or mixture-of-experts, and how to reach them.

A dense layer's linears are :data:`quantize.layer_runner.LINEARS` (``"self_attn/q_proj"``, ...,
``"mlp/down_proj"``, each a ``{"kernel": [K, N]}`` node). A MoE layer (``ModelConfig.is_moe_layer``) has the
same attention linears, its stacked experts ``"mlp/experts/{gate,up,down}_proj"`` (``[E, K, N]`` arrays,
quantized as one stacked QArray: round to nearest is per column and group, so each expert is quantized on
its own numbers exactly as a separate linear would be, ``quantize_experts``) and, for Qwen2-MoE, the shared expert
``"mlp/shared_expert/{gate,up,down}_proj"``. The router (``mlp/gate``) and the shared expert's gate stay
float: they are tiny and their outputs pick experts.
"""

from __future__ import annotations

from quantize.layer_runner import LINEARS

ATTENTION = tuple(n for n in LINEARS if n.startswith("self_attn/"))
EXPERTS = ("mlp/experts/gate_proj", "mlp/experts/up_proj", "mlp/experts/down_proj")
SHARED_EXPERT = ("mlp/shared_expert/gate_proj", "mlp/shared_expert/up_proj", "mlp/shared_expert/down_proj")


def layer_linears(config, i: int) -> tuple[str, ...]:
    """Names of layer ``i``'s quantizable weights."""
    if not config.is_moe_layer(i):
        return LINEARS
    return ATTENTION + EXPERTS + (SHARED_EXPERT if config.shared_expert_intermediate_size else ())


def _parent(lp: dict, name: str) -> tuple[dict, str]:
    node = lp
    parts = name.split("/")
    for part in parts[:-1]:
        node = node[part]
    last = node[parts[-1]]
    return (last, "kernel") if isinstance(last, dict) else (node, parts[-1])


def get_weight(lp: dict, name: str):
    """The weight ``name`` of layer params ``lp`` (a linear's kernel or a stacked expert array)."""
    node, key = _parent(lp, name)
    return node[key]


def set_weight(lp: dict, name: str, value) -> None:
    node, key = _parent(lp, name)
    node[key] = value
