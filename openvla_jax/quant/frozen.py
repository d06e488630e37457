"""A quantized frozen base for LoRA training: the int8 / grouped int4 kernels of `quant/weights.py`,
laid out so that `nn.scan` can slice them per layer, and a matmul that dequantizes next to its use.

    base = quantize_frozen(params, "int4")      # kernels -> {"int4": q, "scale": s}; the rest as it was
    y = frozen_linear(x, base_entry, n_in, out_shape, dtype)   # inside the jitted step

Layout of a quantized kernel `[*lead, *in, *out]` (lead: the scan axis of a stacked layer, 0 or 1):
  {"int8": int8 `[*lead, *in, *out]`, "scale": float32 `[*lead, 1, N]`}       per output channel
  {"int4": int8 `[*lead, K N / 2]`, "scale": float32 `[*lead, G, N]`}         groups of K / G input rows
The int4 bytes are `quant.weights.pack_int4`'s, packed per layer: for an even K N per layer that is
the same byte string as packing the whole stack, viewed `[*lead, -1]`, so a layer's slice is its own
packed kernel. Every leaf has the lead axis first, which is what `nn.scan` slices.

Why the grouped int4 and not NF4 (bitsandbytes' 4-bit, the original's `--use_quantization`): it is
the format inference already uses (`OpenVLA(quantize="int4")`, `checkpoints/quantized.py`), tested
against fp32 there; its dequantization is one integer multiply by a per-(group, channel) scale that
XLA fuses on every backend, where NF4 needs a 16-entry table lookup and a second, quantized level of
scales. Both store 4 bits per weight; at group 128 the fp32 scales add 0.25 bits (NF4 at block 64
with double quantization: ~0.13).

`frozen_linear` is a custom VJP: the backward pass dequantizes again for `dx = dy W^T` instead of
keeping the dequantized kernel as a residual, so a step never holds more than the layer at hand in
float, with or without remat; the kernel gets no gradient at all (it is frozen).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Optional

import jax
import numpy as np

from openvla_jax.quant.weights import DEFAULT_GROUP_SIZE, MODES, QTensor, dequantize, is_qtensor, quantize_params

BASE_QUANT = ("none",) + MODES


def is_frozen_quant(x) -> bool:
    """Whether `x` is a quantized kernel entry of `quantize_frozen`."""
    return isinstance(x, Mapping) and "scale" in x and ("int8" in x or "int4" in x)


def _entry(qt: QTensor) -> dict:
    if qt.bits == 8:
        return {"int8": qt.q, "scale": qt.scale}
    per_layer = math.prod(qt.shape[qt.lead :])
    if qt.lead and per_layer % 2:
        raise ValueError(
            f"an int4 kernel of shape {qt.shape} has {per_layer} values per layer (odd): its layers do "
            "not split into whole bytes; use base_quant='int8' for this model"
        )
    return {"int4": np.reshape(qt.q, qt.shape[: qt.lead] + (-1,)), "scale": qt.scale}


def quantize_frozen(params, mode: str, group_size: Optional[int] = DEFAULT_GROUP_SIZE):
    """Params tree (NumPy or arrays) -> the same tree with every linear kernel a quantized entry (host
    NumPy, one kernel at a time on the default device: `quant.weights.quantize_params`)."""
    if mode not in MODES:
        raise ValueError(f"base_quant={mode!r}: expected one of {BASE_QUANT}")
    q = quantize_params(params, mode, group_size)
    return jax.tree.map(lambda x: _entry(x) if is_qtensor(x) else x, q, is_leaf=is_qtensor)


def abstract_frozen(shapes, mode: str, group_size: Optional[int] = DEFAULT_GROUP_SIZE):
    """`quantize_frozen` on `jax.ShapeDtypeStruct`s: the quantized base's shapes, nothing computed."""
    from openvla_jax.quant.memory import quantized_shapes

    q = quantized_shapes(shapes, mode, group_size)
    return jax.tree.map(
        lambda x: jax.eval_shape(lambda q, s: _entry_traced(x, q, s), x.q, x.scale) if is_qtensor(x) else x,
        q,
        is_leaf=is_qtensor,
    )


def _entry_traced(qt: QTensor, q, scale) -> dict:
    if qt.bits == 8:
        return {"int8": q, "scale": scale}
    return {"int4": q.reshape(qt.shape[: qt.lead] + (-1,)), "scale": scale}


def to_qtensor(entry: Mapping, shape: tuple, lead: int, in_dims: int) -> QTensor:
    """A frozen entry -> the `QTensor` of a kernel of `shape` (`lead` scan axes, `in_dims` inputs)."""
    bits = 4 if "int4" in entry else 8
    q = entry["int4"] if bits == 4 else entry["int8"]
    if bits == 4:
        q = q.reshape(-1)
    return QTensor(q, entry["scale"], bits, tuple(shape), lead, in_dims, int(entry["scale"].shape[-2]))


def dequantize_frozen(params, dtype, shapes):
    """Every quantized entry -> a `dtype` kernel of its shape in `shapes` (a params tree of shapes,
    e.g. the model's abstract params): for evaluation and merging, never the training step."""
    from openvla_jax.models import kernels
    from openvla_jax.train.optimizer import param_paths

    paths = param_paths(shapes)

    def one(path, shape, x):
        if not is_frozen_quant(x):
            return x
        layout = kernels.kernel_layout(path.split("/"), shape.shape)
        qt = to_qtensor(x, shape.shape, layout.stack, layout.n_in)
        return dequantize(qt, dtype)

    return jax.tree.map(one, paths, shapes, params, is_leaf=lambda x: is_frozen_quant(x))


def frozen_linear(x, entry: Mapping, n_in: int, out_shape: tuple, dtype):
    """`x [..., *in] @ W [*in, *out]` for a quantized frozen kernel of one layer (no scan axis left):
    -> `[..., *out]` in `dtype`. The gradient flows to `x` only."""
    in_shape = tuple(x.shape[x.ndim - n_in :])
    k = math.prod(in_shape)
    qt = to_qtensor(entry, in_shape + tuple(out_shape), 0, n_in)
    lead = x.shape[: x.ndim - n_in]
    y = _qmatmul(x.reshape(-1, k).astype(dtype), qt.q, qt.scale, qt, dtype)
    return y.reshape(lead + tuple(out_shape))


def _weight(qt: QTensor, q, scale, dtype):
    w = dequantize(QTensor(q, scale, qt.bits, qt.shape, qt.lead, qt.in_dims, qt.groups), dtype)
    return w.reshape(qt.grouped_shape[-2] * qt.groups, qt.grouped_shape[-1])


def _qmatmul(x, q, scale, qt: QTensor, dtype):
    """`x [M, K] @ dequantize(q, scale) [K, N]`, differentiable in `x` alone; the backward pass
    dequantizes again (nothing float of the kernel is saved for it)."""

    @jax.custom_vjp
    def f(x, q, scale):
        return x @ _weight(qt, q, scale, dtype)

    def fwd(x, q, scale):
        return f(x, q, scale), (q, scale)

    def bwd(res, g):
        q, scale = res
        return (g @ _weight(qt, q, scale, dtype).T).astype(x.dtype), None, None

    f.defvjp(fwd, bwd)
    return f(x, q, scale)
