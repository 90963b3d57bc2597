"""Qwen3: the Llama decoder plus per-head RMSNorm on q and k before RoPE."""

from __future__ import annotations

import flax.linen as nn

from jaxinfer.models.layers import RMSNorm, norm_impl
from jaxinfer.models.llama import LlamaAttention


class Qwen3Attention(LlamaAttention):
    def qk_transform(self, q, k):
        eps, impl = self.config.rms_norm_eps, norm_impl(self.kernels)
        q = RMSNorm(eps, axis="head_dim", param_dtype=self.dtype, impl=impl, name="q_norm")(q)
        k = RMSNorm(eps, axis="head_dim", param_dtype=self.dtype, impl=impl, name="k_norm")(k)
        return q, k

    # nn.compact is inherited through __call__; qk_transform is called inside it, so the submodules
    # above are created in the parent's compact scope.
    qk_transform = nn.nowrap(qk_transform)
