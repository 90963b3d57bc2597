"""Weight quantization: the QArray runtime type, ``linear``, RTN / GPTQ / AWQ / SmoothQuant, GGUF import.

Names are imported lazily so that ``pallas_kernels`` (which uses :class:`QArray`) and ``quantize``
(whose :func:`linear` calls the kernels) can import each other's modules without a cycle.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "QuantConfig": "quantize.config",
    "PRESETS": "quantize.config",
    "as_config": "quantize.config",
    "QArray": "quantize.qarray",
    "quantize": "quantize.qarray",
    "dequantize": "quantize.qarray",
    "logical_axes": "quantize.qarray",
    "concat_columns": "quantize.qarray",
    "abstract_qarray": "quantize.qarray",
    "linear": "quantize.dispatch",
    "embed": "quantize.dispatch",
    "unembed": "quantize.dispatch",
    "QEmbedding": "quantize.embedding",
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
    "qarray_from_gguf": "quantize.gguf_import",
    "gguf_tensor_to_weight": "quantize.gguf_import",
    "quantize_model": "quantize.model_quant",
    "QuantizedModel": "quantize.model_quant",
    "MethodOptions": "quantize.model_quant",
    "calibration_tokens": "quantize.model_quant",
    "method_config": "quantize.model_formats",
    "param_bytes": "quantize.model_formats",
    "save_quantized": "quantize.checkpoint",
    "load_quantized": "quantize.checkpoint",
    "load_gguf_native": "quantize.gguf_model",
    "evaluate": "quantize.evaluate",
    "token_windows": "quantize.evaluate",
    "Variant": "quantize.evaluate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'quantize' has no attribute {name!r}")
