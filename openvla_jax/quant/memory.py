"""Parameter memory of a model config in bf16 / int8 / int4, from shapes only (nothing allocated).

`jax.eval_shape` of the VLA's init gives every leaf's shape; `jax.eval_shape` of `quantize_params`'s
per-kernel `quantize` gives the quantized shapes, so the numbers are those of the real code path.
Non-linear leaves (embeddings, norms, biases, tokens, patch embed) stay bf16 in every mode.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from openvla_jax.models import vla as vla_lib
from openvla_jax.models.config import VLAConfig, as_config
from openvla_jax.quant.weights import DEFAULT_GROUP_SIZE, _path_names, linear_layout, param_bytes, quantize, total_bytes

GIB = 2**30


def param_shapes(model_config: VLAConfig, dtype=jnp.bfloat16):
    """The VLA params tree as `jax.ShapeDtypeStruct`s in `dtype`."""
    module = vla_lib.from_config(model_config, dtype=dtype, param_dtype=dtype)
    size = as_config(model_config).vision.image_size

    def init():
        zeros = jnp.zeros((1, size, size, 6), dtype), jnp.zeros((1, 2), jnp.int32)
        return nn.meta.unbox(module.init(jax.random.PRNGKey(0), *zeros)["params"])

    return jax.eval_shape(init)


def quantized_shapes(shapes, mode: str, group_size: Optional[int] = DEFAULT_GROUP_SIZE):
    bits = 8 if mode == "int8" else 4

    def leaf(path, x):
        layout = linear_layout(_path_names(path), len(x.shape))
        if layout is None:
            return x
        return jax.eval_shape(lambda w: quantize(w, bits, *layout, group_size), x)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


def memory_report(model_config: VLAConfig, group_size: Optional[int] = DEFAULT_GROUP_SIZE) -> dict:
    """-> {mode: {"linear_bytes", "other_bytes", "total_bytes", "total_gib", "linear_ratio"}} for
    mode in bf16 / int8 / int4 (int4 grouped by `group_size`); ratios are against bf16's linear bytes."""
    shapes = param_shapes(model_config)
    trees = {
        "bf16": shapes,
        "int8": quantized_shapes(shapes, "int8"),
        "int4": quantized_shapes(shapes, "int4", group_size),
    }
    base = param_bytes(shapes)
    report = {}
    for mode, tree in trees.items():
        linear, total = param_bytes(tree), total_bytes(tree)
        report[mode] = dict(
            linear_bytes=linear,
            other_bytes=total - linear,
            total_bytes=total,
            total_gib=total / GIB,
            linear_ratio=linear / base,
        )
    return report


def format_report(report: dict) -> str:
    lines = [f"{'mode':<5} {'linear GiB':>10} {'other GiB':>9} {'total GiB':>9} {'linear/bf16':>11}"]
    for mode, r in report.items():
        lines.append(
            f"{mode:<5} {r['linear_bytes'] / GIB:>10.3f} {r['other_bytes'] / GIB:>9.3f} "
            f"{r['total_gib']:>9.3f} {r['linear_ratio']:>11.3f}"
        )
    return "\n".join(lines)
