"""Run a jaxinfer model one decoder layer at a time over calibration sequences, capturing the input of
every linear layer.

Calibration (GPTQ Hessians, AWQ scale search, SmoothQuant activation ranges) needs, for decoder layer
``i``, the inputs its linears see when the layers before ``i`` have their final (possibly quantized)
weights. :class:`LayerRunner` embeds ``N`` calibration sequences of ``L`` tokens once and then applies
single :class:`~jaxinfer.models.llama.DecoderLayer` modules (the model's own code, over a dense KV cache
with one slot per sequence), so each layer can be calibrated, replaced and run before the next one.
Linear inputs are captured with ``flax.linen.intercept_methods`` inside the jitted layer call.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.attention import AttentionMetadata, init_dense_cache
from jaxinfer.errors import QuantizationError
from jaxinfer.models.layers import Linear, Rotary
from jaxinfer.models.llama import DecoderLayer
from jaxinfer.models.ops import embed

# Linear name -> the key of the captured input it reads (q/k/v share one input, gate/up another).
INPUT_OF = {
    "self_attn/q_proj": "self_attn/q_proj",
    "self_attn/k_proj": "self_attn/q_proj",
    "self_attn/v_proj": "self_attn/q_proj",
    "self_attn/o_proj": "self_attn/o_proj",
    "mlp/gate_proj": "mlp/gate_proj",
    "mlp/up_proj": "mlp/gate_proj",
    "mlp/down_proj": "mlp/down_proj",
}
LINEARS = tuple(INPUT_OF)
CAPTURED = ("self_attn/q_proj", "self_attn/o_proj", "mlp/gate_proj", "mlp/down_proj")


class LayerRunner:
    """Layer-by-layer forward of ``model`` over calibration tokens ``i32[N, L]``.

    Hidden states are ``[N * L, E]`` (sequences flattened, as in a ragged step).
    """

    def __init__(self, model, tokens: np.ndarray):
        tokens = np.asarray(tokens)
        if tokens.ndim != 2 or tokens.shape[0] < 1 or tokens.shape[1] < 2:
            raise QuantizationError(f"calibration tokens must be [N >= 1, L >= 2], got shape {tokens.shape}")
        c = model.config
        self.model = model
        self.config = c
        n, length = tokens.shape
        self.num_tokens = n * length
        self.tokens = jnp.asarray(tokens.reshape(-1), jnp.int32)
        self.positions = jnp.asarray(np.tile(np.arange(length, dtype=np.int32), n))
        cu = (np.arange(n + 1) * length).astype(np.int32)
        slots = (np.arange(n)[:, None] * length + np.arange(length)[None, :]).reshape(-1).astype(np.int32)
        self.md = AttentionMetadata(cu, np.full(n, length, np.int32), np.array([n], np.int32), slots,
                                    max_q_len=length)
        self.cache = init_dense_cache(1, n, length, c.num_kv_heads, c.head_dim, model.dtype)[0]
        self.rotary = Rotary.at(self.positions, c.inv_freq())
        attn_cls = model.module.attention_cls
        self.layer = DecoderLayer(c, attn_cls, model.dtype)
        self._run = jax.jit(self._run_impl, static_argnames=("capture",))

    def embed(self, params) -> jax.Array:
        """Hidden states entering layer 0: ``[N * L, E]``."""
        return embed(params["embed_tokens"], self.tokens, self.model.dtype)

    def _run_impl(self, layer_params, x, *, capture: bool):
        captured = {}

        def interceptor(next_fun, args, kwargs, context):
            if capture and isinstance(context.module, Linear) and context.method_name == "__call__":
                name = "/".join(context.module.path[-2:])
                if name in CAPTURED:
                    captured[name] = args[0]
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            y, _ = self.layer.apply({"params": layer_params}, x, self.rotary, self.cache, self.md)
        return y, captured

    def run(self, layer_params, x: jax.Array, capture: bool = True):
        """Apply one decoder layer.

        Args:
          layer_params: the ``layers_{i}`` subtree (float or quantized leaves).
          x: ``[N * L, E]`` hidden states entering the layer.
          capture: also return the linears' inputs.

        Returns:
          ``(y[N * L, E], inputs)``: ``inputs`` maps ``"self_attn/q_proj"`` (also k/v), ``"self_attn/o_proj"``,
          ``"mlp/gate_proj"`` (also up) and ``"mlp/down_proj"`` to ``[N * L, K]`` arrays (empty when
          ``capture`` is false).
        """
        return self._run(layer_params, x, capture=capture)
