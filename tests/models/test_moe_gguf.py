"""GGUF MoE models written in llama.cpp's layout (tests/gguf_writer.py: stacked ``ffn_*_exps`` experts,
``ffn_gate_inp`` router, ``ffn_*_shexp`` shared expert; q/k rows permuted for Mixtral's llama architecture)
against HF transformers: F32 files reproduce the HF logits to 1e-4 relative to max |logit|.

llama.cpp's qwen2moe / qwen3moe layouts have a MoE block in every layer and no sliding window, so the tiny
models here are built that way (``mlp_only_layers=[]``, ``decoder_sparse_step=1``, no window).
"""

import numpy as np
import pytest
import torch
from flax.traverse_util import flatten_dict

from jaxinfer.loader import load_model
from jaxinfer.sharding import make_mesh
from tests.gguf_writer import write_moe_gguf
from tests.models.dense_steps import ragged_prefill
from tests.tiny_models import make_tiny_model

EVERY_LAYER_MOE = {
    "qwen3_moe": {"mlp_only_layers": []},
    "qwen2_moe": {"decoder_sparse_step": 1},
    "mixtral": {"sliding_window": None},
}


@pytest.mark.parametrize("arch", sorted(EVERY_LAYER_MOE))
def test_gguf_moe_matches_hf(tmp_path, arch):
    hf = make_tiny_model(arch, tmp_path / "hf", **EVERY_LAYER_MOE[arch])
    path = write_moe_gguf(hf, tmp_path / "m.gguf")
    m = load_model(str(path), load_tokenizer_too=False)
    c = m.config
    assert c.architecture == arch and all(c.is_moe_layer(i) for i in range(c.num_layers))
    assert c.norm_topk_prob == (arch != "qwen2_moe") and c.num_params() == sum(p.numel() for p in hf.parameters())
    seqs = [[1, 5, 9, 33, 150, 7, 2, 64, 64, 11, 17, 250], [1, 300, 12]]
    ours, _ = ragged_prefill(m.model, m.params, seqs)
    for ids, got in zip(seqs, ours):
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0].numpy()
        np.testing.assert_allclose(got, ref, atol=1e-4 * np.abs(ref).max(), rtol=0)
    # expert parallelism over 2 devices: each device reads its experts' rows of the ffn_*_exps tensors
    sharded = load_model(str(path), load_tokenizer_too=False, mesh=make_mesh(2))
    for path_, a in flatten_dict(m.params).items():
        b = flatten_dict(sharded.params)[path_]
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg="/".join(path_))
    assert sharded.params["layers_0"]["mlp"]["experts"]["down_proj"].sharding.spec[0] == "model"
