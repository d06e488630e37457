"""Weight-only int8 / int4 quantization for inference: `quantize_params`, `dequantize_tree` (inside
jit), `param_bytes`, `memory_report` (quantized checkpoints: `openvla_jax.checkpoints.quantized`)."""

from openvla_jax.quant.memory import format_report, memory_report
from openvla_jax.quant.weights import (
    DEFAULT_GROUP_SIZE,
    MODES,
    DequantizingModule,
    QTensor,
    cast_floats,
    dequantize,
    dequantize_tree,
    is_quantized,
    pack_int4,
    param_bytes,
    quant_mode,
    quantize,
    quantize_params,
    total_bytes,
    unpack_int4,
)

__all__ = [
    "DEFAULT_GROUP_SIZE",
    "MODES",
    "DequantizingModule",
    "QTensor",
    "cast_floats",
    "dequantize",
    "dequantize_tree",
    "format_report",
    "is_quantized",
    "memory_report",
    "pack_int4",
    "param_bytes",
    "quant_mode",
    "quantize",
    "quantize_params",
    "total_bytes",
    "unpack_int4",
]
