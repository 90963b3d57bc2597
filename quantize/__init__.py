"""Offline weight quantization tools: RTN / GPTQ / AWQ / SmoothQuant, calibration, evaluation, their CLI.

The runtime pieces they produce and use live below this package: the quantized operand type and its
formats beside the kernel (``pallas_kernels.quantized_matmul``: ``QArray``, ``QuantConfig``, packing,
quantizer), the model's ``linear`` / ``embed`` / ``unembed`` in ``jaxinfer.models.ops``, GGUF import and
quantized checkpoints in ``jaxinfer``. They are re-exported here for convenience. Names are imported
lazily so that ``import quantize`` stays cheap.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "QuantConfig": "pallas_kernels.quantized_matmul.config",
    "PRESETS": "pallas_kernels.quantized_matmul.config",
    "as_config": "pallas_kernels.quantized_matmul.config",
    "QArray": "pallas_kernels.quantized_matmul.qarray",
    "quantize": "pallas_kernels.quantized_matmul.qarray",
    "dequantize": "pallas_kernels.quantized_matmul.qarray",
    "logical_axes": "pallas_kernels.quantized_matmul.qarray",
    "concat_columns": "pallas_kernels.quantized_matmul.qarray",
    "abstract_qarray": "pallas_kernels.quantized_matmul.qarray",
    "linear": "jaxinfer.models.ops",
    "embed": "jaxinfer.models.ops",
    "unembed": "jaxinfer.models.ops",
    "QEmbedding": "jaxinfer.models.qembedding",
    "rtn_quantize": "quantize.rtn",
    "gptq_quantize": "quantize.gptq",
    "awq_search": "quantize.awq",
    "AWQResult": "quantize.awq",
    "smoothquant": "quantize.smoothquant",
    "smoothing_scales": "quantize.smoothquant",
    "SmoothQuantResult": "quantize.smoothquant",
    "ActStats": "quantize.calibration",
    "HessianState": "quantize.calibration",
    "accumulate": "quantize.calibration",
    "scale_rows": "quantize.folding",
    "fold_into_norm": "quantize.folding",
    "fold_into_linear_output": "quantize.folding",
    "qarray_from_gguf": "jaxinfer.gguf_qarray",
    "gguf_tensor_to_weight": "jaxinfer.gguf_qarray",
    "quantize_model": "quantize.model_quant",
    "QuantizedModel": "quantize.model_quant",
    "MethodOptions": "quantize.model_quant",
    "calibration_tokens": "quantize.model_quant",
    "method_config": "quantize.model_formats",
    "param_bytes": "quantize.model_formats",
    "save_quantized": "jaxinfer.quantized_checkpoint",
    "load_quantized": "jaxinfer.quantized_checkpoint",
    "load_gguf_native": "jaxinfer.gguf_native",
    "evaluate": "quantize.evaluate",
    "token_windows": "quantize.evaluate",
    "Variant": "quantize.evaluate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'quantize' has no attribute {name!r}")
